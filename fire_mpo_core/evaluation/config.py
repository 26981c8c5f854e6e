"""Configuration of the `evaluate` stage: split, generation budget, grounding probes, judges.

from fire_mpo_core.evaluation.config import EvaluateConfig
cfg = EvaluateConfig(split="val", grounding_max_samples=160)
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from fire_mpo_core.openai_client import OpenAIEndpointConfig
from fire_mpo_core.schema import StrictConfig


class EvaluateConfig(StrictConfig):
    """Benchmark evaluation of a policy on a split."""

    split: Literal["val", "test"] = Field(default="test", description="Split to evaluate.")
    batch_size: int = Field(default=64, ge=1, description="Prompts per generate call.")
    max_new_tokens: int = Field(default=48, ge=1, description="Generation budget per answer.")
    max_samples: int | None = Field(
        default=None, ge=1, description="Evaluate only the first N records (None: all)."
    )
    grounding: bool = Field(
        default=True,
        description="Measure visual grounding: sensitivity to lesion removal, blind accuracy on "
        "blank images, lesion attention ratio per layer (fire_mpo_core.evaluation.grounding).",
    )
    grounding_max_samples: int = Field(
        default=64, ge=1, description="Records per grounding measurement (evenly spaced subset)."
    )
    removal_dilate_px: int = Field(
        default=2,
        ge=0,
        le=16,
        description="Grow the lesion mask by this many pixels before removing it for the "
        "grounding probes: a lesion's soft rim lies outside its mask (measured on SynthLesion: "
        "inpainting the bare mask leaves a third of the lesion contrast, 2 px removes it).",
    )
    sensitivity_corruption: Literal["inpaint", "black"] = Field(
        default="inpaint",
        description="How a lesion is removed for the grounding probes: inpaint (filled from the "
        "surrounding tissue) or black (zeroed).",
    )
    blind_fill: int = Field(
        default=128, ge=0, le=255, description="Grey level of the blank image for blind accuracy."
    )
    llm_judge: OpenAIEndpointConfig | None = Field(
        default=None,
        description="OpenAI-compatible endpoint that judges open answers (open_llm_accuracy); "
        "None: off.",
    )
    green: OpenAIEndpointConfig | None = Field(
        default=None,
        description="OpenAI-compatible endpoint for the GREEN-style report score (report_green); "
        "None: off.",
    )
