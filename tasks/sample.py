"""Stage `sample`: the policy's own answers (on-policy rollouts) for the sampling split.

Inputs `prepare` (dataset) and `policy` (the SFT base in round 1, round k-1's `train` after).
Output `data.jsonl` of `Rollout` rows, written record by record into a resumable partial
folder: a crashed or retried run continues where it stopped instead of resampling. With
`engine: vllm_server` the stage starts the round's vLLM server (or attaches to one) and always
stops it; a server that dies mid-stage fails the attempt, and the task's retries resume.
"""

from __future__ import annotations

from dataclasses import asdict

from fire_mpo_core.data.io import load_records
from fire_mpo_core.policy import read_policy
from fire_mpo_core.sampling import SampleConfig, items_from_records, make_engine, sample_to_file
from fire_mpo_core.store import DATA, StageWriter, read_manifest
from tasks.common import Progress, StageCall, stage_task

SERVER_LOG = "vllm_server.log"


def body(call: StageCall, w: StageWriter) -> dict:
    cfg = SampleConfig.model_validate(call.config["sample"])
    root = call.inputs["prepare"]
    records = load_records(root, splits=(cfg.split,), on_reject=w.reject)
    if cfg.max_records:
        records = records[: cfg.max_records]
    policy_dir = call.inputs["policy"]
    log_path = None
    if cfg.engine == "vllm_server":
        # The managed server's output: in the working folder while the stage runs (kept there
        # when it fails, for a look), removed before the manifest when it succeeds.
        log_path = w.path / SERVER_LOG
        w.scratch.append(log_path)
    engine = make_engine(
        cfg,
        read_policy(policy_dir) if cfg.engine != "openai" else None,
        model_key=read_manifest(policy_dir)["key"],
        log_path=log_path,
    )
    try:
        stats = sample_to_file(
            engine,
            items_from_records(records, root),
            w.path / DATA,
            on_reject=w.reject,
            on_progress=Progress(f"sample, round {call.round}: records"),
        )
    finally:
        # A vllm_server engine holds a server process group: stopped on success, failure and
        # Ctrl-C alike.
        close = getattr(engine, "close", None)
        if close is not None:
            close()
    out = {"records_in": len(records), **asdict(stats)}
    info = getattr(engine, "info", None)
    if info:
        out["server"] = {k: v for k, v in info.items() if k != "url"}
    return out


sample = stage_task(
    "sample",
    body,
    retries=3,
    retry_delay_seconds=[5, 20, 60],
    tags=["compute"],
    resumable=True,
)
