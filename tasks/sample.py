"""Stage `sample`: the policy's own answers (on-policy rollouts) for the sampling split.

Inputs `prepare` (dataset) and `policy` (the SFT base in round 1, round k-1's `train` after).
Output `data.jsonl` of `Rollout` rows, written record by record into a resumable partial
folder: a crashed or retried run continues where it stopped instead of resampling.
"""

from __future__ import annotations

from dataclasses import asdict

from fire_mpo_core.data.io import load_records
from fire_mpo_core.policy import read_policy
from fire_mpo_core.sampling import SampleConfig, items_from_records, make_engine, sample_to_file
from fire_mpo_core.store import DATA, StageWriter, read_manifest
from tasks.common import Progress, StageCall, stage_task


def body(call: StageCall, w: StageWriter) -> dict:
    cfg = SampleConfig.model_validate(call.config["sample"])
    root = call.inputs["prepare"]
    records = load_records(root, splits=(cfg.split,), on_reject=w.reject)
    if cfg.max_records:
        records = records[: cfg.max_records]
    policy_dir = call.inputs["policy"]
    engine = make_engine(
        cfg,
        read_policy(policy_dir) if cfg.engine != "openai" else None,
        model_key=read_manifest(policy_dir)["key"],
    )
    stats = sample_to_file(
        engine,
        items_from_records(records, root),
        w.path / DATA,
        on_reject=w.reject,
        on_progress=Progress(f"sample, round {call.round}: records"),
    )
    return {"records_in": len(records), **asdict(stats)}


sample = stage_task(
    "sample",
    body,
    [
        "tasks.sample",
        "fire_mpo_core.sampling",
        "fire_mpo_core.models",
        "fire_mpo_core.openai_client",
    ],
    retries=3,
    retry_delay_seconds=[5, 20, 60],
    tags=["compute"],
    resumable=True,
)
