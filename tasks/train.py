"""Stage `train`: preference optimisation (FiRe-MPO by default) of a LoRA adapter.

Inputs `prepare` (images), `corrupt` (pairs with v'), `reference` (per-round reference
log-probs) and `policy` (round 1: the SFT base; round k: round k-1's adapter, trained further);
with `loop.reference: previous_round` from round 2 on, `reference_policy` (round k-1's policy,
whose adapter the trainer loads frozen as the in-step reference).
Output `adapter/` (PEFT safetensors), `metrics.jsonl`, TensorBoard events, `policy.json`.
The working folder is resumable: a retried or restarted run continues from its last
checkpoint, never from step 0.

Health (`train.health`, :mod:`fire_mpo_core.training.health`): the pairs' diagnostics are
checked before any compute and the training log's after; each crossed threshold is one warning
line, or the stage's failure with `train.health.fail`. The numbers go to `health.json`, a last
`{"kind": "health"}` record in `metrics.jsonl` and the `health/*` counts.

`train.num_processes: N > 1` runs the trainer data-parallel through `accelerate launch`
(:mod:`fire_mpo_core.training.launch`): the ranks' log lines go to this task's log, rank 0's
per-step progress to the progress artifact, and a failing rank fails the task with its
traceback.
"""

from __future__ import annotations

from prefect import get_run_logger

from fire_mpo_core.faults import fault_point
from fire_mpo_core.policy import read_policy, write_policy
from fire_mpo_core.store import DATA, StageWriter
from fire_mpo_core.training.config import TrainConfig
from fire_mpo_core.training.health import HealthCheckFailed, RoundHealth
from fire_mpo_core.training.job import TrainJob
from fire_mpo_core.training.launch import launch_training
from fire_mpo_core.training.preference import train_preference
from tasks.common import Progress, StageCall, retry_condition, stage_task, task_logger
from tasks.reference import reference_adapter


def _job(call: StageCall, cfg: TrainConfig, out_dir) -> TrainJob:
    policy = read_policy(call.inputs["policy"])
    return TrainJob(
        policy=policy,
        pairs_path=call.inputs["corrupt"],
        image_root=call.inputs["prepare"],
        corrupt_root=call.inputs["corrupt"],
        reference_path=call.inputs["reference"],
        reference_adapter=reference_adapter(call, policy),
        cfg=cfg,
        out_dir=out_dir,
    )


def body(call: StageCall, w: StageWriter) -> dict:
    cfg = TrainConfig.model_validate(call.config["train"])
    health = RoundHealth(
        cfg.health, call.round, call.inputs["policy"], warn=task_logger("train").warning
    )
    health.check_pairs(call.inputs["corrupt"] / DATA)  # before any compute: may fail the stage
    progress = Progress(f"train, round {call.round}: optimizer steps")

    def on_step(step: int, total: int, metrics: dict) -> None:
        progress(step, total)
        fault_point("train.step")  # crash-safety tests kill here (no-op unless set)

    job = _job(call, cfg, w.path)
    if cfg.num_processes > 1:
        out = launch_training(job, on_step=on_step, on_line=get_run_logger().info)
    else:
        out = train_preference(job, on_step=on_step)
    for r in out.rejects:
        w.reject(r["id"], r["reason"])
    # Paths relative to this stage folder (the working folder is renamed into place later).
    write_policy(w.path, out.policy.relative_to(w.path))
    return {
        "steps": out.steps,
        "pairs": out.pairs,
        "pairs_per_s": out.pairs_per_s,
        "resumed_from_step": out.resumed_from_step,
        **{k: v for k, v in out.final_metrics.items() if k != "step"},
        **health.finish(w.path),  # may fail the stage (train.health.fail)
    }


def _worth_retrying(task, run, state) -> bool:
    """A failed health check fails the same way again: no retry (a retry would retrain)."""
    if isinstance(state.data, HealthCheckFailed):
        return False
    return retry_condition(resumable=True)(task, run, state)


train = stage_task(
    "train",
    body,
    retries=2,
    retry_delay_seconds=[10, 30],
    tags=["compute"],
    resumable=True,
).with_options(retry_condition_fn=_worth_retrying)
