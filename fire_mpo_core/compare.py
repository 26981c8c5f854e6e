"""The paper's comparison table: methods and ablations x seeds, from finished evaluation folders.

Kept outside `fire_mpo_core.evaluation` on purpose: that package is part of the `evaluate`
stage's code version, so editing this report code would otherwise invalidate every evaluation.

The flow `flows/compare.py` trains and evaluates every (variant, seed) and then calls
:func:`write_comparison`; everything here reads finished folders only (no Prefect, no training)::

    from fire_mpo_core.compare import load_compare, variant_configs, write_comparison
    cfg, spec = load_compare("configs/compare.yaml")           # CycleConfig, CompareSpec
    train_cfg, corrupt_cfg = variant_configs(cfg, spec)["dpo"]  # validated per-variant configs
    runs = [RunResult(variant="dpo", seed=0, train_dir=..., eval_dir=...), ...]
    summary = write_comparison(runs, spec, out_dir, base_eval=round0_eval_dir)

The config file (`configs/compare.yaml`) is a cycle config plus a ``compare:`` section
(:class:`CompareSpec`); ``base: default.yaml`` makes the cycle part extend another file (keys in
this file override it), so the comparison shares the default run's cached setup stages. Each
variant is ``name -> {train: {dotted.key: value}, corrupt: {dotted.key: value}}`` applied over the
cycle's sections (and the spec's common ``train`` overrides); a bad key or value fails at load
time naming ``compare.variants.<name>.<section>.<field>``.

Statistics: per variant and metric, the mean and the sample standard deviation (ddof = 1; None
with one seed) over seeds. The "average" column is, per (variant, seed) run, the unweighted mean
of the ``average`` metrics (all on a 0-1 scale, higher is better), then mean +- std of that over
seeds, like the paper's per-method average over benchmarks.

Outputs in ``out_dir``: ``results.csv`` (one row per variant x seed), ``summary.json``,
``table.md``, ``metrics.png`` (bars with std error bars), ``curves.png`` (training curves from
each train folder's ``metrics.jsonl``, mean over seeds), ``grounding.png`` (lesion attention
ratio per layer) and ``report.md`` linking them.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import re
import shutil
import statistics
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from fire_mpo_core.config import ConfigError, CycleConfig, load_config
from fire_mpo_core.corruption.config import CorruptConfig
from fire_mpo_core.training.config import TrainConfig

NAME_PATTERN = r"^[A-Za-z0-9_.-]+$"
#: The default "average" column: one answer, one report and one grounding metric of each kind.
AVERAGE_METRICS = (
    "closed_lesion_accuracy",
    "open_recall",
    "report_rouge_l",
    "clinical_f1",
    "grounded_accuracy",
)
TABLE_METRICS = (
    "closed_accuracy",
    "closed_lesion_accuracy",
    "open_exact_match",
    "open_recall",
    "report_rouge_l",
    "clinical_f1",
    "grounded_accuracy",
    "keep_accuracy",
    "blind_accuracy",
)
CURVE_METRICS = ("loss", "rewards/accuracy", "rewards/margin", "nll")
#: Per-record metrics with a paired significance test (see :func:`record_scores`).
SIGNIFICANCE_METRICS = ("closed_accuracy", "closed_lesion_accuracy", "grounded_accuracy")
_LAYER = re.compile(r"^lesion_attention_ratio_l(\d+)$")


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Variant(_Spec):
    """One row of the table: overrides of the cycle's `train` and `corrupt` sections."""

    description: str = Field(default="", description="What the row is, for the report.")
    train: dict[str, Any] = Field(
        default_factory=dict,
        description="Dotted overrides of the train section, e.g. {'loss.name': 'dpo'}.",
    )
    corrupt: dict[str, Any] = Field(
        default_factory=dict,
        description="Dotted overrides of the corrupt section (corruption-kind ablations get "
        "their own corrupt and reference stages), e.g. {'kind': 'black'}.",
    )


class CompareSpec(_Spec):
    """The `compare:` section: which variants, which seeds, which metrics."""

    name: str = Field(
        default="paper",
        pattern=NAME_PATTERN,
        description="Output folder name: <store>/<run>/compare/<name>/.",
    )
    seeds: list[int] = Field(
        default=[0, 1, 2], min_length=1, description="train.seed of each run of every variant."
    )
    train: dict[str, Any] = Field(
        default_factory=dict,
        description="Dotted train overrides applied to every variant before its own (e.g. "
        "{'epochs': 1.0} to fit the time budget).",
    )
    variants: dict[str, Variant] = Field(
        min_length=1, description="Row name -> its overrides; rows appear in this order."
    )
    baseline: str | None = Field(
        default=None, description="Variant the report measures the others' average against."
    )
    average: list[str] = Field(
        default=list(AVERAGE_METRICS),
        min_length=1,
        description="metrics.json keys (0-1, higher is better) averaged into the average column.",
    )
    metrics: list[str] = Field(
        default=list(TABLE_METRICS), min_length=1, description="Table columns (metrics.json keys)."
    )
    curves: list[str] = Field(
        default=list(CURVE_METRICS),
        min_length=1,
        description="Training-log keys (train metrics.jsonl) plotted against the step.",
    )
    resample: bool = Field(
        default=True,
        description="Each seed also re-draws the on-policy answers (sample.seed = seed), so a "
        "seed has its own rollouts, pairs, corrupted images and reference; False: one set of "
        "pairs, seeds vary only the LoRA initialisation and data order.",
    )
    grid: dict[str, list[Any]] = Field(
        default_factory=dict,
        description="Train settings tried for EVERY variant alike, e.g. {'lr': [1e-3, 2e-3], "
        "'epochs': [1.0]} (the product is searched); each point is trained with the first seed "
        "and scored on the validation split, and the best by `select` is used for every seed "
        "on the test split. Empty: no search.",
    )
    select: str = Field(
        default="average",
        description="Validation score the grid picks by: 'average' (the average column's "
        "metrics) or one metrics.json key; higher is better.",
    )
    significance: list[str] = Field(
        default_factory=lambda: list(SIGNIFICANCE_METRICS),
        description="Per-record metrics tested, paired, against the baseline and the SFT base: "
        "closed_accuracy, closed_lesion_accuracy (evaluate data.jsonl) and grounded_accuracy "
        "(grounding.jsonl remove probes).",
    )
    workers: int = Field(
        default=1,
        ge=1,
        le=8,
        description="(variant, seed) jobs trained at once in threads. 1 = one after another: "
        "bit-reproducible. > 1 shares torch's global RNG between jobs (dropout draws interleave), "
        "so a rerun is statistically, not bitwise, the same.",
    )

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError(f"seeds repeat: {v}")
        return v

    @field_validator("variants")
    @classmethod
    def _variant_names(cls, v: dict[str, Variant]) -> dict[str, Variant]:
        bad = [n for n in v if not re.fullmatch(NAME_PATTERN, n)]
        if bad:
            raise ValueError(f"variant names must match {NAME_PATTERN}: {bad}")
        return v

    @field_validator("grid")
    @classmethod
    def _grid_fields(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        unknown = [k for k in v if k not in TrainConfig.model_fields]
        if unknown:
            raise ValueError(f"grid keys must be train fields: {unknown}")
        empty = [k for k, vals in v.items() if not vals]
        if empty:
            raise ValueError(f"grid values must be non-empty lists: {empty}")
        return v

    @field_validator("significance")
    @classmethod
    def _known_tests(cls, v: list[str]) -> list[str]:
        unknown = [m for m in v if m not in SIGNIFICANCE_METRICS]
        if unknown:
            raise ValueError(f"significance metrics must be in {SIGNIFICANCE_METRICS}: {unknown}")
        return v

    def grid_points(self) -> list[dict[str, Any]]:
        """Every combination of the grid ({} when there is no grid), in a stable order."""
        keys = sorted(self.grid)
        combos = itertools.product(*(self.grid[k] for k in keys))
        return [dict(zip(keys, combo)) for combo in combos]

    @model_validator(mode="after")
    def _known_baseline(self) -> CompareSpec:
        if self.baseline is not None and self.baseline not in self.variants:
            raise ValueError(f"baseline {self.baseline!r} is not a variant: {list(self.variants)}")
        return self


# --------------------------------------------------------------------------- config loading


def _set_dotted(data: dict[str, Any], dotted: str, value: Any, where: str) -> None:
    node = data
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{where}.{dotted}: {p!r} is not a section")
    node[leaf] = value


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, dict) and v and k not in ("remote_stages",):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _section(model: type[BaseModel], base: dict[str, Any], overrides: list[tuple[str, dict]]):
    data = json.loads(json.dumps(base))
    for where, ov in overrides:
        for k, v in ov.items():
            _set_dotted(data, k, v, where)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        where = overrides[-1][0] if overrides else model.__name__
        lines = [f"invalid config {where}:"]
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "<root>"
            lines.append(f"  {where}.{loc}: {err['msg']}")
        raise ConfigError("\n".join(lines)) from None


def variant_configs(cfg: CycleConfig, spec: CompareSpec) -> dict[str, tuple[TrainConfig, Any]]:
    """Variant name -> (its TrainConfig with seed 0, its CorruptConfig), validated.

    Raises:
        ConfigError: naming ``compare.variants.<name>.<section>.<field>`` of a bad override.
    """
    out = {}
    base_train = cfg.train.model_dump(mode="json")
    base_corrupt = cfg.corrupt.model_dump(mode="json")
    for name, v in spec.variants.items():
        where = f"compare.variants.{name}"
        train = _section(
            TrainConfig, base_train, [("compare.train", spec.train), (f"{where}.train", v.train)]
        )
        corrupt = _section(CorruptConfig, base_corrupt, [(f"{where}.corrupt", v.corrupt)])
        out[name] = (train, corrupt)
    return out


def load_compare(
    path: str | Path, store: str | None = None, run: str | None = None
) -> tuple[CycleConfig, CompareSpec]:
    """The cycle config and the comparison spec of a compare YAML, both validated.

    ``base:`` (a path relative to the file) names the cycle config this file extends; every
    other top-level key but ``compare`` overrides it. `store` / `run` override the result; the
    store path is made absolute.

    Raises:
        ConfigError: naming the file and each bad field (``compare.<field>`` for the spec).
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"invalid YAML in {p}: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config {p}: top level must be a mapping")
    if "compare" not in data:
        raise ConfigError(f"invalid config {p}: no `compare:` section")
    raw_spec = data.pop("compare")
    base = data.pop("base", None)
    overrides = _flatten(data)
    if store is not None:
        overrides["store"] = store
    if run is not None:
        overrides["run"] = run
    cfg = load_config(p.parent / base if base else None, overrides)
    cfg.store = cfg.store.resolve()
    try:
        spec = CompareSpec.model_validate(raw_spec)
    except ValidationError as e:
        lines = [f"invalid config {p}:"]
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"])
            lines.append(f"  compare.{loc}: {err['msg']}" if loc else f"  compare: {err['msg']}")
        raise ConfigError("\n".join(lines)) from None
    variant_configs(cfg, spec)  # fail now, not after the setup stages
    return cfg, spec


# --------------------------------------------------------------------------- aggregation


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
    keys = {k for r in rows for k in r if _LAYER.match(k)}
    return sorted(keys, key=lambda k: int(_LAYER.match(k).group(1)))  # type: ignore[union-attr]


# --------------------------------------------------------------------------- significance


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


# --------------------------------------------------------------------------- plots


def _plots(
    runs: Sequence[RunResult],
    rows: Sequence[dict[str, Any]],
    summary: dict[str, dict[str, dict[str, Any]]],
    spec: CompareSpec,
    out: Path,
    base: dict[str, Any] | None = None,
) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    names = list(summary)
    colors = {n: plt.get_cmap("tab20")(i % 20) for i, n in enumerate(names)}
    written = []

    # Metrics per method: one panel per column, one bar per variant (std as error bar), the SFT
    # base as a dashed line. Axes are zoomed to the data: the differences are small.
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
    fig.tight_layout()
    fig.savefig(out / "metrics.png", dpi=110)
    plt.close(fig)
    written.append("metrics.png")

    # Training curves: mean over seeds at each logged step.
    fig, axes = plt.subplots(
        1, len(spec.curves), figsize=(4.5 * len(spec.curves), 3.6), squeeze=False
    )
    for ax, key in zip(axes.flat, spec.curves, strict=True):
        for n in names:
            curves = [read_curve(r.train_dir, key) for r in runs if r.variant == n]
            steps = sorted(set().union(*curves)) if curves else []
            ys = [statistics.fmean([c[s] for c in curves if s in c]) for s in steps]
            if steps:
                ax.plot(steps, ys, label=n, color=colors[n], lw=1.2)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step")
    axes.flat[0].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)
    written.append("curves.png")

    # Grounding per layer: lesion attention ratio (1 = no preference for the lesion).
    layers = layer_keys(rows)
    if layers:
        fig, ax = plt.subplots(figsize=(6.5, 4))
        xs = [int(_LAYER.match(k).group(1)) for k in layers]  # type: ignore[union-attr]
        if base and all(isinstance(base.get(k), int | float) for k in layers):
            ax.plot(xs, [base[k] for k in layers], "k--", lw=1, label="SFT base")
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
        fig.tight_layout()
        fig.savefig(out / "grounding.png", dpi=110)
        plt.close(fig)
        written.append("grounding.png")
    return written


# --------------------------------------------------------------------------- outputs


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
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
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
        keys = ["variant", "seed", *spec.metrics, "average"]
        extra = sorted({k for r in rows for k in r} - set(keys) - {"train_dir", "eval_dir"})
        with (tmp / "results.csv").open("w", newline="") as f:
            w = csv.DictWriter(f, [*keys, *extra, "train_dir", "eval_dir"], restval="")
            w.writeheader()
            w.writerows(rows)
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
        base_avg = run_average(base, spec.average) if base else None
        constant = [
            m
            for m in [*spec.metrics, *spec.average]
            if len({r.get(m) for r in rows}) == 1 and len(rows) > 1
        ]
        constant = list(dict.fromkeys(constant))
        pngs = _plots(runs, rows, summary_rows, spec, tmp, base)
        descr = "\n".join(
            f"- **{n}**: {v.description or '-'} (train {v.train or '{}'}"
            + (f", corrupt {v.corrupt}" if v.corrupt else "")
            + ")"
            for n, v in spec.variants.items()
        )
        info = "\n".join(f"- {k}: {v}" for k, v in (details or {}).items())
        report = (
            f"# FiRe-MPO comparison `{spec.name}`\n\n"
            f"Seeds {spec.seeds}; cells are mean ± sample std (ddof 1) over seeds. "
            f"**average** = per run the unweighted mean of {', '.join(spec.average)}, then "
            f"mean ± std over seeds. Bold: the best mean of the column.\n\n{table}\n"
            "## Reading\n\n"
            + "\n".join(reading(summary_rows, spec.baseline, base_avg, constant))
            + "\n\n"
            + (
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
            + "## Plots\n\n"
            + "\n\n".join(f"![{p}]({p})" for p in pngs)
            + "\n\n"
            f"## Variants\n\nCommon train overrides: {spec.train or '{}'}\n\n{descr}\n\n"
            + (f"## Run\n\n{info}\n\n" if info else "")
            + "Per-run numbers: [results.csv](results.csv); all means and stds: "
            "[summary.json](summary.json).\n"
        )
        (tmp / "report.md").write_text(report)
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
    return summary
