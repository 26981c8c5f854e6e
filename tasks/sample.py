"""Stage `sample`: the policy's own answers (on-policy rollouts) for the sampling split.

Inputs `prepare` (dataset) and `policy` (the SFT base in round 1, round k-1's `train` after).
Output `data.jsonl` of `Rollout` rows, written record by record into a resumable partial
folder: a crashed or retried run continues where it stopped instead of resampling. With
`engine: vllm_server` the stage starts the round's vLLM server (or attaches to one) and always
stops it; a server that dies mid-stage fails the attempt, and the task's retries resume. An
endpoint engine's requests, retries, tokens and estimated cost are in the counts (``llm_*``).
The work is :func:`fire_mpo_core.sampling.stage.run_sample`; this task resolves, calls, returns.
"""

from __future__ import annotations

from fire_mpo_core.sampling import SampleConfig
from fire_mpo_core.sampling.stage import SampleInputs, run_sample
from fire_mpo_core.store import StageWriter
from tasks.common import Progress, StageCall, stage_task


def body(call: StageCall, w: StageWriter) -> dict:
    cfg = SampleConfig.model_validate(call.config["sample"])
    inputs = SampleInputs(prepare=call.inputs["prepare"], policy=call.inputs["policy"])
    progress = Progress(f"sample, round {call.round}: records")
    return run_sample(inputs, cfg, w.path, w.reject, w.scratch, progress).as_counts()


sample = stage_task(
    "sample",
    body,
    retries=3,
    retry_delay_seconds=[5, 20, 60],
    tags=["compute"],
    resumable=True,
)
