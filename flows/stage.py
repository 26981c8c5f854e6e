"""Rerun ONE stage of one round as the Prefect flow `fire-mpo-stage`.

    python -m flows.stage --stage evaluate [--round K] --config configs/default.yaml
                          [--store DIR] [--run NAME] [--refresh]

The flow walks the same DAG as `fire-mpo` (`flows/full_cycle.py`) with the same `_Runner`, but
selects only (`stage`, `round`): every other stage's output is looked up in the store under the
key the current config gives it, exactly as `fire-mpo --stages` does, and a missing input is a
clear error. Without `round` it reruns the latest round that has a finished output of the stage
(0 for `prepare` and `sft`). The task is content-cached like any other: it is `Cached` when its
output already exists, unless `refresh` forces it to be rebuilt.

Deployed as `fire-mpo/stage-<name>` (see `deployments/register.py`): `stage_as_fire_mpo` below is
this flow under the pipeline's flow name, so the deployment ids read `fire-mpo/...`.
"""

from __future__ import annotations

import argparse
import sys
from typing import Annotated

from prefect import flow, get_run_logger
from pydantic import Field

from fire_mpo_core.config import SETUP_STAGES, STAGES, StageName, load_config
from fire_mpo_core.store import ArtifactStore
from flows.full_cycle import _Runner, load_cycle_config, run_cycle
from flows.remote import check_shared_store

RUN_PATTERN = r"^[A-Za-z0-9_.-]+$"  # the same as CycleConfig.run


def first_round(stage: StageName) -> int:
    """The first round a stage exists in: 0 for the setup stages and evaluate (the SFT base)."""
    return 0 if stage in SETUP_STAGES or stage == "evaluate" else 1


def check_round(stage: StageName, round_: int) -> None:
    """Raise ValueError unless `stage` exists in round `round_`."""
    if stage in SETUP_STAGES and round_ != 0:
        raise ValueError(f"stage {stage!r} runs once per cycle, in round 0 (got round {round_})")
    if round_ < first_round(stage):
        raise ValueError(f"stage {stage!r} runs in rounds >= {first_round(stage)} (got {round_})")


def target_round(stage: StageName, round_: int | None, store: ArtifactStore, run: str) -> int:
    """The round to rerun: `round_` if given (checked), else the latest one with a finished
    output of `stage` in the store, else the stage's first round."""
    if round_ is None:
        latest = store.latest_round(run, stage)
        return first_round(stage) if latest is None else latest
    check_round(stage, round_)
    return round_


@flow(name="fire-mpo-stage")
def rerun_stage(
    stage: StageName,
    round: Annotated[int, Field(ge=0)] | None = None,
    config: str = "configs/default.yaml",
    store: str | None = None,
    run: Annotated[str, Field(pattern=RUN_PATTERN)] | None = None,
    refresh: bool = False,
    store_id: str | None = None,
) -> str:
    """Rerun one stage of one round; its inputs come from the store. Returns its output folder.

    Args:
        stage: The stage to rerun: prepare, sft, sample, judge, corrupt, reference, train,
            evaluate.
        round: The round to rerun it for (setup stages: 0). Default: the latest round with a
            finished output of this stage in the store.
        config: YAML cycle config; relative paths are relative to the checkout.
        store: Override the artifact store folder of the config.
        run: Override the run name of the config.
        refresh: Recompute the stage even if its output for these inputs exists.
        store_id: Set by a full cycle that runs this stage on another work pool: the id the
            store must have here (the same store, mounted on both machines).
    """
    cfg = load_cycle_config(config, store=store, run=run)
    if store_id is not None:
        check_shared_store(cfg.store, store_id)
    # This flow is where a remote stage runs: it must not dispatch the stage again.
    cfg.remote_stages = {}
    k = target_round(stage, round, ArtifactStore(cfg.store), cfg.run)
    # Walk the DAG only up to round k; only (stage, k) is built, the rest is read from the store.
    cfg.rounds, cfg.stages = k, [stage]
    runner = _Runner(
        cfg, refresh, rounds={k}, hint="run the full cycle (or those stages) for this round first"
    )
    # A rerun train or evaluate of round k re-offers round k for `best` (never backwards); a
    # stage run for a remote full cycle leaves that to the cycle.
    promote = None
    if store_id is None and stage in ("train", "evaluate"):
        promote = lambda r, t, e: runner.promote(r, t, e) if r == k else None  # noqa: E731
    run_cycle(cfg, runner, promote)
    out = runner.outputs[(stage, k)]
    assert out is not None  # a selected stage either returns its folder or raises
    get_run_logger().info(f"Stage {stage!r}, round {k}: {out}")
    return out


#: The same flow under the pipeline's flow name: its deployments read `fire-mpo/stage-<name>`.
stage_as_fire_mpo = rerun_stage.with_options(name="fire-mpo")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m flows.stage", description=__doc__.split("\n")[0])
    p.add_argument("--stage", required=True, choices=STAGES, help="the stage to rerun")
    p.add_argument("--round", type=int, help="the round (default: the latest built one)")
    p.add_argument("--config", default="configs/default.yaml", help="YAML cycle config")
    p.add_argument("--store", help="override the artifact store folder")
    p.add_argument("--run", help="override the run name")
    p.add_argument("--refresh", action="store_true", help="recompute even if cached")
    args = p.parse_args(argv)
    try:  # fail fast, before any Prefect machinery starts
        load_config(args.config)
        if args.round is not None:
            check_round(args.stage, args.round)
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    out = rerun_stage(
        stage=args.stage,
        round=args.round,
        config=args.config,
        store=args.store,
        run=args.run,
        refresh=args.refresh,
    )
    print(f"\nOutput: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
