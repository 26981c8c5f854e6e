"""The comparison's outputs in one folder, replaced atomically: results.csv, summary.json,
table.md, the PNGs and report.md (:func:`write_comparison`).
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import shutil
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from fire_mpo_core.compare.aggregate import RunResult, aggregate, fmt, markdown_table, run_average
from fire_mpo_core.compare.plots import write_plots
from fire_mpo_core.compare.significance import (
    paired_significance,
    significance_reading,
    significance_table,
)
from fire_mpo_core.compare.spec import CompareSpec


def reading(
    summary: dict[str, dict[str, dict[str, Any]]],
    baseline: str | None,
    base_average: float | None = None,
    constant: Sequence[str] = (),
) -> list[str]:
    """Plain sentences on the average column: the leader, its margin, the SFT base, the
    baseline gap, and the metrics that are the same in every run (they separate nothing)."""
    ranked = sorted(
        ((n, r["average"]) for n, r in summary.items() if r["average"]["mean"] is not None),
        key=lambda x: -x[1]["mean"],
    )
    if not ranked:
        return ["No variant has every average metric."]
    (top, a), *rest = ranked
    lines = [f"Highest average: **{top}** ({fmt(a)})."]
    if rest:
        second, b = rest[0]
        spread = max(a["std"] or 0.0, b["std"] or 0.0)
        gap = a["mean"] - b["mean"]
        verdict = "larger" if gap > spread else "not larger"
        lines.append(
            f"Runner-up: {second} ({fmt(b)}); the gap {gap:.4f} is {verdict} than the larger "
            f"seed std of the two ({spread:.4f})."
        )
    if base_average is not None:
        above = [n for n, c in ranked if c["mean"] > base_average]
        lines.append(
            f"SFT base average: {base_average:.3f}; variants above it: "
            + (", ".join(above) if above else "none")
            + "."
        )
    if constant:
        lines.append(f"Identical in every run (separates no method): {', '.join(constant)}.")
    if baseline is not None and summary[baseline]["average"]["mean"]:
        ref = summary[baseline]["average"]["mean"]
        for n, cell in ranked:
            if n != baseline:
                rel = 100.0 * (cell["mean"] - ref) / ref
                lines.append(f"- {n}: {rel:+.2f}% average vs {baseline}")
    return lines


def write_comparison(
    runs: Sequence[RunResult],
    spec: CompareSpec,
    out_dir: str | Path,
    base_eval: str | Path | None = None,
    details: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write results.csv, summary.json, table.md, the PNGs and report.md into `out_dir`
    (replaced atomically: built in a sibling temporary folder, then renamed). Returns the
    summary dict (also in summary.json)."""
    with _atomic_dir(Path(out_dir)) as tmp:
        rows = _run_rows(runs, spec)
        _write_csv(rows, spec, tmp / "results.csv")
        summary_rows = aggregate(rows, spec.metrics, spec.average)
        base = json.loads((Path(base_eval) / "metrics.json").read_text()) if base_eval else None
        table = markdown_table(summary_rows, spec.metrics, base, spec.average)
        sig = paired_significance(runs, spec.significance, spec.baseline, base_eval)
        sig_md = significance_table(sig, spec.significance) if sig else ""
        (tmp / "table.md").write_text(
            table + (f"\nPaired significance (difference [95% CI], p):\n\n{sig_md}" if sig else "")
        )
        summary = {
            "name": spec.name,
            "seeds": spec.seeds,
            "average_metrics": spec.average,
            "std": "sample standard deviation over seeds (ddof=1)",
            "variants": summary_rows,
            "significance": sig,
            "base": base,
            **(details or {}),
        }
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        pngs = write_plots(runs, rows, summary_rows, spec, tmp, base)
        sentences = reading(
            summary_rows,
            spec.baseline,
            run_average(base, spec.average) if base else None,
            _constant_metrics(rows, spec),
        )
        report = _report_md(spec, table, sentences, sig, sig_md, pngs, details or {})
        (tmp / "report.md").write_text(report)
    return summary


@contextlib.contextmanager
def _atomic_dir(out: Path) -> Iterator[Path]:
    """A fresh sibling temporary folder that replaces `out` when the block succeeds and is
    removed when it fails: readers never see a half-written comparison."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old.{uuid.uuid4().hex[:8]}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _run_rows(runs: Sequence[RunResult], spec: CompareSpec) -> list[dict[str, Any]]:
    """One row per (variant, seed): its numeric metrics, its average and its folders."""
    rows = []
    for r in runs:
        m = r.metrics()
        rows.append(
            {
                "variant": r.variant,
                "seed": r.seed,
                **{k: v for k, v in m.items() if isinstance(v, int | float)},
                "average": run_average(m, spec.average),
                "train_dir": str(r.train_dir),
                "eval_dir": str(r.eval_dir),
            }
        )
    return rows


def _write_csv(rows: list[dict[str, Any]], spec: CompareSpec, path: Path) -> None:
    keys = ["variant", "seed", *spec.metrics, "average"]
    extra = sorted({k for r in rows for k in r} - set(keys) - {"train_dir", "eval_dir"})
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, [*keys, *extra, "train_dir", "eval_dir"], restval="")
        w.writeheader()
        w.writerows(rows)


def _constant_metrics(rows: list[dict[str, Any]], spec: CompareSpec) -> list[str]:
    """Metrics equal in every run: they separate nothing, and the reading says so."""
    constant = [
        m
        for m in [*spec.metrics, *spec.average]
        if len({r.get(m) for r in rows}) == 1 and len(rows) > 1
    ]
    return list(dict.fromkeys(constant))


def _report_md(
    spec: CompareSpec,
    table: str,
    sentences: list[str],
    sig: dict[str, Any],
    sig_md: str,
    pngs: list[str],
    details: dict[str, Any],
) -> str:
    descr = "\n".join(
        f"- **{n}**: {v.description or '-'} (train {v.train or '{}'}"
        + (f", corrupt {v.corrupt}" if v.corrupt else "")
        + ")"
        for n, v in spec.variants.items()
    )
    info = "\n".join(f"- {k}: {v}" for k, v in details.items())
    significance = (
        "## Paired significance\n\nPer record, scores averaged over seeds; paired "
        "bootstrap of the mean difference (2000 resamples, 95% percentile interval, "
        "two-sided p; * p < 0.05).\n\n"
        + sig_md
        + "\n"
        + "\n".join(significance_reading(sig, spec.significance))
        + "\n\n"
        if sig
        else ""
    )
    return (
        f"# FiRe-MPO comparison `{spec.name}`\n\n"
        f"Seeds {spec.seeds}; cells are mean ± sample std (ddof 1) over seeds. "
        f"**average** = per run the unweighted mean of {', '.join(spec.average)}, then "
        f"mean ± std over seeds. Bold: the best mean of the column.\n\n{table}\n"
        "## Reading\n\n"
        + "\n".join(sentences)
        + "\n\n"
        + significance
        + "## Plots\n\n"
        + "\n\n".join(f"![{p}]({p})" for p in pngs)
        + "\n\n"
        f"## Variants\n\nCommon train overrides: {spec.train or '{}'}\n\n{descr}\n\n"
        + (f"## Run\n\n{info}\n\n" if info else "")
        + "Per-run numbers: [results.csv](results.csv); all means and stds: "
        "[summary.json](summary.json).\n"
    )
