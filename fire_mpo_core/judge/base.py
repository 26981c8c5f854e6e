"""The judge interface: config, result types, the ``Judge`` protocol and the batch helper.

A judge turns one on-policy rollout of a record into a minimal-edit preference pair (FiRe-MPO
step 1, docs/design.md section 1) or a :class:`Rejection` that says why it could not::

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

from pydantic import BaseModel, ConfigDict, Field

from fire_mpo_core.data.records import PreferencePair, Rollout, VQARecord
from fire_mpo_core.judge.config import JudgeConfig, RejectCode
from fire_mpo_core.openai_client import LLMUsage


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


class Judged(BaseModel):
    """What judging a batch of rollouts gave: pairs and rejections in rollout order, and the
    endpoint's :class:`LLMUsage` for a judge that calls one (None for an offline judge)."""

    model_config = ConfigDict(extra="forbid")

    pairs: list[PreferencePair] = Field(default_factory=list, description="Valid pairs.")
    rejections: list[Rejection] = Field(default_factory=list, description="Rollouts without.")
    usage: LLMUsage | None = Field(default=None, description="Endpoint usage, if any.")


def judge_usage(judge: object) -> LLMUsage | None:
    """The endpoint usage of ``judge`` so far: its ``usage`` ledger (a judge that calls an
    endpoint keeps one, as :class:`~fire_mpo_core.judge.llm.LLMJudge` does), else None."""
    ledger = getattr(judge, "usage", None)
    return ledger.snapshot() if ledger is not None else None


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
    rejection. Returns (pairs, rejections), each in rollout order. A judge with
    ``judge_many`` (the LLM judge: ``endpoint.max_concurrency`` requests in flight) gets the
    whole batch at once; others are called one rollout at a time, with ``on_progress(n_done)``
    after each (an LLM judge takes seconds per rollout: worth a progress bar)."""
    by_id = records if isinstance(records, Mapping) else {r.id: r for r in records}
    pairs: list[PreferencePair] = []
    rejects: list[Rejection] = []
    known: list[tuple[VQARecord, Rollout]] = []
    position: dict[str, int] = {}
    for ro in rollouts:
        position[ro.id] = len(position)
        rec = by_id.get(ro.record_id)
        if rec is not None:
            known.append((rec, ro))
            continue
        rejects.append(
            Rejection(
                id=ro.id,
                record_id=ro.record_id,
                code="unknown_record",
                reason=f"record {ro.record_id!r} is not in the dataset",
            )
        )
    many = getattr(judge, "judge_many", None)
    results = many(known) if many is not None else (judge.judge(rec, ro) for rec, ro in known)
    for res in results:
        (pairs if isinstance(res, PreferencePair) else rejects).append(res)
        if on_progress is not None:
            on_progress(len(pairs) + len(rejects))
    rejects.sort(key=lambda r: position.get(r.id, -1))  # unknown_record ones among the rest
    return pairs, rejects
