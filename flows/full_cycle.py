"""The full FiRe-MPO cycle as the Prefect flow `fire-mpo`.

    python -m flows.full_cycle --config configs/default.yaml [--rounds N] [--stages a,b]
                               [--store DIR] [--run NAME] [--refresh]

Without `PREFECT_API_URL` Prefect runs it on a temporary local API (no server to start). The flow
only sequences stage tasks; each task reads and writes the artifact store and returns a folder
path. `--stages` runs only the named stages: the outputs of the others are looked up in the store
under the keys the current config gives them, and a missing one is a clear error.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from prefect import flow
from prefect.tasks import Task

from fire_mpo_core.config import STAGES, CycleConfig, StageName, load_config
from fire_mpo_core.store import is_finished
from tasks.common import StageCall, bind
from tasks.evaluate import evaluate
from tasks.prepare import prepare
from tasks.sft import sft

TASKS: dict[str, Task[[StageCall], str]] = {"prepare": prepare, "sft": sft, "evaluate": evaluate}


class _Runner:
    """Runs a stage task, or resolves its existing output when the stage is not selected."""

    def __init__(self, cfg: CycleConfig, refresh: bool):
        self.cfg, self.refresh = cfg, refresh
        self.selected = set(cfg.stages or STAGES)

    def __call__(
        self, stage: StageName, round_: int, config: dict[str, Any], inputs: dict[str, str | None]
    ) -> str | None:
        """The stage's output folder; None when it is neither selected nor already built."""
        missing = [name for name, path in inputs.items() if path is None]
        if missing:
            if stage in self.selected:
                raise RuntimeError(
                    f"stage {stage!r} (round {round_}) needs {missing}, which are neither "
                    "selected nor in the store for this config: add them to --stages"
                )
            return None
        call = StageCall(
            store=self.cfg.store,
            run=self.cfg.run,
            round=round_,
            stage=stage,
            config=config,
            inputs={k: Path(v) for k, v in inputs.items()},
            refresh=self.refresh,
        )
        task = TASKS[stage]
        if stage in self.selected:
            return bind(task, self.cfg.store)(call)
        out = call.output_dir(task.cache_policy.code)
        return str(out) if is_finished(out) else None


@flow(name="fire-mpo", log_prints=True)
def fire_mpo(
    config: str = "configs/default.yaml",
    rounds: int | None = None,
    stages: list[StageName] | None = None,
    store: str | None = None,
    run: str | None = None,
    refresh: bool = False,
) -> str | None:
    """Prepare data and base model, warm-start it, then evaluate; returns the metrics path."""
    overrides: dict[str, Any] = {}
    for key, value in (("rounds", rounds), ("stages", stages), ("store", store), ("run", run)):
        if value is not None:
            overrides[key] = value
    cfg = load_config(config, overrides)
    cfg.store = cfg.store.resolve()
    stage = _Runner(cfg, refresh)
    dtype = cfg.model.dtype

    data = stage(
        "prepare",
        0,
        {"data": cfg.data.model_dump(mode="json"), "model": cfg.model.model_dump(mode="json")},
        {},
    )
    base = stage("sft", 0, {"sft": cfg.sft.model_dump(mode="json"), "dtype": dtype},
                 {"prepare": data})
    report = stage(
        "evaluate",
        0,
        {"evaluate": cfg.evaluate.model_dump(mode="json"), "dtype": dtype},
        {"prepare": data, "policy": base},
    )
    if report is None:
        print("Evaluation was not run (not among the selected stages).")
        return None
    metrics = str(Path(report) / "metrics.json")
    print(f"Report: {Path(report) / 'report.md'}\nMetrics: {metrics}")
    return metrics


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m flows.full_cycle", description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/default.yaml", help="YAML cycle config")
    p.add_argument("--rounds", type=int, help="override `rounds`")
    p.add_argument("--stages", help=f"comma-separated subset of: {','.join(STAGES)}")
    p.add_argument("--store", help="override the artifact store folder")
    p.add_argument("--run", help="override the run name")
    p.add_argument("--refresh", action="store_true", help="recompute even cached stages")
    args = p.parse_args(argv)
    if args.stages:
        names = [s.strip() for s in args.stages.split(",") if s.strip()]
        unknown = [s for s in names if s not in STAGES]
        if unknown:
            p.error(f"--stages: unknown stage(s) {unknown}; known: {', '.join(STAGES)}")
        args.stages = names
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        load_config(args.config)  # fail fast, before any Prefect machinery starts
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    fire_mpo(
        config=args.config,
        rounds=args.rounds,
        stages=args.stages,
        store=args.store,
        run=args.run,
        refresh=args.refresh,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
