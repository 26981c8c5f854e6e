"""Stage `judge`: minimal-edit chosen/rejected pairs with span masks from the rollouts.

Inputs `prepare` (records: references and answer vocabulary) and `sample` (rollouts). Output
`data.jsonl` of `PreferencePair` rows; every rollout that gives no valid pair is in
`rejects.jsonl` with its id, a reason code and the reason.

With `judge.shards: N > 1` the rollouts are split into N contiguous shards judged by parallel
`judge-shard` tasks (:mod:`tasks.shards`: threads, or Dask) and merged in shard order; the output
is byte-identical to the unsharded run.

The working folder is resumable: judged rollouts go to a journal as they are judged, so a
retried or restarted stage does not ask an LLM judge again for what it already answered.
"""

from __future__ import annotations

from collections import Counter

from prefect import task
from prefect.cache_policies import NO_CACHE

from fire_mpo_core.data.io import load_records
from fire_mpo_core.data.records import PreferencePair, Rollout, VQARecord
from fire_mpo_core.judge import (
    JudgeConfig,
    Rejection,
    build_judge,
    judge_rollouts,
    judge_shard,
    merge_judged,
)
from fire_mpo_core.judge.journal import TRANSIENT, JudgeJournal
from fire_mpo_core.judge.stats import pair_statistics
from fire_mpo_core.store import DATA, StageWriter, read_jsonl, write_jsonl
from tasks.common import Progress, StageCall, stage_task
from tasks.shards import run_shards, shard_bounds

JOURNAL = "judged.journal.jsonl"  # in the working folder; removed once the stage succeeds
JOURNAL_EVERY = 16  # rollouts judged between journal writes (one fsync each)


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
    # Resumable: a retried or restarted stage judges only what its journal does not hold.
    journal = JudgeJournal(w.path / JOURNAL)
    done = journal.load()
    todo = [ro for ro in rollouts if ro.id not in done]
    if cfg.shards > 1:
        params = [
            {"index": i, "config": cfg, "records": records, "rollouts": todo[a:b]}
            for i, (a, b) in enumerate(shard_bounds(len(todo), cfg.shards))
        ]
        new_pairs, new_rejections = merge_judged(run_shards(judge_shard_task, params))
        journal.append([*new_pairs, *new_rejections])
        transient = [r for r in new_rejections if r.code == TRANSIENT]
    elif todo:
        progress = Progress(f"judge, round {call.round}: rollouts")
        judge = build_judge(cfg, records)
        transient = []
        for i in range(0, len(todo), JOURNAL_EVERY):
            got = judge_rollouts(judge, records, todo[i : i + JOURNAL_EVERY])
            journal.append([*got[0], *got[1]])
            transient += [r for r in got[1] if r.code == TRANSIENT]
            progress(len(done) + i + len(got[0]) + len(got[1]), len(rollouts))
    else:
        transient = []
    # Endpoint failures are rejects of this attempt, but stay out of the journal (redone).
    results = {**journal.load(), **{r.id: r for r in transient}}
    # Rollout order, whatever order the (partial) runs judged them in: the output is identical.
    ordered = [results[ro.id] for ro in rollouts if ro.id in results]
    pairs = [r for r in ordered if isinstance(r, PreferencePair)]
    rejections = [r for r in ordered if isinstance(r, Rejection)]
    w.scratch.append(journal.path)  # deleted once the stage succeeds; kept for a rerun if not
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
        **pair_statistics(pairs),
        **{f"rejected_{code}": n for code, n in sorted(codes.items())},
    }


judge = stage_task(
    "judge",
    body,
    retries=2,
    retry_delay_seconds=[10, 60],
    resumable=True,
)
