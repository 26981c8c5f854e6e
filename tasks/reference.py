"""Stage `reference`: the frozen reference's per-token log-prob sums, once per round.

Inputs `prepare` (images), `corrupt` (pairs with v') and `policy` (its base model is the
reference: the policy with its LoRA adapter switched off). Output `reference.safetensors` keyed
by pair id; training then runs the reference in-step only for the KL spans of (clean, y+).
"""

from __future__ import annotations

from fire_mpo_core.policy import read_policy
from fire_mpo_core.store import DATA, StageWriter
from fire_mpo_core.training.config import ReferenceConfig
from fire_mpo_core.training.reference import compute_reference_logprobs
from tasks.common import StageCall, stage_task


def body(call: StageCall, w: StageWriter) -> dict:
    cfg = ReferenceConfig.model_validate(call.config["reference"])
    pairs = call.inputs["corrupt"] / DATA
    out = compute_reference_logprobs(
        read_policy(call.inputs["policy"]),
        pairs,
        call.inputs["prepare"],
        call.inputs["corrupt"],
        cfg,
        w.path,
    )
    return {k: v for k, v in out.items() if isinstance(v, int | float)}


reference = stage_task(
    "reference",
    body,
    tags=["compute"],
)
