"""The `vllm` sampling engine: offline ``vllm.LLM`` on GPUs, with the round's LoRA adapter.

vLLM is an optional extra (``pip install 'fire-mpo[gpu]'``), imported only when this engine is
constructed. Prompts are the processor's own chat template (the same text the `hf` engine and
training use), with one image placeholder that vLLM expands itself; the image goes in
``multi_modal_data``::

    {"prompt": "<s><|im_start|>user\\n<image>\\nIs there a lesion?<|im_end|>\\n"
               "<|im_start|>assistant\\n",
     "multi_modal_data": {"image": <PIL.Image>}}

The adapter is served with ``LLM(enable_lora=True, max_lora_rank=...)`` and one
``LoRARequest`` per round, so the base weights stay loaded and unmerged; each round's adapter
gets its own name and integer id (:func:`lora_request_args`, a hash of the adapter path), so an
engine or server that lives across rounds swaps adapters instead of serving a stale one.

The option mapping is pure and importable without vLLM: :func:`vllm_engine_kwargs` (what
``vllm.LLM(**kwargs)`` gets) and :func:`vllm_serve_command` (the ``vllm serve`` argv of an
OpenAI-compatible server with the round's adapter, for ``engine: openai`` and data-parallel
replicas)::

    python -c "from fire_mpo_core.sampling.vllm_engine import vllm_serve_command as c; \
               from fire_mpo_core.config import load_config; from fire_mpo_core.policy import \
               PolicyRef; import shlex; cfg = load_config('configs/gpu/qwen2_5_vl_7b.yaml'); \
               print(shlex.join(c(cfg.sample, PolicyRef(base=cfg.model.name_or_path))))"
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
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

__all__ = [
    "VLLM_MISSING",
    "VLLMEngine",
    "build_vllm_inputs",
    "lora_request_args",
    "vllm_engine_kwargs",
    "vllm_serve_command",
]

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
    """vLLM prompt dicts for B (question, image) pairs, for every family of
    :mod:`fire_mpo_core.models.families` (tests/core/test_families.py).

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
    # The unexpanded placeholder vLLM replaces (<image>, <|image_pad|>, Gemma 3's
    # <start_of_image>, InternVL's <IMG_CONTEXT>): exactly one per prompt, or vLLM fails later
    # with a token-count mismatch far from the cause.
    placeholder = getattr(processor, "image_token", None)
    out = []
    for prompt, image in zip(build_prompts(processor, list(questions)), images, strict=True):
        if strip and prompt.startswith(strip):
            prompt = prompt[len(strip) :]
        if placeholder and prompt.count(placeholder) != 1:
            raise ValueError(
                f"the chat template of {type(processor).__name__} wrote "
                f"{prompt.count(placeholder)} image placeholders {placeholder!r} for one image"
            )
        out.append({"prompt": prompt, "multi_modal_data": {"image": image}})
    return out


def lora_request_args(policy: PolicyLike) -> tuple[str, int, str] | None:
    """``(lora_name, lora_int_id, lora_path)`` of the policy's adapter, or None without one.

    Name and id derive from the adapter path (BLAKE2b), so round k and round k+1 never share an
    id: vLLM caches adapters by id, and a reused id would keep serving the old round's weights.
    """
    adapter = getattr(policy, "adapter", None)
    if not adapter:
        return None
    digest = hashlib.blake2b(str(adapter).encode(), digest_size=4).hexdigest()
    return f"policy-{digest}", 1 + int(digest, 16) % (2**31 - 2), str(adapter)


def vllm_engine_kwargs(cfg: SampleConfig, policy: PolicyLike) -> dict[str, Any]:
    """Keyword arguments of ``vllm.LLM`` for ``cfg.vllm`` and the policy (no vLLM import)."""
    v = cfg.vllm
    kwargs: dict[str, Any] = {
        "model": str(policy.base),
        "dtype": v.dtype,
        "seed": cfg.seed,
        "tensor_parallel_size": v.tensor_parallel_size,
        "gpu_memory_utilization": v.gpu_memory_utilization,
        "max_num_seqs": v.max_num_seqs,
        "enable_prefix_caching": v.enable_prefix_caching,
        "limit_mm_per_prompt": {"image": 1},
        "trust_remote_code": bool(getattr(policy, "trust_remote_code", False)),
    }
    if v.max_model_len is not None:
        kwargs["max_model_len"] = v.max_model_len
    if getattr(policy, "adapter", None):
        kwargs.update(enable_lora=True, max_lora_rank=v.max_lora_rank, max_loras=1)
    return kwargs


def vllm_serve_command(
    cfg: SampleConfig,
    policy: PolicyLike,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    served_model_name: str = "base",
) -> list[str]:
    """``vllm serve`` argv of an OpenAI-compatible server with the same engine options as the
    offline engine, ``cfg.vllm.data_parallel_size`` replicas, and the round's adapter served
    under its :func:`lora_request_args` name (request ``model=<that name>`` to sample the policy,
    ``model=<served_model_name>`` for the base)."""
    kw = vllm_engine_kwargs(cfg, policy)
    v = cfg.vllm
    cmd = [
        "vllm",
        "serve",
        kw["model"],
        "--host",
        host,
        "--port",
        str(port),
        "--served-model-name",
        served_model_name,
        "--dtype",
        v.dtype,
        "--seed",
        str(cfg.seed),
        "--tensor-parallel-size",
        str(v.tensor_parallel_size),
        "--data-parallel-size",
        str(v.data_parallel_size),
        "--gpu-memory-utilization",
        str(v.gpu_memory_utilization),
        "--max-num-seqs",
        str(v.max_num_seqs),
        "--enable-prefix-caching" if v.enable_prefix_caching else "--no-enable-prefix-caching",
        "--limit-mm-per-prompt",
        json.dumps(kw["limit_mm_per_prompt"]),
    ]
    if v.max_model_len is not None:
        cmd += ["--max-model-len", str(v.max_model_len)]
    if kw["trust_remote_code"]:
        cmd.append("--trust-remote-code")
    lora = lora_request_args(policy)
    if lora is not None:
        name, _, path = lora
        cmd += ["--enable-lora", "--max-lora-rank", str(v.max_lora_rank)]
        cmd += ["--lora-modules", f"{name}={path}"]
    return cmd


class VLLMEngine:
    """Sampling with offline vLLM; needs a GPU and the `gpu` extra."""

    name = "vllm"

    def __init__(
        self,
        cfg: SampleConfig,
        policy: PolicyLike,
        model_key: str | None = None,
        log_path: Path | None = None,  # unused: no server process to log
    ):
        try:
            import vllm
            from vllm.lora.request import LoRARequest
        except ImportError as e:
            raise ImportError(VLLM_MISSING) from e
        from fire_mpo_core.models import load_processor

        trust = bool(getattr(policy, "trust_remote_code", False))
        self.cfg = cfg
        self.n = cfg.n
        self.model_key = model_key or policy.adapter or policy.base
        self.processor = load_processor(policy.base, trust_remote_code=trust)
        self.engine_kwargs = vllm_engine_kwargs(cfg, policy)
        self.llm = vllm.LLM(**self.engine_kwargs)
        lora = lora_request_args(policy)
        self.lora = LoRARequest(*lora) if lora is not None else None
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
