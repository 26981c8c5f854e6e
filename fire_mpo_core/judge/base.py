"""The judge interface: config, result types, the ``Judge`` protocol and the batch helper.

A judge turns one on-policy rollout of a record into a minimal-edit preference pair (FiRe-MPO
step 1, DESIGN.md section 1) or a :class:`Rejection` that says why it could not::

    from fire_mpo_core.judge import JudgeConfig, build_judge, judge_rollouts
    judge = build_judge(JudgeConfig(name="rules"), records)   # records: the dataset's VQARecords
    result = judge.judge(record, rollout)                     # PreferencePair | Rejection
    pairs, rejects = judge_rollouts(judge, records, rollouts)

A new judge (the LLM judge over an OpenAI-compatible endpoint, say) is one class with
``__init__(self, config: JudgeConfig, records: Sequence[VQARecord])`` and
``judge(record, rollout) -> JudgeResult``, plus one line in ``fire_mpo_core.judge.JUDGES``; its
endpoint settings go in an optional sub-model of :class:`JudgeConfig`. Every judge's pairs must
pass :func:`fire_mpo_core.judge.validate.validate_pair`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Literal, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fire_mpo_core.data.records import PreferencePair, Rollout, VQARecord
from fire_mpo_core.judge.llm import LLMJudgeConfig

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

    @field_validator("name")
    @classmethod
    def _known_judge(cls, v: str) -> str:
        from fire_mpo_core.judge import JUDGES  # the registry imports this module

        if v not in JUDGES:
            raise ValueError(f"unknown judge {v!r}; known: {sorted(JUDGES)}")
        return v

    @model_validator(mode="after")
    def _llm_section(self) -> JudgeConfig:
        if self.name == "llm" and self.llm is None:
            raise ValueError("name='llm' needs the `llm` section (endpoint, model, prompts)")
        return self


class Rejection(BaseModel):
    """A rollout the judge turned into no pair (a line of the stage's ``rejects.jsonl``)."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(description="Rollout id.")
    record_id: str = Field(description="Id of the record the rollout answers.")
    code: RejectCode = Field(description="Machine-readable kind of rejection.")
    reason: str = Field(min_length=1, description="What went wrong, for a human.")
    verdict: Literal["correct", "incorrect"] | None = Field(
        default=None, description="The verdict, when one was reached before the rejection."
    )


JudgeResult = PreferencePair | Rejection


@runtime_checkable
class Judge(Protocol):
    """Turns (record, rollout) into a preference pair or a rejection. Deterministic per config."""

    config: JudgeConfig

    def judge(self, record: VQARecord, rollout: Rollout) -> JudgeResult: ...


def stable_seed(seed: int, key: str) -> int:
    """64-bit seed from a config seed and a string (a rollout id), stable across processes and
    Python versions (unlike ``hash()``, which is salted per process)."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def judge_rollouts(
    judge: Judge,
    records: Mapping[str, VQARecord] | Sequence[VQARecord],
    rollouts: Iterable[Rollout],
    on_progress: Callable[[int], None] | None = None,
) -> tuple[list[PreferencePair], list[Rejection]]:
    """Judge every rollout; a rollout whose record is missing becomes an ``unknown_record``
    rejection. Returns (pairs, rejections) in rollout order. ``on_progress(n_done)`` is called
    after each rollout (an LLM judge takes seconds per rollout: worth a progress bar)."""
    by_id = records if isinstance(records, Mapping) else {r.id: r for r in records}
    pairs: list[PreferencePair] = []
    rejects: list[Rejection] = []
    for ro in rollouts:
        rec = by_id.get(ro.record_id)
        if rec is None:
            rejects.append(
                Rejection(
                    id=ro.id,
                    record_id=ro.record_id,
                    code="unknown_record",
                    reason=f"record {ro.record_id!r} is not in the dataset",
                )
            )
            continue
        res = judge.judge(rec, ro)
        (pairs if isinstance(res, PreferencePair) else rejects).append(res)
        if on_progress is not None:
            on_progress(len(pairs) + len(rejects))
    return pairs, rejects
