"""Stage `judge`: minimal-edit chosen/rejected pairs with span masks from the rollouts.

Inputs `prepare` (records: references and answer vocabulary) and `sample` (rollouts). Output
`data.jsonl` of `PreferencePair` rows; every rollout that gives no valid pair is in
`rejects.jsonl` with its id, a reason code and the reason.

With `judge.shards: N > 1` the rollouts are split into N contiguous shards judged by parallel
`judge-shard` tasks (:mod:`tasks.shards`: threads, or Dask) and merged in shard order; the output
is byte-identical to the unsharded run.
"""

from __future__ import annotations

from collections import Counter

from prefect import task
from prefect.cache_policies import NO_CACHE

from fire_mpo_core.data.io import load_records
from fire_mpo_core.data.records import PreferencePair, Rollout, VQARecord
from fire_mpo_core.judge import JudgeConfig, Rejection, judge_shard, merge_judged
from fire_mpo_core.store import DATA, StageWriter, read_jsonl, write_jsonl
from tasks.common import Progress, StageCall, stage_task
from tasks.shards import run_shards, shard_bounds


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
) -> tuple[list[PreferencePair], list[Rejection]]:
    """One shard of the judge stage (``index`` only names the task run)."""
    return judge_shard(config, records, rollouts)


def body(call: StageCall, w: StageWriter) -> dict:
    cfg = JudgeConfig.model_validate(call.config["judge"])
    records = load_records(call.inputs["prepare"], on_reject=w.reject)
    rollouts = list(read_jsonl(call.inputs["sample"] / DATA, Rollout, w.reject))
    if cfg.shards > 1:
        params = [
            {"index": i, "config": cfg, "records": records, "rollouts": rollouts[a:b]}
            for i, (a, b) in enumerate(shard_bounds(len(rollouts), cfg.shards))
        ]
        pairs, rejections = merge_judged(run_shards(judge_shard_task, params))
    else:
        progress = Progress(f"judge, round {call.round}: rollouts")
        pairs, rejections = judge_shard(
            cfg, records, rollouts, on_progress=lambda n: progress(n, len(rollouts))
        )
    for r in rejections:
        w.reject(r.id, f"{r.code}: {r.reason}")
    write_jsonl(w.path / DATA, pairs)
    verdicts = Counter(p.verdict for p in pairs)
    codes = Counter(r.code for r in rejections)
    return {
        "rollouts": len(rollouts),
        "pairs": len(pairs),
        "pair_rate": round(len(pairs) / max(1, len(rollouts)), 4),
        "incorrect": verdicts["incorrect"],
        "correct": verdicts["correct"],
        **{f"rejected_{code}": n for code, n in sorted(codes.items())},
    }


judge = stage_task(
    "judge",
    body,
    ["tasks.judge", "tasks.shards", "fire_mpo_core.judge", "fire_mpo_core.openai_client"],
    retries=2,
    retry_delay_seconds=[10, 60],
)
