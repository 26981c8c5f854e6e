"""Configuration of the `sample` stage: which engine draws the on-policy answers, how many per
prompt, and each engine's own settings::

    from fire_mpo_core.sampling.config import SampleConfig

    cfg = SampleConfig()                                     # hf engine, the embedded default
    cfg = SampleConfig(engine="openai", n=4,
                       openai={"base_urls": ["http://gpu1:8000/v1", "http://gpu2:8000/v1"],
                               "model": "policy", "api_key_env": None})

Conflicting fields fail at validation time with a message naming both.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fire_mpo_core.openai_client import OpenAIEndpointConfig

__all__ = ["HFSamplingConfig", "SampleConfig", "VLLMSamplingConfig"]


class _Cfg(BaseModel):
    # No input values in error text: the openai section may hold a pasted key by mistake.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, hide_input_in_errors=True)


class HFSamplingConfig(_Cfg):
    """The `hf` engine: transformers ``generate`` in this process."""

    device: str = Field(default="cpu", description="Torch device, e.g. cpu or cuda:0.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        default="float32", description="Weights dtype: float32 on CPU, bfloat16 on GPU."
    )
    merge_adapter: bool = Field(
        default=True,
        description="Fold the LoRA adapter into the weights before sampling (faster; the "
        "samples match the unmerged adapter up to float rounding).",
    )


class VLLMSamplingConfig(_Cfg):
    """The `vllm` engine: offline ``vllm.LLM`` on GPUs (the optional `gpu` extra)."""

    tensor_parallel_size: int = Field(default=1, ge=1, description="GPUs per model replica.")
    data_parallel_size: int = Field(
        default=1,
        ge=1,
        description="Model replicas, each on tensor_parallel_size GPUs. Offline `vllm` engine: "
        "1 only (one LLM per process); for more, start `vllm serve --data-parallel-size N` "
        "(fire_mpo_core.sampling.vllm_engine.vllm_serve_command, docs/gpu.md) and sample with "
        "engine 'openai'.",
    )
    gpu_memory_utilization: float = Field(
        default=0.9, gt=0, le=1, description="Share of GPU memory vLLM may take (KV cache incl.)."
    )
    max_num_seqs: int = Field(default=256, ge=1, description="Sequences decoded concurrently.")
    enable_prefix_caching: bool = Field(
        default=True, description="Reuse KV blocks of shared prompt prefixes (the n samples)."
    )
    max_lora_rank: int = Field(
        default=128, ge=1, description="Largest LoRA rank to serve (the paper trains r = 128)."
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        default="bfloat16", description="Weights / activations dtype."
    )
    max_model_len: int | None = Field(
        default=None, ge=16, description="Context length cap (None: the model's own)."
    )


class SampleConfig(_Cfg):
    """The `sample` stage: ``n`` on-policy answers per (image, question) of ``split``."""

    engine: Literal["hf", "vllm", "openai"] = Field(
        default="hf", description="hf (transformers, CPU/GPU), vllm (offline GPU), openai (HTTP)."
    )
    n: int = Field(default=1, ge=1, description="Samples per prompt.")
    temperature: float = Field(
        default=0.7, ge=0, description="Sampling temperature; 0 = greedy decoding (then n = 1)."
    )
    top_p: float = Field(default=0.95, gt=0, le=1, description="Nucleus sampling mass.")
    max_new_tokens: int = Field(default=48, ge=1, description="Generation budget per answer.")
    batch_size: int = Field(
        default=32, ge=1, description="Prompts per engine call; also the resume granularity."
    )
    seed: int = Field(default=0, description="Sampling seed, recorded in every rollout.")
    split: Literal["train", "val", "test"] = Field(
        default="train", description="Dataset split to sample answers for."
    )
    max_records: int | None = Field(
        default=None, ge=1, description="Sample only the first N records (None: all)."
    )
    hf: HFSamplingConfig = Field(
        default_factory=HFSamplingConfig, description="Settings of the hf engine."
    )
    vllm: VLLMSamplingConfig = Field(
        default_factory=VLLMSamplingConfig, description="Settings of the vllm engine."
    )
    openai: OpenAIEndpointConfig = Field(
        default_factory=OpenAIEndpointConfig, description="Settings of the openai engine."
    )

    @model_validator(mode="after")
    def _consistent(self) -> SampleConfig:
        if self.engine == "vllm" and self.vllm.data_parallel_size > 1:
            raise ValueError(
                f"vllm.data_parallel_size={self.vllm.data_parallel_size} needs a server: the "
                "offline engine='vllm' runs one replica; start `vllm serve --data-parallel-size "
                "N` (docs/gpu.md) and set engine='openai', or set data_parallel_size=1"
            )
        if self.temperature == 0 and self.n > 1:
            raise ValueError(
                f"temperature=0 (greedy) gives one answer per prompt, but n={self.n}: "
                "set n=1 or temperature > 0"
            )
        if self.engine == "openai" and (not self.openai.base_urls or not self.openai.model):
            raise ValueError(
                "engine='openai' needs openai.base_urls and openai.model "
                f"(got base_urls={self.openai.base_urls}, model={self.openai.model!r})"
            )
        return self
