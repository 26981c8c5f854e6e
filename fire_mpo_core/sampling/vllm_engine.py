"""The `vllm` sampling engine: offline ``vllm.LLM`` on GPUs, with the round's LoRA adapter.

vLLM is an optional extra (``pip install 'fire-mpo[gpu]'``), imported only when this engine is
constructed. Prompts are the processor's own chat template (the same text the `hf` engine and
training use), with one image placeholder that vLLM expands itself; the image goes in
``multi_modal_data``::

    {"prompt": "<s><|im_start|>user\\n<image>\\nIs there a lesion?<|im_end|>\\n"
               "<|im_start|>assistant\\n",
     "multi_modal_data": {"image": <PIL.Image>}}

The adapter is served with ``LLM(enable_lora=True, max_lora_rank=...)`` and one
``LoRARequest`` per round, so the base weights stay loaded and unmerged.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

from PIL import Image

from fire_mpo_core.data.records import Rollout
from fire_mpo_core.sampling.base import (
    PolicyLike,
    Reject,
    SampleItem,
    batched,
    load_images,
    rollouts_for,
)
from fire_mpo_core.sampling.config import SampleConfig

__all__ = ["VLLM_MISSING", "VLLMEngine", "build_vllm_inputs"]

VLLM_MISSING = (
    "the 'vllm' sampling engine needs vLLM, an optional GPU extra that is not installed: "
    "pip install 'fire-mpo[gpu]' (or set sampling engine to 'hf')"
)


def _tokenizer_adds_bos(tokenizer) -> bool:
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def build_vllm_inputs(
    processor, questions: Sequence[str], images: Sequence[Image.Image]
) -> list[dict[str, Any]]:
    """vLLM prompt dicts for B (question, image) pairs.

    The prompt is :func:`fire_mpo_core.models.build_prompts` (the chat template with one image
    placeholder and the generation prompt). vLLM tokenizes a text prompt with the tokenizer's
    special tokens, so where the tokenizer itself prepends BOS and the template already starts
    with it, the template's copy is dropped (a doubled BOS shifts every position the model was
    trained on).
    """
    from fire_mpo_core.models import build_prompts

    if len(questions) != len(images):
        raise ValueError(f"{len(images)} images for {len(questions)} questions")
    tok = processor.tokenizer
    strip = tok.bos_token if _tokenizer_adds_bos(tok) else None
    out = []
    for prompt, image in zip(build_prompts(processor, list(questions)), images, strict=True):
        if strip and prompt.startswith(strip):
            prompt = prompt[len(strip) :]
        out.append({"prompt": prompt, "multi_modal_data": {"image": image}})
    return out


class VLLMEngine:
    """Sampling with offline vLLM; needs a GPU and the `gpu` extra."""

    name = "vllm"

    def __init__(self, cfg: SampleConfig, policy: PolicyLike, model_key: str | None = None):
        try:
            import vllm
            from vllm.lora.request import LoRARequest
        except ImportError as e:
            raise ImportError(VLLM_MISSING) from e
        from fire_mpo_core.models import load_processor

        trust = bool(getattr(policy, "trust_remote_code", False))
        v = cfg.vllm
        self.cfg = cfg
        self.n = cfg.n
        self.model_key = model_key or policy.adapter or policy.base
        self.processor = load_processor(policy.base, trust_remote_code=trust)
        engine_args: dict[str, Any] = {
            "model": policy.base,
            "dtype": v.dtype,
            "seed": cfg.seed,
            "tensor_parallel_size": v.tensor_parallel_size,
            "gpu_memory_utilization": v.gpu_memory_utilization,
            "max_num_seqs": v.max_num_seqs,
            "enable_prefix_caching": v.enable_prefix_caching,
            "limit_mm_per_prompt": {"image": 1},
            "trust_remote_code": trust,
        }
        if v.max_model_len is not None:
            engine_args["max_model_len"] = v.max_model_len
        if policy.adapter:
            engine_args.update(enable_lora=True, max_lora_rank=v.max_lora_rank, max_loras=1)
        self.llm = vllm.LLM(**engine_args)
        # One adapter per round: a fixed name/id is enough inside one engine's lifetime.
        self.lora = LoRARequest("policy", 1, policy.adapter) if policy.adapter else None
        greedy = cfg.temperature == 0
        self.params = vllm.SamplingParams(
            n=cfg.n,
            temperature=cfg.temperature,
            top_p=1.0 if greedy else cfg.top_p,
            max_tokens=cfg.max_new_tokens,
            seed=cfg.seed,
        )

    def sample(self, items: list[SampleItem]) -> Iterator[Rollout | Reject]:
        # vLLM schedules continuously inside a call; batch_size only sets how often rows are
        # handed back (and so the resume granularity).
        for batch in batched(items, self.cfg.batch_size):
            loaded, rejects = load_images(batch)
            yield from rejects
            if not loaded:
                continue
            inputs = build_vllm_inputs(
                self.processor, [it.question for it, _ in loaded], [im for _, im in loaded]
            )
            outputs = self.llm.generate(inputs, self.params, lora_request=self.lora, use_tqdm=False)
            for (it, _), out in zip(loaded, outputs, strict=True):
                texts = [c.text.strip() for c in sorted(out.outputs, key=lambda c: c.index)]
                yield from rollouts_for(it, texts, self.name, self.model_key, self.cfg.seed)
