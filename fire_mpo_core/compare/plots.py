"""The comparison's PNGs: metric bars with std error bars, training curves (mean over seeds),
lesion attention ratio per layer.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fire_mpo_core.compare.aggregate import RunResult, layer_keys, mean_std, read_curve, run_average
from fire_mpo_core.compare.spec import LAYER_METRIC, CompareSpec


def write_plots(
    runs: Sequence[RunResult],
    rows: Sequence[dict[str, Any]],
    summary: dict[str, dict[str, dict[str, Any]]],
    spec: CompareSpec,
    out: Path,
    base: dict[str, Any] | None = None,
) -> list[str]:
    """Write metrics.png, curves.png and (when grounding was measured) grounding.png into
    `out`; returns the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {n: plt.get_cmap("tab20")(i % 20) for i, n in enumerate(summary)}
    written = [
        _save(_metric_bars(plt, summary, spec, base, colors), out / "metrics.png"),
        _save(_training_curves(plt, runs, spec, colors), out / "curves.png"),
    ]
    layers = layer_keys(rows)
    if layers:
        written.append(
            _save(_grounding_layers(plt, rows, layers, base, colors), out / "grounding.png")
        )
    return written


def _save(fig: Any, path: Path) -> str:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def _metric_bars(plt: Any, summary, spec: CompareSpec, base, colors) -> Any:
    """One panel per column, one bar per variant (std as error bar), the SFT base as a dashed
    line. Axes are zoomed to the data: the differences are small."""
    from matplotlib.ticker import MaxNLocator

    names = list(summary)
    cols = [*spec.metrics, "average"]
    ncol = 5
    nrow = math.ceil(len(cols) / ncol)
    fig, axes = plt.subplots(
        nrow, ncol, figsize=(3.3 * ncol, 0.9 + (0.22 * len(names) + 0.8) * nrow), squeeze=False
    )
    ys = list(range(len(names)))[::-1]
    for i, (ax, c) in enumerate(zip(axes.flat, cols, strict=False)):
        means = [summary[n][c]["mean"] for n in names]
        errs = [summary[n][c]["std"] or 0.0 for n in names]
        ok = [(m, e) for m, e in zip(means, errs, strict=True) if m is not None]
        ax.barh(
            ys,
            [m or 0.0 for m in means],
            xerr=errs,
            color=[colors[n] for n in names],
            error_kw={"capsize": 2, "lw": 0.8},
        )
        ref = (base or {}).get(c) if c != "average" else run_average(base or {}, spec.average)
        if isinstance(ref, int | float):
            ax.axvline(ref, color="black", ls="--", lw=0.8)
            ok.append((ref, 0.0))
        if ok:
            lo, hi = min(m - e for m, e in ok), max(m + e for m, e in ok)
            pad = max(0.01, 0.15 * (hi - lo))
            ax.set_xlim(lo - pad, hi + pad)
        ax.ticklabel_format(axis="x", useOffset=False)
        ax.xaxis.set_major_locator(MaxNLocator(4))
        ax.set_title(c, fontsize=9)
        ax.set_yticks(ys, names if i % ncol == 0 else [""] * len(names), fontsize=7)
        ax.tick_params(axis="x", labelsize=7)
    for ax in list(axes.flat)[len(cols) :]:
        ax.axis("off")
    fig.suptitle(f"mean ± std over seeds {spec.seeds}; dashed: SFT base", fontsize=10)
    return fig


def _training_curves(plt: Any, runs: Sequence[RunResult], spec: CompareSpec, colors) -> Any:
    """Training curves: mean over seeds at each logged step."""
    fig, axes = plt.subplots(
        1, len(spec.curves), figsize=(4.5 * len(spec.curves), 3.6), squeeze=False
    )
    for ax, key in zip(axes.flat, spec.curves, strict=True):
        for n in colors:
            curves = [read_curve(r.train_dir, key) for r in runs if r.variant == n]
            steps = sorted(set().union(*curves)) if curves else []
            ys = [statistics.fmean([c[s] for c in curves if s in c]) for s in steps]
            if steps:
                ax.plot(steps, ys, label=n, color=colors[n], lw=1.2)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step")
    axes.flat[0].legend(fontsize=6, ncol=2)
    return fig


def _grounding_layers(plt: Any, rows, layers: list[str], base, colors) -> Any:
    """Lesion attention ratio per decoder layer (1 = no preference for the lesion)."""
    fig, ax = plt.subplots(figsize=(6.5, 4))
    xs = [int(LAYER_METRIC.match(k).group(1)) for k in layers]  # type: ignore[union-attr]
    if base and all(isinstance(base.get(k), int | float) for k in layers):
        ax.plot(xs, [base[k] for k in layers], "k--", lw=1, label="SFT base")
    names = list(colors)
    for i, n in enumerate(names):
        cells = [mean_std([r.get(k) for r in rows if r["variant"] == n]) for k in layers]
        dodge = 0.3 * (i / max(1, len(names) - 1) - 0.5)  # keeps error bars apart
        ax.errorbar(
            [x + dodge for x in xs],
            [c[0] or 0.0 for c in cells],
            yerr=[c[1] or 0.0 for c in cells],
            label=n,
            color=colors[n],
            marker="o",
            capsize=2,
            lw=1,
        )
    ax.axhline(1.0, color="grey", ls=":", lw=1)
    ax.set_xticks(xs)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("lesion attention ratio")
    ax.legend(fontsize=6, ncol=2)
    return fig
