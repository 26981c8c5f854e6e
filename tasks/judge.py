"""Stage `judge`: minimal-edit chosen/rejected pairs with span masks from the rollouts.

Inputs `prepare` (records: references and answer vocabulary) and `sample` (rollouts). Output
`data.jsonl` of `PreferencePair` rows; every rollout that gives no valid pair is in
`rejects.jsonl` with its id, a reason code and the reason.

With `judge.shards: N > 1` the rollouts are split into N contiguous shards judged by parallel
`judge-shard` tasks (:mod:`tasks.shards`: threads, or Dask) and merged in shard order; the output
is byte-identical to the unsharded run.

The working folder is resumable: judged rollouts go to a journal as they are judged, so a
retried or restarted stage does not ask an LLM judge again for what it already answered. An LLM
judge's requests, retries, tokens, journal hits and estimated cost are in the counts (``llm_*``).
The work is :func:`fire_mpo_core.judge.stage.run_judge`; this task resolves, calls, returns.
"""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from fire_mpo_core.data.records import Rollout, VQARecord
from fire_mpo_core.judge import JudgeConfig, Judged, judge_shard, merge_judged
from fire_mpo_core.judge.stage import JOURNAL, JudgeAll, JudgeInputs, run_judge
from fire_mpo_core.store import StageWriter
from tasks.common import Progress, StageCall, stage_task
from tasks.shards import run_shards, shard_bounds

__all__ = ["JOURNAL", "body", "judge", "judge_shard_task"]


@task(
    name="judge-shard",
    task_run_name="judge-shard-{index}",
    cache_policy=NO_CACHE,  # the stage folder is the cache; shard results live in memory
    persist_result=False,
    retries=2,
    retry_delay_seconds=[10, 60],
)
def judge_shard_task(
    index: int, config: JudgeConfig, records: list[VQARecord], rollouts: list[Rollout]
) -> Judged:
    """One shard of the judge stage (``index`` only names the task run)."""
    return judge_shard(config, records, rollouts)


def _sharded(cfg: JudgeConfig) -> JudgeAll | None:
    """The stage's `judge_all`: None (judged in this task), or split over `judge-shard` tasks."""
    if cfg.shards == 1:
        return None

    def run(cfg: JudgeConfig, records: list[VQARecord], todo: list[Rollout]) -> Judged:
        params = [
            {"index": i, "config": cfg, "records": records, "rollouts": todo[a:b]}
            for i, (a, b) in enumerate(shard_bounds(len(todo), cfg.shards))
        ]
        return merge_judged(run_shards(judge_shard_task, params))

    return run


def body(call: StageCall, w: StageWriter) -> dict:
    cfg = JudgeConfig.model_validate(call.config["judge"])
    inputs = JudgeInputs(prepare=call.inputs["prepare"], sample=call.inputs["sample"])
    progress = Progress(f"judge, round {call.round}: rollouts")
    counts = run_judge(inputs, cfg, w.path, w.reject, w.scratch, _sharded(cfg), progress)
    return counts.as_counts()


judge = stage_task(
    "judge",
    body,
    retries=2,
    retry_delay_seconds=[10, 60],
    resumable=True,
)
