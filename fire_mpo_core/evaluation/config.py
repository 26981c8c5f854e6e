"""Configuration of the `evaluate` stage: split, generation budget, grounding probes, judges.

from fire_mpo_core.evaluation.config import EvaluateConfig
cfg = EvaluateConfig(split="val", grounding_max_samples=160)
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from fire_mpo_core.openai_client import OpenAIEndpointConfig
from fire_mpo_core.schema import StrictConfig

#: Metrics of metrics.json by which rounds can be ranked: rates and scores where higher is
#: better (the loop's headline, `loop.metric`). Left out: counts, interval ends, `blind_accuracy`
#: (high means the language prior answers without the image) and `visual_logp_drop` (a size of
#: effect, not a score).
SELECTION_METRICS = (
    "grounded_accuracy",
    "grounded_accuracy_closed",
    "keep_accuracy",
    "flip_given_right",
    "presence_balanced_accuracy",
    "closed_accuracy",
    "closed_lesion_accuracy",
    "closed_modality_accuracy",
    "open_exact_match",
    "open_recall",
    "open_f1",
    "open_llm_accuracy",
    "report_bleu",
    "report_rouge_l",
    "report_token_f1",
    "report_green",
    "clinical_precision",
    "clinical_recall",
    "clinical_f1",
    "lesion_attention_ratio",
)


class EvaluateConfig(StrictConfig):
    """Benchmark evaluation of a policy on a split."""

    split: Literal["val", "test"] = Field(
        default="test", description="Split to evaluate (metrics.json): the reported numbers."
    )
    selection_split: Literal["val"] | None = Field(
        default="val",
        description="Split of the second pass whose metrics (val_metrics.json, `val_` keys of "
        "history.jsonl) rank the rounds and decide whether to continue (never the test split); "
        "None: no second pass (decisions then have no value).",
    )
    selection_max_samples: int | None = Field(
        default=None,
        ge=1,
        description="Score only the first N records of selection_split (None: all); the "
        "grounding probes keep their own cap, grounding_max_samples.",
    )
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
