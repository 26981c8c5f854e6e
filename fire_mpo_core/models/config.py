"""Configuration of the base LVLM: a tiny model built offline, or a real checkpoint.

from fire_mpo_core.models.config import ModelConfig
cfg = ModelConfig(arch="qwen2_5_vl")                      # tiny, built in `prepare`
cfg = ModelConfig(name_or_path="Qwen/Qwen2.5-VL-7B-Instruct", model_type="qwen2_5_vl")
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from fire_mpo_core.schema import StrictConfig


class ModelConfig(StrictConfig):
    """The base LVLM: a tiny model built offline, or a real checkpoint by path / hub id."""

    name_or_path: str | None = Field(
        default=None,
        description="Checkpoint path or hub id; None builds the tiny model in `prepare`.",
    )
    arch: Literal[
        "llava", "llava_mistral", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "gemma3", "idefics3",
        "internvl",
    ] = Field(
        default="llava",
        description="Architecture of the tiny model built when no path is given: LLaVA with a "
        "Llama (llava) or Mistral (llava_mistral) decoder, Qwen2-VL, Qwen2.5-VL, Qwen3-VL "
        "(deepstack), Gemma 3, Idefics3 (SmolVLM), InternVL (fire_mpo_core.models.families).",
    )  # fmt: skip
    model_type: str | None = Field(
        default=None,
        description="transformers model_type of the checkpoint at name_or_path (e.g. qwen2_5_vl, "
        "qwen3_vl); checked at load time against transformers' image-text-to-text auto mapping, "
        "without downloading anything. None: not checked.",
    )
    hidden_size: int = Field(default=192, ge=16, description="Tiny LM hidden size.")
    num_layers: int = Field(default=2, ge=1, description="Tiny LM decoder layers.")
    num_heads: int = Field(default=4, ge=1, description="Tiny LM attention heads.")
    vision_hidden_size: int = Field(default=64, ge=16, description="Tiny vision tower width.")
    vision_layers: int = Field(default=2, ge=1, description="Tiny vision tower layers.")
    patch_size: int = Field(default=8, ge=2, description="Vision patch size in pixels.")
    vocab_size: int = Field(default=1024, ge=128, description="Tokenizer vocabulary to train.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        default="float32", description="Weights dtype: float32 on CPU, bfloat16 on GPU."
    )
    trust_remote_code: bool = Field(
        default=False, description="Allow hub code execution; off unless you trust the repo."
    )
    seed: int = Field(default=0, description="Seed of the random initialisation.")

    @model_validator(mode="after")
    def _heads_divide(self) -> ModelConfig:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by "
                f"num_heads ({self.num_heads})"
            )
        if self.model_type is not None:
            from transformers.models.auto.modeling_auto import (
                MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES as IMAGE_TEXT,
            )

            if self.model_type not in IMAGE_TEXT:
                raise ValueError(
                    f"model_type={self.model_type!r} is not an image-text-to-text architecture "
                    "of this transformers version (AutoModelForImageTextToText); known e.g. "
                    "qwen2_5_vl, qwen3_vl, qwen2_vl, llava"
                )
        return self
