"""The paper's comparison: methods and ablations x seeds, planned here and tabulated from
finished evaluation folders.

No stage imports this package, so editing it never invalidates a stage's cached output.
Modules: :mod:`.spec` (the `compare:` config), :mod:`.plan` (which train + evaluate jobs, grid
selection on val), :mod:`.aggregate` (mean +- std over seeds, the table), :mod:`.significance`
(paired bootstrap), :mod:`.plots`, :mod:`.report` (:func:`write_comparison`).

The flow `flows/compare.py` runs the jobs :mod:`.plan` lists and then calls
:func:`write_comparison`; nothing here trains or uses Prefect::

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

from fire_mpo_core.compare.aggregate import (
    RunResult,
    aggregate,
    fmt,
    layer_keys,
    markdown_table,
    mean_std,
    read_curve,
    run_average,
)
from fire_mpo_core.compare.plan import Job, narrow, selection_jobs, shared_key, test_jobs
from fire_mpo_core.compare.report import reading, write_comparison
from fire_mpo_core.compare.significance import (
    paired_significance,
    record_scores,
    seed_mean_scores,
    select_grid_point,
    significance_reading,
    significance_table,
)
from fire_mpo_core.compare.spec import (
    AVERAGE_METRICS,
    CURVE_METRICS,
    SIGNIFICANCE_METRICS,
    TABLE_METRICS,
    CompareSpec,
    Variant,
    load_compare,
    variant_configs,
)

__all__ = [
    "AVERAGE_METRICS",
    "CURVE_METRICS",
    "SIGNIFICANCE_METRICS",
    "TABLE_METRICS",
    "CompareSpec",
    "Job",
    "RunResult",
    "Variant",
    "aggregate",
    "fmt",
    "layer_keys",
    "load_compare",
    "markdown_table",
    "mean_std",
    "narrow",
    "paired_significance",
    "read_curve",
    "reading",
    "record_scores",
    "run_average",
    "seed_mean_scores",
    "select_grid_point",
    "selection_jobs",
    "shared_key",
    "significance_reading",
    "significance_table",
    "test_jobs",
    "variant_configs",
    "write_comparison",
]
