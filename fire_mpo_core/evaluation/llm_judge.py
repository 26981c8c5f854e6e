"""Optional LLM scoring through an OpenAI-compatible endpoint: open-answer correctness and a
GREEN-style report score. Both are off by default (``EvaluateConfig.llm_judge`` / ``green``).

    from fire_mpo_core.evaluation.llm_judge import judge_open_answers, green_scores
    verdicts = judge_open_answers(endpoint, [OpenItem(id, question, reference, prediction)])
    scores = green_scores(endpoint, [ReportItem(id, reference, prediction)])

* **Open answers** (the paper's LLM judge for SLAKE / VQA-RAD open questions): the model replies
  ``{"correct": true|false}``; ``open_llm_accuracy`` is the share judged correct.
* **GREEN-style report score** (Ostmeier et al., 2024, "GREEN: Generative Radiology Report
  Evaluation and Error Notation"): the model counts the candidate's clinically significant
  errors in GREEN's six categories (a) false finding, (b) missed finding, (c) wrong location,
  (d) wrong severity, (e) comparison not in the reference, (f) omitted comparison, and the
  matched findings; ``score = matched / (matched + sum of significant errors)`` (0 when nothing
  matched), averaged as ``report_green``. The original GREEN uses its own fine-tuned model; any
  capable chat model can be pointed at this prompt, so the number is "GREEN-style", not GREEN.

Replies that are not the asked JSON are retried (:class:`RetryableError`); a record whose
request still fails is reported through ``on_reject(id, reason)`` and left out of the mean,
never a crash. Requests run concurrently up to the endpoint's ``max_concurrency``. Pass a
:class:`~fire_mpo_core.openai_client.UsageLedger` as ``usage`` to count requests and tokens.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from fire_mpo_core.openai_client import (
    ChatClient,
    ChatFailure,
    OpenAIEndpointConfig,
    RetryableError,
    UsageLedger,
)

OPEN_SYSTEM = (
    "You grade answers to medical visual question answering. Decide whether the candidate "
    "answer means the same as the reference answer for the question: synonyms, abbreviations "
    "and extra harmless words are fine; a different organ, side, location, finding, count or "
    'modality is wrong. Reply with JSON only: {"correct": true} or {"correct": false}.'
)
GREEN_SYSTEM = (
    "You are an expert radiologist comparing a candidate radiology report with a reference "
    "report. Count the candidate's clinically significant errors in each category:\n"
    "(a) false report of a finding in the candidate;\n"
    "(b) missing a finding that the reference reports;\n"
    "(c) misidentification of a finding's anatomic location or position;\n"
    "(d) misassessment of the severity of a finding;\n"
    "(e) mentioning a comparison that is not in the reference;\n"
    "(f) omitting a comparison that details a change from a prior study.\n"
    "Also count the findings that the two reports match on. Reply with JSON only: "
    '{"significant_errors": {"a": int, "b": int, "c": int, "d": int, "e": int, "f": int}, '
    '"matched_findings": int}'
)
GREEN_CATEGORIES = ("a", "b", "c", "d", "e", "f")
_JSON = re.compile(r"\{.*\}", re.DOTALL)


@dataclass(frozen=True)
class OpenItem:
    id: str
    question: str
    reference: str
    prediction: str


@dataclass(frozen=True)
class ReportItem:
    id: str
    reference: str
    prediction: str


def parse_json_reply(completion: Any) -> dict[str, Any]:
    """The JSON object of a chat completion's first choice (code fences and prose around it
    tolerated). Raises :class:`RetryableError` if there is none."""
    try:
        text = completion.choices[0].message.content or ""
    except (AttributeError, IndexError):
        raise RetryableError("reply has no message content") from None
    m = _JSON.search(text)
    if not m:
        raise RetryableError(f"reply is not JSON: {text[:80]!r}")
    try:
        obj = json.loads(m.group())
    except json.JSONDecodeError as e:
        raise RetryableError(f"reply is not valid JSON: {e}") from None
    if not isinstance(obj, dict):
        raise RetryableError("reply JSON is not an object")
    return obj


def _open_verdict(completion: Any) -> bool:
    obj = parse_json_reply(completion)
    if not isinstance(obj.get("correct"), bool):
        raise RetryableError('reply lacks a boolean "correct"')
    return obj["correct"]


def _count(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise RetryableError(f"{what} must be a non-negative integer, got {value!r}")
    return value


def green_score(matched: int, errors: int) -> float:
    """GREEN's score from the counts: ``matched / (matched + errors)``, 0 when nothing matched."""
    return matched / (matched + errors) if matched > 0 else 0.0


def _green(completion: Any) -> dict[str, Any]:
    obj = parse_json_reply(completion)
    errs = obj.get("significant_errors")
    if not isinstance(errs, dict):
        raise RetryableError('reply lacks the "significant_errors" object')
    counts = {c: _count(errs.get(c, 0), f"significant_errors.{c}") for c in GREEN_CATEGORIES}
    matched = _count(obj.get("matched_findings"), "matched_findings")
    return {
        "green": green_score(matched, sum(counts.values())),
        "matched_findings": matched,
        "significant_errors": counts,
    }


def _run(
    cfg: OpenAIEndpointConfig,
    items: Sequence[Any],
    messages: Callable[[Any], list[dict[str, str]]],
    validate: Callable[[Any], Any],
    on_reject: Callable[[str, str], None] | None,
    client: ChatClient | None,
    usage: UsageLedger | None = None,
) -> dict[str, Any]:
    own = client is None
    client = client or ChatClient(cfg, usage=usage)
    out: dict[str, Any] = {}

    def one(it: Any) -> None:
        try:
            out[it.id] = client.complete(
                messages(it), validate=validate, temperature=0.0, max_tokens=256
            )
        except ChatFailure as e:
            if on_reject is not None:
                on_reject(it.id, f"llm evaluation failed after {e.attempts} attempts: {e.reason}")

    try:
        with ThreadPoolExecutor(max_workers=cfg.max_concurrency) as pool:
            list(pool.map(one, items))
    finally:
        if own:
            client.close()
    return out


def judge_open_answers(
    cfg: OpenAIEndpointConfig,
    items: Sequence[OpenItem],
    on_reject: Callable[[str, str], None] | None = None,
    client: ChatClient | None = None,
    usage: UsageLedger | None = None,
) -> dict[str, bool]:
    """Record id -> judged correct, for every item whose request succeeded."""

    def messages(it: OpenItem) -> list[dict[str, str]]:
        user = (
            f"Question: {it.question}\nReference answer: {it.reference}\n"
            f"Candidate answer: {it.prediction}"
        )
        return [{"role": "system", "content": OPEN_SYSTEM}, {"role": "user", "content": user}]

    return _run(cfg, items, messages, _open_verdict, on_reject, client, usage)


def green_scores(
    cfg: OpenAIEndpointConfig,
    items: Sequence[ReportItem],
    on_reject: Callable[[str, str], None] | None = None,
    client: ChatClient | None = None,
    usage: UsageLedger | None = None,
) -> dict[str, dict[str, Any]]:
    """Record id -> ``{"green", "matched_findings", "significant_errors"}`` per report."""

    def messages(it: ReportItem) -> list[dict[str, str]]:
        user = f"Reference report:\n{it.reference}\n\nCandidate report:\n{it.prediction}"
        return [{"role": "system", "content": GREEN_SYSTEM}, {"role": "user", "content": user}]

    return _run(cfg, items, messages, _green, on_reject, client, usage)
