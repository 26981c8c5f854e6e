"""Per-variant statistics over seeds from finished evaluation folders, and the markdown table.

Per variant and metric: the mean and the sample standard deviation (ddof = 1; None with one
seed) over seeds; the "average" column is, per run, the unweighted mean of the ``average``
metrics, then mean +- std over seeds.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
)

from fire_mpo_core.compare.spec import AVERAGE_METRICS, LAYER_METRIC


class RunResult(BaseModel):
    """One finished (variant, seed): its train and evaluation folders."""

    variant: str
    seed: int
    train_dir: Path
    eval_dir: Path

    def metrics(self) -> dict[str, Any]:
        return json.loads((self.eval_dir / "metrics.json").read_text())


def run_average(metrics: dict[str, Any], keys: Sequence[str]) -> float | None:
    """Unweighted mean of `keys` in one run's metrics; None if any is missing or None."""
    vals = [metrics.get(k) for k in keys]
    if any(not isinstance(v, int | float) for v in vals):
        return None
    return sum(vals) / len(vals)


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None, int]:
    """(mean, sample std with ddof 1, n) of the non-None values; std is None when n < 2."""
    xs = [float(v) for v in values if isinstance(v, int | float) and not math.isnan(v)]
    if not xs:
        return None, None, 0
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None), len(xs)


def aggregate(
    rows: Sequence[dict[str, Any]], metrics: Sequence[str], average: Sequence[str]
) -> dict[str, dict[str, dict[str, float | int | None]]]:
    """Per variant (first-seen order), per metric and ``average``: {mean, std, n}.

    `rows` are flat dicts with ``variant`` and the metric keys (one per run, as in results.csv).
    """
    by: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(r["variant"], []).append(r)
    out: dict[str, dict[str, dict[str, float | int | None]]] = {}
    for variant, runs in by.items():
        cols = {}
        for m in [*metrics, *(k for k in average if k not in metrics)]:
            mean, std, n = mean_std([r.get(m) for r in runs])
            cols[m] = {"mean": mean, "std": std, "n": n}
        mean, std, n = mean_std([run_average(r, average) for r in runs])
        cols["average"] = {"mean": mean, "std": std, "n": n}
        out[variant] = cols
    return out


def fmt(cell: dict[str, Any], digits: int = 3) -> str:
    """'0.681 ± 0.012' (or just the mean with one run; '-' when missing)."""
    if cell.get("mean") is None:
        return "-"
    s = f"{cell['mean']:.{digits}f}"
    return s if cell.get("std") is None else f"{s} ± {cell['std']:.{digits}f}"


def markdown_table(
    summary: dict[str, dict[str, dict[str, Any]]],
    metrics: Sequence[str],
    base: dict[str, Any] | None = None,
    average: Sequence[str] = AVERAGE_METRICS,
) -> str:
    """Rows = variants (plus the SFT base when given), columns = metrics + average; the best
    mean of each column among the variants is bold."""
    cols = [*metrics, "average"]
    best = {}
    for c in cols:
        means = [v[c]["mean"] for v in summary.values() if v[c]["mean"] is not None]
        best[c] = max(means) if means else None
    lines = [
        "| method | " + " | ".join(cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    if base is not None:
        cells = [fmt({"mean": base.get(c)}) for c in metrics]
        cells.append(fmt({"mean": run_average(base, average)}))
        lines.append("| SFT base | " + " | ".join(cells) + " |")
    for variant, row in summary.items():
        cells = []
        for c in cols:
            s = fmt(row[c])
            top = row[c]["mean"] is not None and row[c]["mean"] == best[c]
            cells.append(f"**{s}**" if top else s)
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def read_curve(train_dir: Path, key: str) -> dict[int, float]:
    """step -> value of `key` from a train folder's metrics.jsonl (missing file: empty)."""
    path = train_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if isinstance(row.get(key), int | float) and "step" in row:
            out[int(row["step"])] = float(row[key])
    return out


def layer_keys(rows: Sequence[dict[str, Any]]) -> list[str]:
    """The per-layer lesion attention keys present, ordered by layer."""
    keys = {k for r in rows for k in r if LAYER_METRIC.match(k)}
    return sorted(keys, key=lambda k: int(LAYER_METRIC.match(k).group(1)))  # type: ignore[union-attr]
