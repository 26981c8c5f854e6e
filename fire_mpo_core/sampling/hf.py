"""The `hf` sampling engine: transformers generation in this process, the embedded default.

Loads the policy's base model with :func:`fire_mpo_core.models.load_model`, applies its PEFT
adapter when there is one, and decodes ``batch_size`` prompts per call (left-padded, see
:func:`fire_mpo_core.models.generate`)::

    engine = HFEngine(SampleConfig(n=4, temperature=0.7), PolicyRef(base="base", adapter="lora"))
    for row in engine.sample(items):   # Rollout rows, n per item, or Reject
        ...

Temperature 0 decodes greedily; otherwise ancestral sampling from ``softmax(logits / T)``
restricted to the top-p nucleus. Each batch is seeded with
:func:`~fire_mpo_core.sampling.base.derive_seed` of the config seed and the batch's record ids,
so a run and a resumed run draw the same samples for the same batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from fire_mpo_core.data.records import Rollout
from fire_mpo_core.sampling.base import (
    PolicyLike,
    Reject,
    SampleItem,
    batched,
    derive_seed,
    load_images,
    rollouts_for,
)
from fire_mpo_core.sampling.config import SampleConfig

__all__ = ["HFEngine"]


class HFEngine:
    """Sampling with ``transformers`` (``model.generate``), CPU or GPU."""

    name = "hf"

    def __init__(
        self,
        cfg: SampleConfig,
        policy: PolicyLike,
        model_key: str | None = None,
        log_path: Path | None = None,  # unused: no server process to log
    ):
        from fire_mpo_core.models import load_model, load_processor

        trust = bool(getattr(policy, "trust_remote_code", False))
        self.cfg = cfg
        self.n = cfg.n
        self.model_key = model_key or policy.adapter or policy.base
        model = load_model(
            policy.base, dtype=cfg.hf.dtype, device=cfg.hf.device, trust_remote_code=trust
        )
        if policy.adapter:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, policy.adapter)
            if cfg.hf.merge_adapter:
                # W + B A once, instead of the low-rank product at every step.
                model = model.merge_and_unload()
            model.eval()
        self.model = model
        self.processor = load_processor(policy.base, trust_remote_code=trust)

    def sample(self, items: list[SampleItem]) -> Iterator[Rollout | Reject]:
        from fire_mpo_core.models import generate

        cfg = self.cfg
        greedy = cfg.temperature == 0
        for batch in batched(items, cfg.batch_size):
            loaded, rejects = load_images(batch)
            yield from rejects
            if not loaded:
                continue
            seed = derive_seed(cfg.seed, [it.record_id for it, _ in loaded])
            answers = generate(
                self.model,
                self.processor,
                [im for _, im in loaded],
                [it.question for it, _ in loaded],
                max_new_tokens=cfg.max_new_tokens,
                batch_size=len(loaded),
                do_sample=not greedy,
                temperature=cfg.temperature if not greedy else 1.0,
                top_p=cfg.top_p if not greedy else 1.0,
                num_return_sequences=cfg.n,
                seed=seed,
            )
            for (it, _), texts in zip(loaded, answers, strict=True):
                yield from rollouts_for(it, texts, self.name, self.model_key, cfg.seed)
