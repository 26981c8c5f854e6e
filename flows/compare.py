"""The paper's comparison (methods, ablations, seeds) as a Prefect flow, deployed as
`fire-mpo/compare`.

    python -m flows.compare --config configs/compare.yaml [--seeds 0,1,2] [--methods dpo,fire_mpo]
                            [--quick] [--store DIR] [--run NAME] [--refresh]

Sequencing only: the setup stages of one round (prepare, sft, evaluate r0, sample, judge,
corrupt, reference) run once through the same `_Runner` / `run_cycle` as `fire-mpo`, so their
keys are the full cycle's and they are cached; then for each variant of the config's `compare:`
section and each seed, a `train` and an `evaluate` stage call in round 1 with the variant's train
config (corruption-kind variants first get their own `corrupt` + `reference`). Every call is
content-keyed: a rerun trains only what is missing. The table, plots and report come from
`fire_mpo_core.compare.write_comparison` into `<store>/<run>/compare/<name>/`, and the report is
published as a Prefect markdown artifact. `--quick` is a smoke run: the first seed only and
`train.max_steps: 10` for every variant (its own folder name, `<name>-quick`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

# As in flows/full_cycle.py, before Prefect reads its settings: a loaded 2-core machine can take
# longer than the default 20 s to start the temporary API.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from fire_mpo_core.compare import (
    CompareSpec,
    Job,
    RunResult,
    load_compare,
    narrow,
    run_average,
    select_grid_point,
    selection_jobs,
    shared_key,
    test_jobs,
    variant_configs,
    write_comparison,
)
from fire_mpo_core.config import CycleConfig, StageName
from fire_mpo_core.corruption.config import CorruptConfig
from fire_mpo_core.training.config import ReferenceConfig, TrainConfig
from flows.full_cycle import TASKS, _Runner, run_cycle
from tasks.common import StageCall, artifact_key, bind

#: Round-1 stages the comparison calls itself, once per variant (the cycle's own are skipped).
PER_VARIANT: tuple[StageName, ...] = ("train", "evaluate")


class _SetupRunner(_Runner):
    """`_Runner` that builds every stage of the cycle but round 1's train and evaluate."""

    def is_selected(self, stage: StageName, round_: int) -> bool:
        return not (round_ >= 1 and stage in PER_VARIANT)


def _dump(model: Any) -> dict[str, Any]:
    return model.model_dump(mode="json")


class _ComparisonStages:
    """Calls the comparison's own stages on top of the cached setup: per seed its pairs
    (resample), per (pairs, corrupt, reference settings) one corrupt + reference, per job one
    train + evaluate. Every call is content-keyed, so a rerun computes only what is missing."""

    def __init__(self, cfg: CycleConfig, spec: CompareSpec, runner: _Runner, refresh: bool):
        self.cfg, self.spec, self.runner, self.refresh = cfg, spec, runner, refresh
        out = runner.outputs
        self.data, self.sft, self.eval0 = out[("prepare", 0)], out[("sft", 0)], out[("evaluate", 0)]
        self.judge = out[("judge", 1)]
        assert self.data and self.sft and self.eval0 and self.judge  # built by the setup runner
        base = (self.judge, shared_key(cfg.train, cfg.corrupt))
        self.shared: dict[tuple[str, str], tuple[str, str]] = {
            base: (out[("corrupt", 1)], out[("reference", 1)])  # type: ignore[dict-item]
        }
        self.pairs_of: dict[int, str] = {}
        dtype = cfg.model.dtype
        self.test_eval = {"evaluate": _dump(cfg.evaluate), "dtype": dtype}
        val = cfg.evaluate.model_copy(update={"split": "val"})
        self.val_eval = {"evaluate": _dump(val), "dtype": dtype}
        self.train_t = bind(TASKS["train"], cfg.store)
        self.eval_t = bind(TASKS["evaluate"], cfg.store)

    def resample_pairs(self) -> dict[int, str]:
        """Per seed its own on-policy pairs: sample -> judge with sample.seed = seed (the
        cycle's own seed reuses the setup's pairs)."""
        for seed in self.spec.seeds:
            if not self.spec.resample or seed == self.cfg.sample.seed:
                self.pairs_of[seed] = self.judge
                continue
            sample_cfg = {
                "sample": _dump(self.cfg.sample.model_copy(update={"seed": seed})),
                "dtype": self.cfg.model.dtype,
            }
            rollouts = self.runner(
                "sample", 1, sample_cfg, {"prepare": self.data, "policy": self.sft}
            )
            pairs = self.runner(
                "judge",
                1,
                {"judge": _dump(self.cfg.judge)},
                {"prepare": self.data, "sample": rollouts},
            )
            assert rollouts and pairs
            self.pairs_of[seed] = pairs
        return self.pairs_of

    def corrupt_and_reference(
        self, pairs: str, train_cfg: TrainConfig, corrupt_cfg: CorruptConfig
    ) -> tuple[str, str]:
        key = (pairs, shared_key(train_cfg, corrupt_cfg))
        if key not in self.shared:
            corrupted = self.runner(
                "corrupt",
                1,
                {"corrupt": _dump(corrupt_cfg)},
                {"prepare": self.data, "judge": pairs},
            )
            ref = self.runner(
                "reference",
                1,
                {"reference": _dump(ReferenceConfig.for_training(train_cfg))},
                {"prepare": self.data, "corrupt": corrupted, "policy": self.sft},
            )
            assert corrupted and ref
            self.shared[key] = (corrupted, ref)
        return self.shared[key]

    def run_jobs(self, jobs: list[Job], evaluation: dict[str, Any]) -> list[tuple[Job, str, str]]:
        """Train then evaluate each job, in waves of `workers` (an evaluation's key needs its
        finished train folder's content digest)."""
        log = get_run_logger()
        done: list[tuple[Job, str, str]] = []
        for i in range(0, len(jobs), self.spec.workers):
            wave = jobs[i : i + self.spec.workers]
            trains = []
            for job in wave:
                pairs = self.pairs_of[job.pairs_seed]
                corrupted, ref = self.corrupt_and_reference(pairs, job.train, job.corrupt)
                inputs = {
                    "prepare": self.data,
                    "corrupt": corrupted,
                    "reference": ref,
                    "policy": self.sft,
                }
                call = _call(self.cfg, "train", {"train": _dump(job.train)}, inputs, self.refresh)
                trains.append(self.train_t.submit(call))
            train_dirs = [f.result() for f in trains]
            evals = [
                self.eval_t.submit(
                    _call(
                        self.cfg,
                        "evaluate",
                        evaluation,
                        {"prepare": self.data, "policy": td, "previous": self.eval0},
                        self.refresh,
                    )
                )
                for td in train_dirs
            ]
            for job, td, ev in zip(wave, train_dirs, evals, strict=True):
                done.append((job, td, ev.result()))
                log.info(f"{job.variant} seed {job.train.seed} {job.point}: {ev.result()}")
        return done

    def select_on_val(
        self, variants: dict[str, tuple[TrainConfig, CorruptConfig]], points: list[dict]
    ) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
        """Grid search on the validation split, the same points for every variant, first
        seed. Returns (chosen point per variant, the selection record for the summary)."""
        spec = self.spec
        scores: dict[str, dict[int, float | None]] = {}
        jobs = selection_jobs(variants, points, spec.seeds[0])
        for job, _, ev in self.run_jobs(jobs, self.val_eval):
            m = json.loads((Path(ev) / "metrics.json").read_text())
            sc = run_average(m, spec.average) if spec.select == "average" else m.get(spec.select)
            scores.setdefault(job.variant, {})[job.index] = sc
        chosen = select_grid_point(scores, points)
        selection = {
            n: {"chosen": chosen[n], "val_scores": {str(points[i]): v for i, v in sc.items()}}
            for n, sc in scores.items()
        }
        return chosen, selection


@flow(name="fire-mpo-compare")
def compare(
    config: str = "configs/compare.yaml",
    seeds: list[int] | None = None,
    methods: list[str] | None = None,
    quick: bool = False,
    store: str | None = None,
    run: str | None = None,
    refresh: bool = False,
) -> str:
    """Train and evaluate every (variant, seed) from one SFT base and one set of pairs, then
    write the comparison table, plots and report. Returns the report.md path.

    Args:
        config: compare YAML (a cycle config with a `compare:` section; see configs/compare.yaml).
        seeds: Override compare.seeds.
        methods: Only these variants (names from compare.variants).
        quick: Smoke run: first seed, 10 training steps per variant, output `<name>-quick`.
        store: Override the artifact store folder.
        run: Override the run name.
        refresh: Recompute the per-variant train and evaluate stages even if cached.
    """
    log = get_run_logger()
    t0 = time.monotonic()
    cfg, spec = load_compare(config, store=store, run=run)
    spec = narrow(spec, seeds, methods, quick)
    cfg.remote_stages = {}  # the comparison runs every stage in this flow run
    cfg.rounds, cfg.stages = 1, None
    runner = _SetupRunner(cfg, refresh=False)
    run_cycle(cfg, runner)
    stages = _ComparisonStages(cfg, spec, runner, refresh)
    setup_s = time.monotonic() - t0
    log.info(f"Setup stages ready in {setup_s:.0f} s; {len(spec.variants)} variants x {spec.seeds}")
    pairs_of = stages.resample_pairs()

    variants = variant_configs(cfg, spec)
    points = spec.grid_points()
    chosen: dict[str, dict[str, Any]] = {name: {} for name in variants}
    selection: dict[str, dict[str, Any]] = {}
    t1 = time.monotonic()
    if len(points) > 1:
        chosen, selection = stages.select_on_val(variants, points)
        log.info(f"Grid selected on val by {spec.select}: {chosen}")
    select_s = time.monotonic() - t1

    results = [
        RunResult(variant=job.variant, seed=job.train.seed, train_dir=Path(td), eval_dir=Path(ev))
        for job, td, ev in stages.run_jobs(
            test_jobs(variants, chosen, spec.seeds), stages.test_eval
        )
    ]
    runs_s = time.monotonic() - t1 - select_s

    out_dir = Path(cfg.store) / cfg.run / "compare" / spec.name
    details = {
        "config": config,
        "store": str(cfg.store),
        "run": cfg.run,
        "setup_seconds": round(setup_s, 1),
        "grid_selection_seconds": round(select_s, 1),
        "train_evaluate_seconds": round(runs_s, 1),
        "resample": spec.resample,
        "grid": spec.grid,
        "selection": selection,
        "workers": spec.workers,
        "sft_base": stages.sft,
        "pairs": pairs_of,
    }
    write_comparison(results, spec, out_dir, base_eval=stages.eval0, details=details)
    create_markdown_artifact(
        (out_dir / "report.md").read_text(),
        key=artifact_key(f"{cfg.run}-compare-{spec.name}"),
        description=f"Comparison `{spec.name}` of run `{cfg.run}`",
    )
    log.info(f"Comparison report: {out_dir / 'report.md'}")
    return str(out_dir / "report.md")


def _call(
    cfg: CycleConfig, stage: StageName, config: dict, inputs: dict[str, str], refresh: bool
) -> StageCall:
    return StageCall(
        store=cfg.store,
        run=cfg.run,
        round=1,
        stage=stage,
        config=config,
        inputs={k: Path(v) for k, v in inputs.items()},
        refresh=refresh,
        threads=cfg.num_threads,
    )


#: The same flow under the pipeline's flow name: its deployment reads `fire-mpo/compare`.
compare_as_fire_mpo = compare.with_options(name="fire-mpo")


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.compare", description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/compare.yaml", help="compare YAML")
    p.add_argument("--seeds", type=_ints, help="comma-separated seeds (override compare.seeds)")
    p.add_argument("--methods", help="comma-separated variant names (default: all)")
    p.add_argument("--quick", action="store_true", help="smoke run: 1 seed, 10 steps each")
    p.add_argument("--store", help="override the artifact store folder")
    p.add_argument("--run", help="override the run name")
    p.add_argument("--refresh", action="store_true", help="retrain even cached variants")
    args = p.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else None
    try:  # fail fast, before any Prefect machinery starts
        _, spec = load_compare(args.config, store=args.store, run=args.run)
        spec = narrow(spec, args.seeds, methods, args.quick)
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    report = compare(
        config=args.config,
        seeds=args.seeds,
        methods=methods,
        quick=args.quick,
        store=args.store,
        run=args.run,
        refresh=args.refresh,
    )
    print(f"\nReport: {report}\nTable:  {Path(report).parent / 'table.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
