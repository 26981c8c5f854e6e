"""Configuration of the `judge` stage: the judge, its pair style and minimality caps, and the
LLM judge's endpoint and prompts.

    from fire_mpo_core.judge.config import JudgeConfig
    cfg = JudgeConfig(name="rules", style="on_policy", max_changed_words=3)

The judge name is checked against the registry (:data:`fire_mpo_core.judge.JUDGES`) by the
cycle config and by :func:`fire_mpo_core.judge.build_judge`, not here: the registry imports the
judges, which import this module.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fire_mpo_core.openai_client import OpenAIEndpointConfig

PROMPT_DIR = Path(__file__).with_name("prompts")
PROMPT_NAME = re.compile(r"^[a-z0-9_]+_v[0-9]+$")


class LLMJudgeConfig(BaseModel):
    """Settings of the LLM judge: the endpoint and how to ask it."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, hide_input_in_errors=True)

    endpoint: OpenAIEndpointConfig = Field(
        description="OpenAI-compatible endpoint(s), key env var, concurrency, timeouts, retries."
    )
    vqa_prompt: str = Field(
        default="judge_vqa_v1", description="Prompt file (without .txt) for closed/open answers."
    )
    report_prompt: str = Field(
        default="judge_report_v1", description="Prompt file (without .txt) for reports."
    )
    temperature: float = Field(default=0.0, ge=0, description="Judge sampling temperature.")
    max_tokens: int = Field(default=1024, ge=16, description="Reply budget in tokens.")
    response_format: Literal["json_schema", "json_object", "none"] = Field(
        default="json_schema",
        description="Structured output mode: json_schema (strict schema), json_object (any "
        "JSON; for servers without schemas) or none (prompt only).",
    )

    @field_validator("vqa_prompt", "report_prompt")
    @classmethod
    def _prompt_exists(cls, v: str) -> str:
        if not PROMPT_NAME.match(v) or not (PROMPT_DIR / f"{v}.txt").is_file():
            known = sorted(p.stem for p in PROMPT_DIR.glob("*.txt"))
            raise ValueError(f"unknown judge prompt {v!r}; known: {known}")
        return v

    @field_validator("endpoint")
    @classmethod
    def _endpoint_complete(cls, v: OpenAIEndpointConfig) -> OpenAIEndpointConfig:
        if not v.base_urls or not v.model:
            raise ValueError("the LLM judge needs endpoint.base_urls and endpoint.model")
        return v


PairStyle = Literal["on_policy", "gt_style", "style_agnostic"]
RejectCode = Literal[
    "empty_response",  # nothing but whitespace / punctuation
    "no_answer_found",  # no answer of the question's kind in the response (gibberish, refusal)
    "partial_answer",  # a list answer with fewer items than the reference
    "no_counterfactual",  # correct, but no plausible wrong alternative to write
    "not_minimal",  # the correction needs more than the per-sentence word cap
    "omission",  # a report misses reference findings, which no in-place edit can add
    "no_reference",  # gt_style: the reference text does not state the answer
    "invalid_pair",  # the built pair failed the validator (a judge bug or a non-minimal edit)
    "unknown_record",  # the rollout's record id is not in the dataset
    "endpoint_error",  # the LLM judge's endpoint failed after its retries (transient: redone)
]


class JudgeConfig(BaseModel):
    """Settings of the `judge` stage."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    name: str = Field(
        default="rules",
        description="Judge in the registry fire_mpo_core.judge.JUDGES: 'rules' (deterministic).",
    )
    style: PairStyle = Field(
        default="on_policy",
        description=(
            "Pair style (the paper's ablation): 'on_policy' edits the model's own answer; "
            "'gt_style' uses the dataset's reference text as chosen; 'style_agnostic' puts both "
            "answers in one neutral template ('The answer is X.')."
        ),
    )
    max_changed_fraction: float = Field(
        default=0.5,
        gt=0.0,
        le=1.0,
        description=(
            "Minimality cap: changed word tokens / word tokens of the longer side, checked for "
            "texts of at least `fraction_min_words` words."
        ),
    )
    max_changed_words: int = Field(
        default=3,
        ge=1,
        description=(
            "Most changed words per sentence of a report, and per answer shorter than "
            "`fraction_min_words` words (a bare answer is all clinical span)."
        ),
    )
    fraction_min_words: int = Field(
        default=4,
        ge=1,
        description="Texts shorter than this are bare answers: only `max_changed_words` applies.",
    )
    llm: LLMJudgeConfig | None = Field(
        default=None,
        description="Endpoint, model and prompts of the `llm` judge (required when name='llm').",
    )
    seed: int = Field(
        default=0,
        description=(
            "Seed of the counterfactual choice; combined with a SHA-256 of the rollout id, so "
            "the same rollout gets the same pair in any process."
        ),
    )
    shards: int = Field(
        default=1,
        ge=1,
        le=1024,
        description=(
            "Split the rollouts into this many contiguous shards judged in parallel as Prefect "
            "tasks (threads, or a Dask cluster: docs/gpu.md); 1 judges in the stage task. The "
            "merged output is byte-identical for any value."
        ),
    )

    @model_validator(mode="after")
    def _llm_section(self) -> JudgeConfig:
        if self.name == "llm" and self.llm is None:
            raise ValueError("name='llm' needs the `llm` section (endpoint, model, prompts)")
        return self
