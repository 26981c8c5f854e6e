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

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fire_mpo_core.openai_client import OpenAIEndpointConfig

__all__ = ["HFSamplingConfig", "SampleConfig", "VLLMSamplingConfig", "VLLMServerConfig"]

#: LoRA ranks vLLM accepts for ``--max-lora-rank`` (vLLM 0.32, ``vllm.config.lora.MaxLoRARanks``).
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


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


class VLLMServerConfig(_Cfg):
    """The `vllm_server` engine: sampling from vLLM's OpenAI-compatible server, out of process.

    Managed (the default): the stage starts ``<python> -m <module>`` for the round's policy (base
    checkpoint + the round's LoRA adapter), waits until it is healthy, samples through the
    `openai` engine (retries, ``openai.max_concurrency`` requests in flight, rows in record
    order), and stops it (process group) when the stage ends, fails or is interrupted. Attached
    (``base_url`` set, like TRL's ``vllm_server_base_url``): a server someone else runs; the stage
    only loads the round's adapter into it (``/v1/load_lora_adapter``) and samples. Engine
    options (dtype, tensor / data parallelism, max_num_seqs, max_lora_rank, ...) come from the
    ``vllm`` section, shared with the offline engine.
    """

    base_url: str | None = Field(
        default=None,
        description="URL of a running vLLM server to attach to (e.g. http://gpu1:8000); None: "
        "the stage starts and stops its own. The server must see the adapter path and be "
        "started with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True.",
    )
    python: str = Field(
        default=".venv-vllm/bin/python",
        description="Python of the environment that has vLLM (`make vllm-cpu` builds "
        ".venv-vllm); relative paths are tried from the working directory, then the project "
        "root. The project's own environment never needs vLLM.",
    )
    module: str = Field(
        default="vllm.entrypoints.openai.api_server",
        description="Module run as `python -m MODULE` (the `vllm serve` equivalent; the `vllm` "
        "command itself fails under the vllm-cpu package name).",
    )
    host: str = Field(default="127.0.0.1", description="Address a managed server binds.")
    port: int | None = Field(
        default=None, ge=1, le=65535, description="Port of a managed server (None: a free one)."
    )
    served_model_name: str | None = Field(
        default=None,
        description="Name the base model is served under (managed: 'base' if None; attached: "
        "None = the server's root model from /v1/models).",
    )
    lora_loading: Literal["auto", "startup", "runtime"] = Field(
        default="auto",
        description="How the round's adapter gets in: 'startup' (--lora-modules, managed only), "
        "'runtime' (POST /v1/load_lora_adapter), 'auto' (startup when managed, runtime when "
        "attached).",
    )
    startup_timeout_s: float = Field(
        default=900.0,
        gt=0,
        description="Seconds to wait for /health and /v1/models (like TRL's vllm_server_timeout; "
        "a tiny model on 2 CPU cores takes ~1 min, a 7B on a GPU a few).",
    )
    stop_timeout_s: float = Field(
        default=30.0, gt=0, description="Seconds between SIGTERM and SIGKILL when stopping."
    )
    env: dict[str, str] = Field(
        default_factory=dict,
        description="Extra environment of a managed server, e.g. CUDA_VISIBLE_DEVICES: '1' (its "
        "own GPU) or, on CPU, VLLM_CPU_KVCACHE_SPACE: '1' (GiB of KV cache; vLLM's default is 4) "
        "and VLLM_CPU_OMP_THREADS_BIND: nobind.",
    )
    extra_args: list[str] = Field(
        default_factory=list,
        description="Extra server arguments, appended as given (e.g. ['--enforce-eager']).",
    )
    enable_tower_connector_lora: bool = Field(
        default=False,
        description="Serve LoRA on the vision tower / connector too (vLLM: experimental, some "
        "models only). Off: an adapter with vision-side layers is refused, since vLLM would "
        "silently ignore them (train with lora.scope: language_model).",
    )
    api_key_env: str | None = Field(
        default=None,
        description="Attached server only: NAME of the environment variable with its API key "
        "(None: no authentication). A managed server listens without a key on `host`.",
        repr=False,
    )

    @model_validator(mode="after")
    def _checks(self) -> VLLMServerConfig:
        if self.base_url is not None and not re.match(r"^https?://[^\s/]+", self.base_url):
            raise ValueError("vllm_server.base_url must be an http(s) URL, e.g. http://host:8000")
        if self.base_url is not None and self.lora_loading == "startup":
            raise ValueError(
                "vllm_server.lora_loading='startup' needs a managed server, but base_url is set "
                "(an attached server loads adapters at runtime): set lora_loading to 'runtime' "
                "or 'auto', or drop base_url"
            )
        if self.api_key_env is not None and not re.match(
            r"^[A-Za-z_][A-Za-z0-9_]*$", self.api_key_env
        ):
            raise ValueError("vllm_server.api_key_env must be the NAME of an environment variable")
        bad = [k for k in self.env if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", k)]
        if bad:
            raise ValueError(f"vllm_server.env has names that are not variable names: {bad}")
        return self


class SampleConfig(_Cfg):
    """The `sample` stage: ``n`` on-policy answers per (image, question) of ``split``."""

    engine: str = Field(
        default="hf",
        description="A key of fire_mpo_core.sampling.ENGINES (checked by the cycle config): "
        "hf (transformers, CPU/GPU), vllm (offline, in process), vllm_server (a "
        "vLLM OpenAI server the stage starts, or attaches to, with the round's adapter), openai "
        "(any OpenAI-compatible HTTP endpoint).",
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
    vllm_server: VLLMServerConfig = Field(
        default_factory=VLLMServerConfig, description="Settings of the vllm_server engine."
    )
    openai: OpenAIEndpointConfig = Field(
        default_factory=OpenAIEndpointConfig,
        description="Settings of the openai engine; for vllm_server, its request settings "
        "(max_concurrency, timeout_s, max_retries, backoff) - the engine sets URL and model.",
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
        vllm_engine = self.engine in ("vllm", "vllm_server")
        if vllm_engine and self.vllm.max_lora_rank not in VLLM_LORA_RANKS:
            raise ValueError(
                f"vllm.max_lora_rank={self.vllm.max_lora_rank} is not a rank vLLM serves; use "
                f"one of {list(VLLM_LORA_RANKS)} (at least the adapter's lora.r)"
            )
        if self.engine == "vllm_server" and (self.openai.base_urls or self.openai.model):
            raise ValueError(
                "engine='vllm_server' sets the endpoint itself, so openai.base_urls and "
                "openai.model must stay empty: to use a running server set "
                "vllm_server.base_url (and vllm_server.served_model_name)"
            )
        if self.engine == "openai" and (not self.openai.base_urls or not self.openai.model):
            raise ValueError(
                "engine='openai' needs openai.base_urls and openai.model "
                f"(got base_urls={self.openai.base_urls}, model={self.openai.model!r})"
            )
        return self
