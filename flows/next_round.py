"""Continue a run by one round, as the Prefect flow `fire-mpo-next-round`.

    python -m flows.next_round --config configs/default.yaml [--store DIR] [--run NAME]

It reads the highest round with a finished `train` output of the configured run in the store (0
when there is none) and runs the full cycle (`flows/full_cycle.py`) with `rounds` = that + 1.
Every earlier stage has the same content key as before, so it is `Cached` and only the new
round is computed. This holds for an unchanged config: after a config edit the earlier stages
get new keys and are recomputed first, which is what the content-keyed store is for. It
refuses to go past `loop.max_rounds` (a log line, no work, returns None): the automation that
calls it after an improving round relies on that bound. Each round's adapter is offered for
`<store>/<run>/best` after its evaluation, as in the full cycle.

Deployed as `fire-mpo/next-round` with an inactive schedule (see `deployments/register.py`):
activate it to add one round per period. `next_round_as_fire_mpo` below is this flow under the
pipeline's flow name, so the deployment id reads `fire-mpo/next-round`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Annotated

from prefect import flow, get_run_logger
from pydantic import Field

from fire_mpo_core.config import load_config
from fire_mpo_core.store import ArtifactStore
from flows.full_cycle import (
    _Runner,
    announce_decision,
    load_cycle_config,
    publish_dashboard,
    report,
    run_cycle,
)
from flows.stage import RUN_PATTERN


def rounds_done(store: Path, run: str) -> int:
    """The highest round with a finished `train` output of `run` (0: none yet)."""
    return ArtifactStore(store).latest_round(run, "train") or 0


@flow(name="fire-mpo-next-round")
def next_round(
    config: str = "configs/default.yaml",
    store: str | None = None,
    run: Annotated[str, Field(pattern=RUN_PATTERN)] | None = None,
    refresh: bool = False,
    after_round: Annotated[int, Field(ge=0)] | None = None,
) -> str | None:
    """Run the full cycle with one round more than the store holds; returns metrics.json.

    Args:
        config: YAML cycle config; relative paths are relative to the checkout.
        store: Override the artifact store folder of the config.
        run: Override the run name of the config.
        refresh: Recompute every stage, not only the new round's.
        after_round: Set by the loop's automation: the round whose `continue` decision asked
            for this run. When the store holds another number of trained rounds (a duplicate
            or stale event: another run already took that step), nothing is run.
    """
    cfg = load_cycle_config(config, store=store, run=run)
    done = rounds_done(cfg.store, cfg.run)
    if after_round is not None and after_round != done:
        get_run_logger().warning(
            f"Run {cfg.run!r} in {cfg.store}: asked to continue after round {after_round}, "
            f"but {done} round(s) are trained: that step was taken already, nothing to do"
        )
        return None
    if done >= cfg.loop.max_rounds:
        get_run_logger().warning(
            f"Run {cfg.run!r} in {cfg.store}: {done} round(s) done, loop.max_rounds is "
            f"{cfg.loop.max_rounds}: no round added"
        )
        return None
    cfg.rounds = done + 1
    get_run_logger().info(
        f"Run {cfg.run!r} in {cfg.store}: {done} round(s) done, running round {cfg.rounds}"
    )
    runner = _Runner(cfg, refresh, config_path=config)
    evaluation = run_cycle(cfg, runner, runner.promote)
    publish_dashboard(cfg, runner)
    announce_decision(cfg, runner, config, evaluation)
    return report(evaluation)


#: The same flow under the pipeline's flow name: its deployment reads `fire-mpo/next-round`.
next_round_as_fire_mpo = next_round.with_options(name="fire-mpo")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m flows.next_round", description=__doc__.split("\n")[0]
    )
    p.add_argument("--config", default="configs/default.yaml", help="YAML cycle config")
    p.add_argument("--store", help="override the artifact store folder")
    p.add_argument("--run", help="override the run name")
    p.add_argument("--refresh", action="store_true", help="recompute even cached stages")
    args = p.parse_args(argv)
    try:
        load_config(args.config)  # fail fast, before any Prefect machinery starts
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    metrics = next_round(config=args.config, store=args.store, run=args.run, refresh=args.refresh)
    if metrics:
        print(f"\nReport:  {Path(metrics).parent / 'report.md'}\nMetrics: {metrics}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
