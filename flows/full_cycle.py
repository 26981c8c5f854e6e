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
import os
import sys
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Annotated, Any

if __name__ == "__main__" and not os.environ.get("FIRE_MPO_SUPERVISED"):
    # In a terminal: the config and store checks and the Ctrl-C supervisor (flows/cli.py), in
    # about a second, before the imports below (~15 s) start.
    from flows.cli import cycle_entry

    sys.exit(cycle_entry(sys.argv[1:]))

# A loaded 2-core machine can take longer than Prefect's default 20 s to start the temporary API.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # per-load bars drown the stage logs
# Concurrency leases on disk (PREFECT_HOME/concurrency_leases), not in the API process's memory:
# a killed run's lease then outlives its temporary API and the next start can reclaim it
# (tasks/runs.py). `make serve` starts its server with the same setting.
os.environ.setdefault(
    "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE",
    "prefect.server.concurrency.lease_storage.filesystem",
)
if os.environ.get("PREFECT_HOME"):  # Prefect creates only the last level; its DB then fails
    Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)

from prefect import flow, get_run_logger
from prefect.tasks import Task
from pydantic import Field

from fire_mpo_core.config import (
    REAL_DATA_REJECT_BUDGET,
    STAGES,
    CycleConfig,
    StageName,
    load_config,
)
from fire_mpo_core.store import is_finished
from fire_mpo_core.training.config import ReferenceConfig
from flows.cli import check_store, cycle_parser
from flows.remote import run_remote, store_id
from tasks import runs
from tasks.common import StageCall, run_stage_task
from tasks.corrupt import corrupt
from tasks.dashboard import dashboard
from tasks.evaluate import evaluate
from tasks.events import emit_loop_decision
from tasks.judge import judge
from tasks.prepare import prepare
from tasks.promote import promote_round
from tasks.reference import reference
from tasks.sample import sample
from tasks.sft import sft
from tasks.train import train

TASKS: dict[str, Task[[StageCall], str]] = {
    "prepare": prepare,
    "sft": sft,
    "sample": sample,
    "judge": judge,
    "corrupt": corrupt,
    "reference": reference,
    "train": train,
    "evaluate": evaluate,
}


class _Runner:
    """Runs a stage task, or resolves its existing output when the stage is not selected.

    `rounds` narrows the selection to those rounds (None: every round), so a single-stage rerun
    (`flows/stage.py`) walks the same DAG but builds only one (stage, round). Every resolved or
    built output is kept in `outputs`, keyed by (stage, round).
    """

    def __init__(
        self,
        cfg: CycleConfig,
        refresh: bool,
        rounds: Collection[int] | None = None,
        hint: str = "add them to --stages",
        config_path: str | None = None,
    ):
        self.cfg, self.refresh = cfg, refresh
        # The YAML the remote stage flows reload (they get the same store and run name).
        self.config_path = config_path
        if cfg.remote_stages:
            if config_path is None:
                raise ValueError("remote_stages needs the config's path, to pass it on")
            store_id(cfg.store, create=True)
        self.selected = set(cfg.stages or STAGES)
        self.rounds = None if rounds is None else set(rounds)
        self.hint = hint
        self.outputs: dict[tuple[StageName, int], str | None] = {}
        self.loop: dict[int, dict] = {}  # round -> {"decision", "promotion"} (tasks/promote.py)

    def promote(self, round_: int, train: str | None, evaluation: str | None) -> None:
        """After round k's evaluation: offer its adapter for `<store>/<run>/best`; skipped
        when either folder is missing (`--stages` without them, nothing in the store)."""
        if train is None or evaluation is None:
            return
        self.loop[round_] = promote_round(
            str(self.cfg.store),
            self.cfg.run,
            round_,
            train,
            evaluation,
            self.cfg.loop.model_dump(mode="json"),
        )

    def is_selected(self, stage: StageName, round_: int) -> bool:
        return stage in self.selected and (self.rounds is None or round_ in self.rounds)

    def __call__(
        self, stage: StageName, round_: int, config: dict[str, Any], inputs: dict[str, str | None]
    ) -> str | None:
        """The stage's output folder; None when it is neither selected nor already built."""
        out = self._resolve(stage, round_, config, inputs)
        self.outputs[(stage, round_)] = out
        return out

    def _resolve(
        self, stage: StageName, round_: int, config: dict[str, Any], inputs: dict[str, str | None]
    ) -> str | None:
        selected = self.is_selected(stage, round_)
        missing = [name for name, path in inputs.items() if path is None]
        if missing:
            if selected:
                raise RuntimeError(
                    f"stage {stage!r} (round {round_}) needs {missing}, which are neither "
                    f"selected nor in the store for this config: {self.hint}"
                )
            return None
        budget = self.cfg.max_reject_fraction
        if budget is None and stage == "prepare" and self.cfg.data.path is not None:
            budget = REAL_DATA_REJECT_BUDGET  # real folders: most images missing is an error
        if budget is not None:  # only when set: default keys unchanged
            config = {**config, "max_reject_fraction": budget}
        call = StageCall(
            store=self.cfg.store,
            run=self.cfg.run,
            round=round_,
            stage=stage,
            config=config,
            inputs={k: Path(v) for k, v in inputs.items()},
            refresh=self.refresh,
            threads=self.cfg.num_threads,
        )
        task = TASKS[stage]
        out = call.output_dir(task.cache_policy.code)
        if (
            selected
            and stage in self.cfg.remote_stages
            and not (is_finished(out) and not self.refresh)
        ):
            run_remote(
                self.cfg.remote_stages[stage],
                {
                    "stage": stage,
                    "round": round_,
                    "config": self.config_path,
                    "store": str(self.cfg.store),
                    "run": self.cfg.run,
                    "refresh": self.refresh,
                    "store_id": store_id(self.cfg.store),
                },
                label=f"stage {stage!r} (round {round_})",
            )
            if not is_finished(out):
                raise RuntimeError(
                    f"stage {stage!r} (round {round_}) ran on {self.cfg.remote_stages[stage]} "
                    f"but {out} is not finished: is the config the same on both workers?"
                )
            return str(out)
        if selected:
            if runs.COMPUTE in task.tags:  # Prefect waits for the slot silently: say who has it
                note = runs.explain_wait()
                if note:
                    get_run_logger().warning(f"{stage}-r{round_}: {note}")
            return run_stage_task(task, call)
        return str(out) if is_finished(out) else None


def start_run() -> None:
    """At every flow start: record this process on the flow run, and reclaim what killed runs
    left behind (their "Running" state, their `compute` slot; tasks/runs.py)."""
    from prefect.runtime import flow_run

    runs.claim(flow_run.id)
    runs.reclaim(log=get_run_logger())


def load_cycle_config(
    config: str,
    rounds: Annotated[int, Field(ge=0)] | None = None,
    stages: list[StageName] | None = None,
    store: str | None = None,
    run: str | None = None,
) -> CycleConfig:
    """The validated cycle config with the flow parameters that are set applied over the YAML;
    the store path is made absolute (the worker's and the caller's working directories differ)."""
    overrides: dict[str, Any] = {}
    for key, value in (("rounds", rounds), ("stages", stages), ("store", store), ("run", run)):
        if value is not None:
            overrides[key] = value
    cfg = load_config(config, overrides)
    cfg.store = cfg.store.resolve()
    return cfg


def run_cycle(
    cfg: CycleConfig,
    stage: Callable[[StageName, int, dict[str, Any], dict[str, str | None]], str | None],
    promote: Callable[[int, str | None, str | None], Any] | None = None,
) -> str | None:
    """prepare -> sft -> evaluate, then per round k: sample (from round k-1's policy) -> judge
    -> corrupt -> reference -> train -> evaluate -> ``promote(k, train, evaluation)`` (the
    runner's: `<store>/<run>/best`). Returns the last evaluation folder, or None."""
    dtype = cfg.model.dtype
    section = lambda name: getattr(cfg, name).model_dump(mode="json")  # noqa: E731
    # The reference pass depends only on what scoring needs (max_length, dtype...), not on lr.
    ref_cfg = ReferenceConfig.for_training(cfg.train).model_dump(mode="json")
    eval_cfg = {"evaluate": section("evaluate"), "dtype": dtype}

    prep = {"data": section("data"), "model": section("model")}
    if cfg.data.path is not None:  # a real dataset: its files are an input of the key too
        prep["dataset_fingerprint"] = cfg.data.fingerprint()
    data = stage("prepare", 0, prep, {})
    warm = cfg.sft.vision_warmup.active(
        cfg.model.name_or_path is None, cfg.data.dataset, cfg.model.arch
    )
    sft_cfg = {"sft": section("sft"), "dtype": dtype, "warm_vision": warm}
    policy = stage("sft", 0, sft_cfg, {"prepare": data})
    evaluation = stage("evaluate", 0, eval_cfg, {"prepare": data, "policy": policy})
    for k in range(1, cfg.rounds + 1):
        rollouts = stage(
            "sample",
            k,
            {"sample": section("sample"), "dtype": dtype},
            {"prepare": data, "policy": policy},
        )
        pairs = stage(
            "judge", k, {"judge": section("judge")}, {"prepare": data, "sample": rollouts}
        )
        corrupted = stage(
            "corrupt", k, {"corrupt": section("corrupt")}, {"prepare": data, "judge": pairs}
        )
        # previous_round: round k-1's policy is the reference (round 1's is the SFT base, as
        # with `base`: same inputs, same keys). `base` adds nothing: today's keys.
        anchor = (
            {"reference_policy": policy} if cfg.loop.reference == "previous_round" and k > 1 else {}
        )
        ref = stage(
            "reference",
            k,
            {"reference": ref_cfg},
            {"prepare": data, "corrupt": corrupted, "policy": policy, **anchor},
        )
        policy = stage(
            "train",
            k,
            {"train": section("train")},
            {"prepare": data, "corrupt": corrupted, "reference": ref, "policy": policy, **anchor},
        )
        evaluation = stage(
            "evaluate", k, eval_cfg, {"prepare": data, "policy": policy, "previous": evaluation}
        )
        if promote is not None:
            promote(k, policy, evaluation)
    return evaluation


def publish_dashboard(cfg: CycleConfig, stage: _Runner) -> None:
    """The run's markdown report (metrics and health by round, example pairs) on the dashboard."""
    out = stage.outputs
    evaluations = {k: p for (s, k), p in out.items() if s == "evaluate" and p is not None}
    if not evaluations:
        return
    corrupted = [(k, p) for (s, k), p in out.items() if s == "corrupt" and p is not None]
    dashboard(
        run=cfg.run,
        evaluations=evaluations,
        corrupt=max(corrupted)[1] if corrupted else None,
        prepare=out.get(("prepare", 0)),
        store=str(cfg.store),
        trains={k: p for (s, k), p in out.items() if s == "train" and p is not None},
    )


def report(evaluation: str | None) -> str | None:
    """Log where the report is; the metrics.json path of an evaluation folder (None: none)."""
    if evaluation is None:
        get_run_logger().info("Evaluation was not run (not among the selected stages).")
        return None
    metrics = str(Path(evaluation) / "metrics.json")
    get_run_logger().info(f"Report: {Path(evaluation) / 'report.md'}")
    return metrics


def announce_decision(
    cfg: CycleConfig, runner: _Runner, config: str, evaluation: str | None
) -> None:
    """The loop's decision on the last round this run evaluated (made and logged by its promote
    task) emitted as `fire-mpo.loop.continue` / `fire-mpo.loop.stop` (tasks/events.py): on
    `continue` the
    automation registered by deployments/register.py runs `fire-mpo/next-round`. Only when
    the run evaluated that round itself: a `--stages` run without `evaluate` decides nothing."""
    decided = runner.loop.get(cfg.rounds)
    if evaluation is None or decided is None or not runner.is_selected("evaluate", cfg.rounds):
        return
    emit_loop_decision(cfg.run, cfg.store, config, decided["decision"], evaluation)


@flow(name="fire-mpo")
def fire_mpo(
    config: str = "configs/default.yaml",
    rounds: Annotated[int, Field(ge=0)] | None = None,
    stages: list[StageName] | None = None,
    store: str | None = None,
    run: str | None = None,
    refresh: bool = False,
) -> str | None:
    """prepare -> sft -> evaluate, then per round k: sample (from round k-1's policy) -> judge
    -> corrupt -> reference -> train -> evaluate. Returns the last metrics.json path."""
    cfg = load_cycle_config(config, rounds, stages, store, run)
    start_run()
    runner = _Runner(cfg, refresh, config_path=config)
    evaluation = run_cycle(cfg, runner, runner.promote)
    publish_dashboard(cfg, runner)
    announce_decision(cfg, runner, config, evaluation)
    return report(evaluation)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = cycle_parser()
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
        cfg = load_config(args.config)  # fail fast, before any Prefect machinery starts
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    err = check_store(Path(args.store) if args.store else cfg.store)
    if err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        metrics = fire_mpo(
            config=args.config,
            rounds=args.rounds,
            stages=args.stages,
            store=args.store,
            run=args.run,
            refresh=args.refresh,
        )
    except KeyboardInterrupt:
        # Prefect records an interrupt as Crashed; a user's Ctrl-C is a cancellation. The API is
        # still up (flows/cli.py kept the signal from it), so the states and the slot release
        # reach it. A partial stage folder stays for the rerun to resume or redo.
        if runs.claimed is not None:
            runs.mark_cancelled(runs.claimed)
        print("\nCancelled (Ctrl-C). A rerun resumes from the finished stages.", file=sys.stderr)
        return 130
    if metrics:
        print(f"\nReport:  {Path(metrics).parent / 'report.md'}\nMetrics: {metrics}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
