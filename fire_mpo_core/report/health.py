"""The report's Health section and its PNG plots (reward-hacking and health diagnostics).

    from fire_mpo_core.report.health import health_section, write_plots
    md = health_section({1: train1_dir, 2: train2_dir})          # table, flagged cells marked
    pngs = write_plots({1: train1_dir}, {0: eval0_dir, 1: eval1_dir}, out_dir)  # name -> path

Reads finished train folders only: ``health.json`` (the numbers, written by the train stage:
:mod:`fire_mpo_core.training.health`), ``metrics.jsonl`` (the training curves) and the manifest
(the thresholds the folder was keyed with, so a flag here is the flag the stage raised), and the
evaluate folders' ``metrics.json``. Plots use matplotlib's Agg backend (no display).
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fire_mpo_core.store import read_manifest
from fire_mpo_core.training.config import HealthConfig
from fire_mpo_core.training.health import (
    BY_ROUND,
    CHECKS,
    Flag,
    check,
    read_health,
    read_train_log,
)

#: Health table columns: (health.json section, key, header).
COLUMNS = (
    ("pairs", "pairs", "pairs"),
    ("pairs", "length_gap_words", "length gap (words)"),
    ("pairs", "chosen_longer_share", "chosen longer"),
    ("pairs", "edit_distance", "edit distance"),
    ("pairs", "span_word_share", "span word share"),
    ("training", "reward_accuracy_final", "reward acc."),
    ("training", "accuracy_saturation", "acc. saturation"),
    ("training", "kl_forward_final", "KL fwd"),
    ("training", "kl_reverse_final", "KL rev"),
    ("training", "kl_forward_growth", "KL fwd growth"),
    ("training", "grad_norm_ratio", "grad-norm ratio"),
    ("training", "reward_margin_slope", "margin slope"),
)
#: Training curves: metrics.jsonl keys, one panel each (KL forward and reverse share one).
CURVES = (
    ("loss", ("loss",)),
    ("reward margin", ("rewards/margin",)),
    ("reward accuracy", ("rewards/accuracy",)),
    ("KL on y+ (solid: forward, dashed: reverse)", ("kl/forward", "kl/reverse")),
    ("grad norm (before clipping)", ("grad_norm",)),
    ("NLL of y+ (rising: chosen likelihood falls)", ("nll",)),
)
WARN = "⚠"
PNG_DPI = 90


def health_config(train_dir: Path) -> HealthConfig:
    """The thresholds ``train_dir`` was built with (defaults for a folder from before them)."""
    try:
        section = read_manifest(train_dir)["config"]["train"].get("health", {})
        return HealthConfig.model_validate(section)
    except (OSError, KeyError, ValueError):
        return HealthConfig()


@dataclass(frozen=True)
class RoundView:
    """One round's health.json, the thresholds its folder was keyed with, and its flags."""

    values: dict[str, Any]
    cfg: HealthConfig
    flags: list[Flag]

    @property
    def flagged(self) -> set[str]:
        """The diagnostic keys (health.json names) whose threshold is crossed."""
        names = {f.name for f in self.flags}
        return {c.key for c in CHECKS if c.name in names}

    def threshold(self, key: str) -> float | None:
        return next((getattr(self.cfg, c.field) for c in CHECKS if c.key == key), None)


def round_health(trains: Mapping[int, Path]) -> dict[int, RoundView]:
    """round -> its :class:`RoundView`; rounds without a health.json are left out."""
    out = {}
    for k in sorted(trains):
        values = read_health(Path(trains[k]))
        if values is not None:
            cfg = health_config(Path(trains[k]))
            out[k] = RoundView(values, cfg, check(values, cfg))
    return out


def cell(v: Any) -> str:
    """A table cell: floats to 3 decimals, "–" for a missing value."""
    return "–" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)


def health_section(trains: Mapping[int, Path]) -> str:
    """A markdown table, one row per round, of the diagnostics; a crossed threshold is marked
    ⚠ and listed with its meaning under the table."""
    rows = round_health(trains)
    if not rows:
        return "_No health diagnostics yet (train folders hold health.json from this version)._"
    lines = [
        "| round | " + " | ".join(h for _, _, h in COLUMNS) + " |",
        "|---|" + "---:|" * len(COLUMNS),
    ]
    notes = []
    for k, view in rows.items():
        cells = []
        for section, key, _ in COLUMNS:
            text = cell(view.values.get(section, {}).get(key))
            cells.append(f"**{text}** {WARN}" if key in view.flagged else text)
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
        notes += [f"- {WARN} round {k}: {f.message}" for f in view.flags]
    body = "\n".join(lines)
    return body + ("\n\n" + "\n".join(notes) if notes else "\n\nNo threshold crossed.")


# --------------------------------------------------------------------------- plots


def png_uri(png: bytes) -> str:
    """A PNG as a data URI: images inside the markdown render in Prefect's UI and in a file."""
    return "data:image/png;base64," + base64.b64encode(png).decode()


def write_plots(
    trains: Mapping[int, Path],
    evaluations: Mapping[int, Path],
    out_dir: Path,
    headline: tuple[str, ...] = (),
) -> dict[str, Path]:
    """Write health_by_round.png, training_curves.png and metrics_by_round.png (each only when
    it has data) into ``out_dir``; returns title -> path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    health = round_health(trains)
    logs = {k: read_train_log(Path(p)) for k, p in sorted(trains.items())}
    metrics = {
        k: json.loads((Path(p) / "metrics.json").read_text())
        for k, p in sorted(evaluations.items())
        if (Path(p) / "metrics.json").is_file()
    }
    figures = (
        ("Health diagnostics by round", "health_by_round.png", _health_by_round, health),
        ("Training curves per round", "training_curves.png", _training_curves, logs),
        ("Evaluation metrics by round", "metrics_by_round.png", _metrics_by_round, metrics),
    )
    for title, name, draw, data in figures:
        fig = draw(plt, data, headline) if any(data.values()) else None
        if fig is None:
            continue
        _save(plt, fig, out_dir / name)
        written[title] = out_dir / name
    return written


def _save(plt: Any, fig: Any, path: Path) -> None:
    """PNG with a 256-colour palette: plots have few colours, and the report embeds them, so
    a third of the bytes keeps the markdown artifact light."""
    from PIL import Image

    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=PNG_DPI)
    plt.close(fig)
    buf.seek(0)
    Image.open(buf).convert("RGB").quantize(256).save(path, optimize=True)


def _rounds_axis(ax: Any, rounds: list[int]) -> None:
    ax.set_xticks(rounds)
    ax.set_xlabel("round")
    ax.grid(alpha=0.3)


def _health_by_round(plt: Any, health: dict[int, RoundView], _headline: tuple = ()) -> Any:
    """One panel per carried-forward diagnostic: value by round, the latest round's threshold
    dashed, a flagged round in red."""
    keys = [(s, k) for s, ks in BY_ROUND.items() for k in ks]
    fig, axes = plt.subplots(2, 5, figsize=(15, 5.4), squeeze=False)
    rounds = sorted(health)
    latest = health[rounds[-1]]
    for ax, (section, key) in zip(axes.flat, keys, strict=False):
        pts = [(k, health[k].values.get(section, {}).get(key)) for k in rounds]
        pts = [(k, v) for k, v in pts if v is not None]
        ax.plot([k for k, _ in pts], [v for _, v in pts], "o-", color="tab:blue", lw=1.5)
        bad = [(k, v) for k, v in pts if key in health[k].flagged]
        if bad:
            ax.plot([k for k, _ in bad], [v for _, v in bad], "o", color="tab:red", ms=9)
        limit = latest.threshold(key)
        if limit is not None:
            ax.axhline(limit, color="tab:red", ls="--", lw=1)
            if key == "length_gap_words":  # flagged by its size, whichever side is longer
                ax.axhline(-limit, color="tab:red", ls="--", lw=1)
        ax.set_title(key, fontsize=10)
        _rounds_axis(ax, rounds)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    fig.suptitle(
        "Health by round (red: threshold crossed; dashed: the latest round's threshold)",
        fontsize=11,
    )
    return fig


def _training_curves(plt: Any, logs: dict[int, list[dict[str, Any]]], _headline=()) -> Any:
    """One panel per curve, one line per round (the step axis restarts every round)."""
    fig, axes = plt.subplots(2, 3, figsize=(13, 6.4), squeeze=False)
    rounds = [k for k in logs if logs[k]]
    for ax, (title, keys) in zip(axes.flat, CURVES, strict=True):
        values = []
        for i, k in enumerate(rounds):
            for key, style in zip(keys, ("-", "--"), strict=False):
                pts = [(r["step"], r[key]) for r in logs[k] if isinstance(r.get(key), int | float)]
                if pts:
                    label = f"round {k}" if style == "-" else None
                    ax.plot(*zip(*pts, strict=True), style, color=f"C{i % 10}", lw=1.4, label=label)
                    values += [v for _, v in pts]
        if keys == ("grad_norm",) and values and 0 < 10 * min(values) < max(values):
            ax.set_yscale("log")  # a collapse spans decades
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("Training curves per round (metrics.jsonl)", fontsize=11)
    return fig


def _metrics_by_round(plt: Any, metrics: dict[int, dict[str, Any]], headline: tuple) -> Any:
    """One panel per headline metric: value by round (0 = SFT base) with its 95% interval."""
    keys = [m for m in headline if any(isinstance(r.get(m), int | float) for r in metrics.values())]
    if not keys:
        return None
    ncol = min(4, len(keys))
    nrow = -(-len(keys) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(3.8 * ncol, 2.9 * nrow), squeeze=False)
    rounds = sorted(metrics)
    for ax, key in zip(axes.flat, keys, strict=False):
        pts = [(k, metrics[k]) for k in rounds if isinstance(metrics[k].get(key), int | float)]
        xs, ys = [k for k, _ in pts], [m[key] for _, m in pts]
        lo = [y - m.get(f"{key}_ci_low", y) for y, (_, m) in zip(ys, pts, strict=True)]
        hi = [m.get(f"{key}_ci_high", y) - y for y, (_, m) in zip(ys, pts, strict=True)]
        ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o-", capsize=3, lw=1.5, color="tab:green")
        ax.set_title(key, fontsize=10)
        _rounds_axis(ax, rounds)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    fig.suptitle("Evaluation by round (0 = SFT base; bars: 95% Wilson interval)", fontsize=11)
    return fig
