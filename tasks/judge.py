"""Stage `judge`: minimal-edit chosen/rejected pairs with span masks from the rollouts.

Inputs `prepare` (records: references and answer vocabulary) and `sample` (rollouts). Output
`data.jsonl` of `PreferencePair` rows; every rollout that gives no valid pair is in
`rejects.jsonl` with its id, a reason code and the reason.
"""

from __future__ import annotations

from collections import Counter

from fire_mpo_core.data.io import load_records
from fire_mpo_core.data.records import Rollout
from fire_mpo_core.judge import JudgeConfig, build_judge, judge_rollouts
from fire_mpo_core.store import DATA, StageWriter, read_jsonl, write_jsonl
from tasks.common import StageCall, stage_task


def body(call: StageCall, w: StageWriter) -> dict:
    cfg = JudgeConfig.model_validate(call.config["judge"])
    records = load_records(call.inputs["prepare"], on_reject=w.reject)
    rollouts = list(read_jsonl(call.inputs["sample"] / DATA, Rollout, w.reject))
    pairs, rejections = judge_rollouts(build_judge(cfg, records), records, rollouts)
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
    ["tasks.judge", "fire_mpo_core.judge", "fire_mpo_core.openai_client"],
    retries=2,
    retry_delay_seconds=[10, 60],
)
