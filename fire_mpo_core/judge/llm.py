"""The LLM judge: any OpenAI-compatible chat model turns a rollout into a minimal-edit pair.

The paper's two judge steps are the two parts of one structured reply (JSON schema
``response_format``, strict), so both are checked together and retried together:

1. ``verdict`` (``correct`` / ``incorrect`` against the reference answer) and
   ``edited_response``: the sampled answer with only the clinical span changed, to the right
   answer if it was wrong, to a plausible wrong one (a counterfactual) if it was right;
2. ``changes``: the changed spans as ``{"original": ..., "edited": ...}`` substrings.

The judge's substrings are not trusted: :func:`locate_changes` finds their offsets, checks that
applying them to the response gives ``edited_response`` exactly, and trims words the two sides
share ("left lung" -> "right lung" marks only "left" / "right"). The pair then has to pass the
shared minimality validator :func:`fire_mpo_core.judge.validate.validate_pair`. Replies that are
not JSON, miss fields, have spans that do not match the text, are not minimal, or write
instructions the sampled response did not hold (a prompt injection at work) are retried with the
same backoff as transport errors (:mod:`fire_mpo_core.openai_client`), then rejected with the
reason::

    judge = LLMJudge(JudgeConfig(name="llm", llm=LLMJudgeConfig(endpoint={...})), records)
    result = judge.judge(record, rollout)          # PreferencePair | Rejection
    results = judge.judge_many(zip(recs, rolls))   # concurrent, in input order

Prompts are versioned text files in ``prompts/`` (``judge_vqa_v1.txt``, ``judge_report_v1.txt``);
a changed prompt is a new file and a new version name in the config, never an edit in place.
"""

from __future__ import annotations

import hashlib
import json
import re
import string
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fire_mpo_core.clinical.edits import Span, outside_spans
from fire_mpo_core.data.records import PreferencePair, Rollout, VQARecord
from fire_mpo_core.judge.base import JudgeResult, Rejection
from fire_mpo_core.judge.config import PROMPT_DIR, PROMPT_NAME, JudgeConfig, LLMJudgeConfig
from fire_mpo_core.judge.validate import validate_pair
from fire_mpo_core.openai_client import (
    ChatClient,
    ChatFailure,
    RetryableError,
)

__all__ = [
    "JUDGE_SCHEMA",
    "PROMPT_DIR",
    "JudgeReply",
    "LLMJudge",
    "LLMJudgeConfig",
    "Prompt",
    "find_instructions",
    "load_prompt",
    "locate_changes",
]

# --------------------------------------------------------------------------- prompts


@dataclass(frozen=True)
class Prompt:
    """A versioned prompt: system text and a user template with ``$question``, ``$reference``,
    ``$response`` and ``$max_words`` placeholders."""

    name: str
    system: string.Template
    user: string.Template
    digest: str  # sha256 of the file, for stage keys and provenance

    def messages(self, **values: Any) -> list[dict[str, str]]:
        return [
            {"role": "system", "content": self.system.substitute(values)},
            {"role": "user", "content": self.user.substitute(values)},
        ]


@cache
def load_prompt(name: str) -> Prompt:
    """Read ``prompts/<name>.txt``: a ``=== system ===`` part, then a ``=== user ===`` part."""
    if not PROMPT_NAME.match(name):
        raise ValueError(f"bad prompt name {name!r} (expected e.g. judge_vqa_v1)")
    raw = (PROMPT_DIR / f"{name}.txt").read_text(encoding="utf-8")
    m = re.fullmatch(r"=== system ===\n(.*?)\n=== user ===\n(.*)", raw, flags=re.S)
    if not m:
        raise ValueError(f"prompt {name}: expected '=== system ===' then '=== user ===' parts")
    return Prompt(
        name=name,
        system=string.Template(m.group(1).strip()),
        user=string.Template(m.group(2).strip()),
        digest=hashlib.sha256(raw.encode()).hexdigest(),
    )


# --------------------------------------------------------------------------- reply


class Change(BaseModel):
    model_config = ConfigDict(extra="forbid")

    original: str = Field(description="Exact substring of the model answer that was replaced.")
    edited: str = Field(description="Exact substring of edited_response that replaces it.")


class JudgeReply(BaseModel):
    """The judge's structured reply: step 1 (verdict, edited_response), step 2 (changes)."""

    model_config = ConfigDict(extra="forbid")

    verdict: Literal["correct", "incorrect"]
    edited_response: str = Field(min_length=1)
    changes: list[Change] = Field(min_length=1)


#: The JSON schema sent as ``response_format`` (strict mode: every field required, no extras).
JUDGE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "verdict": {"type": "string", "enum": ["correct", "incorrect"]},
        "edited_response": {"type": "string"},
        "changes": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"original": {"type": "string"}, "edited": {"type": "string"}},
                "required": ["original", "edited"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["verdict", "edited_response", "changes"],
    "additionalProperties": False,
}

_INSTRUCTION_PATTERNS = [
    r"\b(?:ignore|disregard|forget|override)\b[\w\s,]{0,30}\b(?:instructions?|prompts?|rules?)\b",
    r"\b(?:system|developer)\s+(?:prompt|message|instructions?)\b",
    r"\byou\s+are\s+(?:now\s+)?(?:an?\s+|the\s+)?(?:ai|assistant|language\s+model|chatbot)\b",
    r"\bas\s+an\s+ai\b",
    r"\b(?:new|updated|following)\s+instructions?\b",
    r"(?:^|\n)\s*(?:system|assistant|user)\s*:",
    r"<\|im_(?:start|end)\|>|<\|(?:system|user|assistant)\|>|\[/?INST\]",
]
_INSTRUCTION_RE = re.compile("|".join(f"(?:{p})" for p in _INSTRUCTION_PATTERNS), re.I)


def find_instructions(text: str) -> str | None:
    """The first instruction-like phrase in ``text`` (a prompt injection), or None."""
    m = _INSTRUCTION_RE.search(text)
    return m.group(0).strip() if m else None


class _BadReply(RetryableError):
    """A reply that arrived but cannot become a valid pair; ``code`` is the rejection kind."""

    def __init__(self, reason: str, code: str = "invalid_pair", verdict: str | None = None):
        super().__init__(reason)
        self.code = code
        self.verdict = verdict


def _parse_reply(content: str | None) -> JudgeReply:
    if not content or not content.strip():
        raise _BadReply("judge reply is empty")
    text = content.strip()
    fenced = re.fullmatch(r"```(?:json)?\s*(.*?)\s*```", text, flags=re.S)
    if fenced:  # json_object / none modes sometimes wrap the object in a code fence
        text = fenced.group(1)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise _BadReply(f"judge reply is not JSON ({e.msg} at char {e.pos})") from None
    try:
        return JudgeReply.model_validate(data)
    except ValidationError as e:
        fields = "; ".join(
            f"{'.'.join(map(str, err['loc'])) or '<reply>'}: {err['msg']}" for err in e.errors()
        )
        raise _BadReply(f"judge reply does not fit the schema: {fields}"[:400]) from None


# --------------------------------------------------------------------------- spans

_MAX_SEARCH_STEPS = 10_000


def _word_tokens(text: str) -> list[re.Match[str]]:
    return list(re.finditer(r"\S+", text))


def _trim(a: str, b: str) -> tuple[Span, Span]:
    """Sub-spans of ``a`` and ``b`` without the whole words they share at either end, keeping at
    least one word on each side (an insertion rides on its neighbour)."""
    ta, tb = _word_tokens(a), _word_tokens(b)
    if not ta or not tb:
        return (0, len(a)), (0, len(b))
    p = 0
    while p < min(len(ta), len(tb)) - 1 and ta[p].group() == tb[p].group():
        p += 1
    s = 0
    while (
        s < min(len(ta), len(tb)) - p - 1
        and ta[len(ta) - 1 - s].group() == tb[len(tb) - 1 - s].group()
    ):
        s += 1
    return (
        (ta[p].start(), ta[len(ta) - 1 - s].end()),
        (tb[p].start(), tb[len(tb) - 1 - s].end()),
    )


def locate_changes(
    original: str, edited: str, changes: Sequence[tuple[str, str]]
) -> tuple[list[Span], list[Span]]:
    """Character offsets of the judge's changes in both texts.

    Finds positions for the ``(original_substring, edited_substring)`` pairs, left to right, such
    that replacing them in ``original`` gives ``edited`` exactly (backtracking over repeated
    substrings: "left ... left" resolves to the occurrence that makes the texts agree), then trims
    the whole words both sides of a change share.

    Returns:
        (spans in ``original``, spans in ``edited``): sorted, non-overlapping ``[start, end)``.

    Raises:
        ValueError: with the reason, when a side is empty or no placement reproduces ``edited``.
    """
    for k, (o, e) in enumerate(changes):
        if not o.strip() or not e.strip():
            raise ValueError(f"change {k} has an empty side ({o!r} -> {e!r})")
    steps = 0

    def place(k: int, i: int, j: int) -> list[tuple[int, int]] | None:
        # i, j: cursors in original / edited; returns start positions (in original, edited).
        nonlocal steps
        if k == len(changes):
            return [] if original[i:] == edited[j:] else None
        o, e = changes[k]
        q = original.find(o, i)
        while q != -1:
            steps += 1
            if steps > _MAX_SEARCH_STEPS:
                return None
            gap = q - i
            jq = j + gap
            if edited[j:jq] == original[i:q] and edited.startswith(e, jq):
                rest = place(k + 1, q + len(o), jq + len(e))
                if rest is not None:
                    return [(q, jq), *rest]
            q = original.find(o, q + 1)
        return None

    starts = place(0, 0, 0)
    if starts is None:
        raise ValueError(
            "the changes do not turn the response into edited_response "
            f"({len(changes)} change(s): {[c[0] for c in changes][:5]!r})"
        )
    raw_o = [(q, q + len(o)) for (q, _), (o, _) in zip(starts, changes)]
    raw_e = [(jq, jq + len(e)) for (_, jq), (_, e) in zip(starts, changes)]
    trim_o, trim_e = [], []
    for (a0, a1), (b0, b1) in zip(raw_o, raw_e):
        (x0, x1), (y0, y1) = _trim(original[a0:a1], edited[b0:b1])
        trim_o.append((a0 + x0, a0 + x1))
        trim_e.append((b0 + y0, b0 + y1))
    # Trimming assumes equal words are separated by equal whitespace; keep it only if so.
    if outside_spans(original, trim_o) == outside_spans(edited, trim_e):
        return trim_o, trim_e
    return raw_o, raw_e


# --------------------------------------------------------------------------- judge


class LLMJudge:
    """Minimal-edit pairs from an OpenAI-compatible chat model (on-policy pair style).

    Args:
        config: the judge stage config; ``config.llm`` holds the endpoint unless ``llm`` is given.
            Its minimality caps (``max_changed_words`` ...) go to the validator and the prompts.
        records: the dataset's records (unused: the record comes with each call; kept for the
            registry's constructor signature).
        llm: LLM settings, overriding ``config.llm``.
        client: a ready :class:`ChatClient` (tests, or sharing one across judges).

    ``usage`` is the client's :class:`~fire_mpo_core.openai_client.UsageLedger`: requests,
    retries and tokens of every judgement so far (the judge stage reports it).
    """

    #: Calls an endpoint: the judge stage reports its usage (llm_* rows) even when every
    #: rollout came from the resume journal.
    uses_endpoint = True

    def __init__(
        self,
        config: JudgeConfig,
        records: Sequence[VQARecord] = (),
        llm: LLMJudgeConfig | None = None,
        client: ChatClient | None = None,
    ):
        settings = llm or getattr(config, "llm", None)
        if settings is None:
            raise ValueError("the llm judge needs LLM settings (judge.llm: endpoint, prompts ...)")
        if config.style != "on_policy":
            raise ValueError(
                f"the llm judge builds on_policy pairs; judge.style is {config.style!r}"
            )
        self.config = config
        self.llm = settings
        self.client = client or ChatClient(settings.endpoint)
        self.usage = self.client.usage
        self.prompts = {
            "vqa": load_prompt(settings.vqa_prompt),
            "report": load_prompt(settings.report_prompt),
        }

    def _params(self) -> dict[str, Any]:
        params: dict[str, Any] = {
            "temperature": self.llm.temperature,
            "max_tokens": self.llm.max_tokens,
        }
        if self.llm.response_format == "json_schema":
            params["response_format"] = {
                "type": "json_schema",
                "json_schema": {
                    "name": "minimal_edit_pair",
                    "schema": JUDGE_SCHEMA,
                    "strict": True,
                },
            }
        elif self.llm.response_format == "json_object":
            params["response_format"] = {"type": "json_object"}
        return params

    def _build_pair(self, record: VQARecord, rollout: Rollout, reply: JudgeReply) -> PreferencePair:

        response, edited = rollout.response, reply.edited_response
        verdict = reply.verdict
        for text in [edited] + [c.edited for c in reply.changes]:
            hit = find_instructions(text)
            if hit and hit.lower() not in response.lower():
                raise _BadReply(
                    f"judge reply contains an instruction: {hit[:80]!r}", verdict=verdict
                )
        if edited == response:
            raise _BadReply("edited_response is the response unchanged", verdict=verdict)
        try:
            spans_resp, spans_edit = locate_changes(
                response, edited, [(c.original, c.edited) for c in reply.changes]
            )
        except ValueError as e:
            raise _BadReply(f"spans do not match the text: {e}", verdict=verdict) from None
        if verdict == "incorrect":  # y- = the sample, y+ = its correction
            chosen, rejected, cs, rs = edited, response, spans_edit, spans_resp
        else:  # y+ = the sample, y- = its counterfactual
            chosen, rejected, cs, rs = response, edited, spans_resp, spans_edit
        pair = PreferencePair.for_record(record, rollout.id, (chosen, cs), (rejected, rs), verdict)
        why = validate_pair(pair, response, self.config)
        if why:
            code = "not_minimal" if why.startswith("not minimal") else "invalid_pair"
            raise _BadReply(f"validator: {why}", code=code, verdict=verdict)
        return pair

    def judge(self, record: VQARecord, rollout: Rollout) -> JudgeResult:
        """One rollout -> a validated minimal-edit pair, or a rejection with the reason."""

        def reject(code: str, reason: str, verdict: str | None = None) -> Rejection:
            return Rejection(
                id=rollout.id, record_id=rollout.record_id, code=code, reason=reason,
                verdict=verdict,
            )  # fmt: skip

        if not re.search(r"[A-Za-z0-9]", rollout.response):
            return reject("empty_response", "the response holds no word")
        prompt = self.prompts["report" if record.answer_type == "report" else "vqa"]
        messages = prompt.messages(
            question=record.question,
            reference=record.answer,
            response=rollout.response,
            max_words=self.config.max_changed_words,
        )
        bad: list[_BadReply] = []

        def check(completion) -> PreferencePair:
            choice = completion.choices[0] if completion.choices else None
            content = choice.message.content if choice and choice.message else None
            try:
                return self._build_pair(record, rollout, _parse_reply(content))
            except _BadReply as e:
                bad.append(e)
                raise

        try:
            return self.client.complete(messages, validate=check, **self._params())
        except ChatFailure as e:
            if bad:  # the judge answered, but never with a valid pair: say what was wrong last
                return reject(bad[-1].code, f"llm judge: {e.reason}"[:1000], bad[-1].verdict)
            return reject("endpoint_error", f"llm judge endpoint failed: {e.reason}"[:1000])

    def judge_many(self, pairs: Iterable[tuple[VQARecord, Rollout]]) -> list[JudgeResult]:
        """Judge (record, rollout) pairs concurrently (``endpoint.max_concurrency`` at once);
        results in input order."""
        todo = list(pairs)
        workers = self.llm.endpoint.max_concurrency
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="llm-judge") as pool:
            return list(pool.map(lambda rr: self.judge(*rr), todo))
