"""The cycle's dashboard report: metrics across rounds, health, example corruptions and pairs.

    from fire_mpo_core.report import cycle_report
    markdown = cycle_report("default", {0: eval0_dir, 1: eval1_dir}, corrupt_dir, prepare_dir,
                            trains={1: train1_dir}, plots_dir=store / "default" / "report")

Reads finished stage folders only (`evaluate/*/metrics.json`, `corrupt/*/data.jsonl` and the
images they name, `train/*/health.json` and `metrics.jsonl`: :mod:`.health`) and returns one
markdown document; with `plots_dir` the PNG plots are also written there. Images are embedded
as PNG data URIs, so the document renders the same in Prefect's dashboard (a markdown artifact)
and in a file.
Spans are marked with **bold** (chosen y+) and ~~strike-through~~ (rejected y-), which
markdown renderers keep even when they strip HTML.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import cv2
import numpy as np

from fire_mpo_core.data.io import resolve_in_root
from fire_mpo_core.data.records import PreferencePair, Span
from fire_mpo_core.report.health import cell, health_section, png_uri, write_plots
from fire_mpo_core.store import DATA, read_jsonl

#: Metrics shown in the table when present (in this order); the rest stay in metrics.json.
HEADLINE = (
    "closed_accuracy",
    "open_exact_match",
    "open_recall",
    "open_f1",
    "report_token_f1",
    "report_bleu",
    "report_rouge_l",
    "clinical_f1",
    "closed_lesion_accuracy",
    "grounded_accuracy",
    "keep_accuracy",
    "blind_accuracy",
    "logp_drop_lesion_removed",
)
THUMB = 128  # px: the longer side of each thumbnail


def metrics_table(evaluations: Mapping[int, Path]) -> str:
    """A markdown table, one row per round, of the headline metrics any evaluation has."""
    rows = {}
    for k in sorted(evaluations):
        path = Path(evaluations[k]) / "metrics.json"
        if path.is_file():
            rows[k] = json.loads(path.read_text())
    if not rows:
        return "_No evaluation yet._"
    keys = [m for m in HEADLINE if any(m in r for r in rows.values())]
    lines = [
        "| round | policy | " + " | ".join(keys) + " |",
        "|---|---|" + "---:|" * len(keys),
    ]
    for k, r in rows.items():
        cells = [cell(r.get(m)) for m in keys]
        policy = "SFT base" if k == 0 else f"round {k}"
        lines.append(f"| {k} | {policy} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def mark_spans(text: str, spans: list[Span], marker: str) -> str:
    """`text` with each [start, end) span wrapped in `marker` (e.g. "**")."""
    out, pos = [], 0
    for a, b in sorted(spans):
        out += [_escape(text[pos:a]), marker, _escape(text[a:b]).strip(), marker]
        # Markdown emphasis needs no space inside the markers: move edge spaces outside.
        if text[a:b].endswith(" "):
            out.append(" ")
        pos = b
    out.append(_escape(text[pos:]))
    return "".join(out)


def _escape(text: str) -> str:
    for c in "\\`*_~[]|<>":
        text = text.replace(c, "\\" + c)
    return text.replace("\n", " ")


def _thumb(img: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    s = THUMB / max(h, w)
    return cv2.resize(img, (max(1, round(w * s)), max(1, round(h * s))), cv2.INTER_NEAREST)


def _read(path: Path) -> np.ndarray:
    img = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise ValueError(f"unreadable image {path}")
    return img


def triptych(original: Path, mask: Path | None, corrupted: Path) -> str:
    """A data URI of one PNG: original | mask (or blank) | corrupted, side by side, grayscale."""
    a = _thumb(_read(original))
    m = _thumb(_read(mask)) if mask else np.zeros_like(a)
    c = _thumb(_read(corrupted))
    m = cv2.resize(m, a.shape[1::-1], interpolation=cv2.INTER_NEAREST)
    c = cv2.resize(c, a.shape[1::-1], interpolation=cv2.INTER_NEAREST)
    gap = np.full((a.shape[0], 4), 255, np.uint8)
    ok, png = cv2.imencode(".png", np.hstack([a, gap, (m > 0).astype(np.uint8) * 255, gap, c]))
    assert ok
    return png_uri(png.tobytes())


def examples(corrupt: Path, data_root: Path, n: int = 3) -> str:
    """Markdown for `n` example pairs: the image triptych, question, y+ and y- with spans."""
    pairs = [p for p in read_jsonl(Path(corrupt) / DATA, PreferencePair) if p.corrupted_image]
    # One incorrect (a corrected answer) and one correct (a counterfactual) first, masks first.
    pairs.sort(key=lambda p: (p.mask is None, p.verdict != "incorrect", p.id))
    picked: list[PreferencePair] = []
    for verdict in ("incorrect", "correct"):
        picked += [p for p in pairs if p.verdict == verdict][:1]
    picked += [p for p in pairs if p not in picked][: max(0, n - len(picked))]
    out = []
    for p in picked[:n]:
        try:
            uri = triptych(
                resolve_in_root(data_root, p.image),
                resolve_in_root(data_root, p.mask) if p.mask else None,
                resolve_in_root(corrupt, p.corrupted_image),
            )
        except ValueError as e:  # an example is decoration: say why it is missing, go on
            out.append(f"- `{p.id}`: image not shown ({e})")
            continue
        out += [
            f"**`{p.id}`** ({p.answer_type}; sampled answer judged {p.verdict})",
            "",
            f"![original, lesion mask, corrupted v' of {p.id}]({uri})",
            "",
            f"- Q: {_escape(p.question)}",
            f"- y+ (chosen): {mark_spans(p.chosen, p.chosen_spans, '**')}",
            f"- y- (rejected): {mark_spans(p.rejected, p.rejected_spans, '~~')}",
            "",
        ]
    return "\n".join(out) if out else "_No pairs with a corrupted image._"


def cycle_report(
    run: str,
    evaluations: Mapping[int, Path],
    corrupt: Path | None = None,
    data_root: Path | None = None,
    n_examples: int = 3,
    trains: Mapping[int, Path] | None = None,
    plots_dir: Path | None = None,
) -> str:
    """The whole report as markdown (see the module docstring). With `plots_dir`, the plots
    (health and evaluation by round, training curves) are written there and embedded."""
    plots = write_plots(trains or {}, evaluations, plots_dir, HEADLINE) if plots_dir else {}
    parts = [
        f"# FiRe-MPO run `{run}`",
        "",
        "## Metrics by round",
        "",
        metrics_table(evaluations),
        "",
        *_figures(plots, ("Evaluation metrics by round",)),
    ]
    if trains is not None:
        parts += [
            "## Health",
            "",
            "Reward-hacking and health diagnostics per round; **bold** ⚠: a `train.health` "
            "threshold crossed.",
            "",
            health_section(trains),
            "",
            *_figures(plots, ("Health diagnostics by round", "Training curves per round")),
        ]
    if corrupt is not None and data_root is not None:
        parts += [
            "## Example pairs (latest round)",
            "",
            "Images: original | lesion mask | corrupted v'. Spans: **chosen**, ~~rejected~~.",
            "",
            examples(corrupt, data_root, n_examples),
        ]
    return "\n".join(parts)


def _figures(plots: Mapping[str, Path], titles: tuple[str, ...]) -> list[str]:
    """Markdown lines embedding the written plots among `titles` as PNG data URIs."""
    return [f"![{t}]({png_uri(plots[t].read_bytes())})\n" for t in titles if t in plots]
