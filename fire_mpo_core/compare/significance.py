"""Paired significance of the comparison: per-record scores averaged over seeds, a paired
bootstrap of the mean difference against the baseline method and against the SFT base, and the
validation-split grid choice (:func:`select_grid_point`).
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fire_mpo_core.compare.aggregate import RunResult


def record_scores(eval_dir: str | Path, metric: str) -> dict[str, float]:
    """Record id -> 0/1 score of one evaluation for a per-record metric: ``closed_accuracy`` and
    ``closed_lesion_accuracy`` (closed questions, the latter without modality) from data.jsonl,
    ``grounded_accuracy`` (remove probes right on v and v') from grounding.jsonl."""
    folder = Path(eval_dir)
    out: dict[str, float] = {}
    if metric == "grounded_accuracy":
        path = folder / "grounding.jsonl"
        for line in path.read_text().splitlines() if path.is_file() else []:
            row = json.loads(line)
            if row.get("measure") == "probe_remove":
                out[row["id"]] = float(bool(row["right_both"]))
        return out
    path = folder / "data.jsonl"
    for line in path.read_text().splitlines() if path.is_file() else []:
        row = json.loads(line)
        if row.get("answer_type") != "closed":
            continue
        if metric == "closed_lesion_accuracy" and row.get("question_type") == "modality":
            continue
        out[row["id"]] = float(row["correct"])
    return out


def seed_mean_scores(eval_dirs: Sequence[str | Path], metric: str) -> dict[str, float]:
    """Per record, the mean score over the given runs (the seeds of one variant)."""
    per = [record_scores(d, metric) for d in eval_dirs]
    common = set(per[0]).intersection(*per[1:]) if per else set()
    return {k: statistics.fmean(p[k] for p in per) for k in sorted(common)}


def paired_significance(
    runs: Sequence[RunResult],
    metrics: Sequence[str],
    baseline: str | None,
    base_eval: str | Path | None,
) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """variant -> "vs base" / "vs <baseline>" -> metric -> {diff, ci_low, ci_high, p, n}.

    Paired over records: each record's score is averaged over the variant's seeds (and the
    other side's), then :func:`~fire_mpo_core.evaluation.stats.paired_bootstrap` tests the mean
    difference (95% percentile interval, two-sided p). The SFT base is one deterministic run."""
    from fire_mpo_core.evaluation.stats import paired_bootstrap

    by: dict[str, list[Path]] = {}
    for r in runs:
        by.setdefault(r.variant, []).append(r.eval_dir)
    others: dict[str, list[Path]] = {}
    if base_eval is not None:
        others["base"] = [Path(base_eval)]
    if baseline is not None and baseline in by:
        others[baseline] = by[baseline]
    out: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    for variant, dirs in by.items():
        for label, other in others.items():
            if label == variant:
                continue
            for m in metrics:
                a, b = seed_mean_scores(dirs, m), seed_mean_scores(other, m)
                ids = sorted(set(a) & set(b))
                if not ids:
                    continue
                res = paired_bootstrap([a[i] for i in ids], [b[i] for i in ids])
                out.setdefault(variant, {}).setdefault(f"vs {label}", {})[m] = res
    return out


def significance_table(sig: dict[str, Any], metrics: Sequence[str], alpha: float = 0.05) -> str:
    """Markdown: per variant and comparison, the mean difference [95% CI] and p of each metric;
    a star marks p < alpha."""
    labels = sorted({lab for v in sig.values() for lab in v}, key=lambda x: (x != "vs base", x))
    head = [f"{m} {lab}" for lab in labels for m in metrics]
    lines = ["| method | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
    for variant, comps in sig.items():
        cells = []
        for lab in labels:
            for m in metrics:
                r = comps.get(lab, {}).get(m)
                if r is None:
                    cells.append("-")
                    continue
                star = "*" if r["p"] < alpha else ""
                cells.append(
                    f"{r['diff']:+.3f} [{r['ci_low']:+.3f}, {r['ci_high']:+.3f}] "
                    f"p={r['p']:.3f}{star}"
                )
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def significance_reading(sig: dict[str, Any], metrics: Sequence[str], alpha: float = 0.05):
    """Sentences: which variants are above / below the base and the baseline with p < alpha."""
    lines = []
    labels = sorted({lab for v in sig.values() for lab in v}, key=lambda x: (x != "vs base", x))
    for lab in labels:
        for m in metrics:
            better = [v for v, c in sig.items() if (r := c.get(lab, {}).get(m)) and
                      r["p"] < alpha and r["diff"] > 0]  # fmt: skip
            worse = [v for v, c in sig.items() if (r := c.get(lab, {}).get(m)) and
                     r["p"] < alpha and r["diff"] < 0]  # fmt: skip
            lines.append(
                f"- {m} {lab}: higher with p < {alpha}: {', '.join(better) or 'none'}; "
                f"lower with p < {alpha}: {', '.join(worse) or 'none'}."
            )
    return lines


def select_grid_point(
    scores: dict[str, dict[int, float | None]], points: Sequence[dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """variant -> the grid point with the highest validation score (the first on ties or when
    every score is missing)."""
    out = {}
    for variant, by_point in scores.items():
        best, best_score = 0, None
        for i in range(len(points)):
            sc = by_point.get(i)
            if sc is not None and (best_score is None or sc > best_score):
                best, best_score = i, sc
        out[variant] = points[best] if points else {}
    return out
