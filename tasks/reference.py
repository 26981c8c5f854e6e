"""Stage `reference`: the frozen reference's per-token log-prob sums, once per round.

Inputs `prepare` (images), `corrupt` (pairs with v') and `policy` (its base model is the
reference: the policy with its LoRA adapter switched off), and with `loop.reference:
previous_round` from round 2 on `reference_policy` (round k-1's policy: its adapter is part of
the reference). Output `reference.safetensors` keyed by pair id; training then runs the
reference in-step only for the KL spans of (clean, y+).
"""

from __future__ import annotations

from fire_mpo_core.policy import PolicyRef, read_policy
from fire_mpo_core.store import DATA, StageWriter
from fire_mpo_core.training.config import ReferenceConfig
from fire_mpo_core.training.reference import compute_reference_logprobs
from tasks.common import StageCall, stage_task


def body(call: StageCall, w: StageWriter) -> dict:
    cfg = ReferenceConfig.model_validate(call.config["reference"])
    pairs = call.inputs["corrupt"] / DATA
    policy = read_policy(call.inputs["policy"])
    out = compute_reference_logprobs(
        policy,
        pairs,
        call.inputs["prepare"],
        call.inputs["corrupt"],
        cfg,
        w.path,
        reference_adapter=reference_adapter(call, policy),
    )
    return {k: v for k, v in out.items() if isinstance(v, int | float)}


def reference_adapter(call: StageCall, policy: PolicyRef) -> str | None:
    """The adapter of the `reference_policy` input (round k-1's policy), or None (the base
    alone). It must adapt the same base as the policy: one base model holds both."""
    if "reference_policy" not in call.inputs:
        return None
    ref = read_policy(call.inputs["reference_policy"])
    if ref.base != policy.base:
        raise ValueError(
            f"reference_policy's base {ref.base} is not the policy's base {policy.base}"
        )
    return ref.adapter


reference = stage_task(
    "reference",
    body,
    tags=["compute"],
)
