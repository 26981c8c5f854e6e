"""On-policy sampling engines: draw the policy's own answers for the `sample` stage.

    from fire_mpo_core.sampling import SampleConfig, items_from_records, make_engine, sample_to_file

    engine = make_engine(cfg, policy)          # policy: .base (path / hub id), .adapter (or None)
    items = items_from_records(records, dataset_root)
    stats = sample_to_file(engine, items, out_dir / "rollouts.jsonl", on_reject=writer.reject)

Engines (``SampleConfig.engine``; one class each in :data:`ENGINES`): ``hf`` (transformers, the
embedded default), ``vllm`` (offline GPU, optional extra), ``vllm_server`` (a vLLM OpenAI server
run from its own environment, started for the round's policy or attached to; the recommended GPU
path), ``openai`` (any OpenAI-compatible endpoint). Every engine yields ``n``
:class:`~fire_mpo_core.data.records.Rollout` rows per item or a :class:`Reject` for it.
"""

from __future__ import annotations

from pathlib import Path

from fire_mpo_core.sampling.base import (
    PolicyLike,
    Reject,
    SampleItem,
    SampleStats,
    SamplingEngine,
    derive_seed,
    items_from_records,
    sample_to_file,
)
from fire_mpo_core.sampling.config import (
    HFSamplingConfig,
    SampleConfig,
    VLLMSamplingConfig,
    VLLMServerConfig,
)
from fire_mpo_core.sampling.hf import HFEngine
from fire_mpo_core.sampling.openai_engine import OpenAIEngine
from fire_mpo_core.sampling.vllm_engine import VLLMEngine
from fire_mpo_core.sampling.vllm_server import VLLMServerEngine

__all__ = [
    "ENGINES",
    "HFEngine",
    "HFSamplingConfig",
    "OpenAIEngine",
    "PolicyLike",
    "Reject",
    "SampleConfig",
    "SampleItem",
    "SampleStats",
    "SamplingEngine",
    "VLLMEngine",
    "VLLMSamplingConfig",
    "VLLMServerConfig",
    "VLLMServerEngine",
    "derive_seed",
    "items_from_records",
    "make_engine",
    "sample_to_file",
]

#: Engine name -> class; a new engine is one class and one line here.
ENGINES: dict[str, type] = {
    "hf": HFEngine,
    "vllm": VLLMEngine,
    "vllm_server": VLLMServerEngine,
    "openai": OpenAIEngine,
}


def make_engine(
    cfg: SampleConfig,
    policy: PolicyLike | None,
    model_key: str | None = None,
    log_path: Path | None = None,
) -> SamplingEngine:
    """Build the engine ``cfg.engine`` for ``policy`` (the `openai` engine takes None: the
    server decides what it serves). ``model_key`` is recorded in every rollout (default: the
    adapter path, else the base, else the served model name). ``log_path``: where a managed
    vLLM server writes its output (`vllm_server` only). Engines with a ``close`` method
    (`vllm_server`) hold a process: close them when done."""
    try:
        cls = ENGINES[cfg.engine]
    except KeyError:
        raise ValueError(
            f"unknown sampling engine {cfg.engine!r}; known: {sorted(ENGINES)}"
        ) from None
    if policy is None and getattr(cls, "needs_policy", True):
        raise ValueError(f"the {cfg.engine!r} engine needs a policy (base model and adapter)")
    return cls(cfg, policy, model_key=model_key, log_path=log_path)
