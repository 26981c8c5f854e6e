"""Record contracts shared by every stage.

A record is one line of a stage's ``data.jsonl``. Image and mask paths are relative to the folder
that holds the ``data.jsonl`` (the dataset root), never absolute.

Text fields are checked as they are parsed, so a bad line becomes a reject with the field named
(see ``fire_mpo_core.store.read_jsonl``): ids are one line of printable text; questions,
answers and references must hold a visible character, no NUL or other control character (tab
and newline aside), and stay under a length cap (``MAX_TEXT_CHARS``; a 1 MB "answer" is a broken
export, not an answer).
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

#: Longest question / answer / reference / response accepted, in characters.
MAX_TEXT_CHARS = 20_000
MAX_ID_CHARS = 256
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def _text(v: str) -> str:
    bad = _CONTROL.search(v)
    if bad:
        raise ValueError(f"contains control character {bad.group()!r} at position {bad.start()}")
    if v and not v.strip():
        raise ValueError("is only whitespace")
    return v


def _ident(v: str) -> str:
    if not v.isprintable() or v != v.strip():
        raise ValueError("must be printable text without surrounding whitespace")
    return v


#: Free text: no NUL / control characters, not only whitespace, at most MAX_TEXT_CHARS.
Text = Annotated[str, Field(max_length=MAX_TEXT_CHARS), AfterValidator(_text)]
#: An id or a relative path: one printable line.
Ident = Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS), AfterValidator(_ident)]

Split = Literal["train", "val", "test"]
AnswerType = Literal["closed", "open", "report"]
Quadrant = Literal["upper left", "upper right", "lower left", "lower right"]


class Lesion(BaseModel):
    """One lesion of a SynthLesion scan; locations are in the patient's frame (radiological
    convention: the patient's left is on the image's right)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    center_xy: tuple[int, int] = Field(description="Centre in image pixels (x = column, y = row).")
    radius_px: float = Field(gt=0, description="Mean radius in pixels.")
    size: Literal["small", "medium", "large"] = Field(description="Size class from the radius.")
    side: Literal["left", "right"] = Field(description="Patient side (image right = patient left).")
    vertical: Literal["upper", "lower"] = Field(description="Upper or lower half of the image.")
    quadrant: Quadrant = Field(description="'<vertical> <side>', in the patient's frame.")
    intensity: Literal["hyperdense", "hypodense"] = Field(
        description="Brighter or darker than tissue."
    )
    shape: Literal["round", "oval", "irregular"] = Field(description="Outline class.")
    mask: str = Field(description="Relative path of this lesion's own binary mask PNG.")


class VQARecord(BaseModel):
    """One (image, question, answer) sample; reports are the `report` answer type."""

    model_config = ConfigDict(extra="forbid")

    id: Ident = Field(description="Unique, stable id.")
    image: Ident = Field(description="Relative path of the image file.")
    mask: Ident | None = Field(
        default=None, description="Relative path of the union lesion mask PNG (None: no lesion)."
    )
    question: Text = Field(min_length=1, description="The question (or report prompt).")
    answer: Text = Field(min_length=1, description="Canonical short answer, in the model's style.")
    reference: Text | None = Field(
        default=None,
        description="The dataset's reference text in its own (different) style (gt_style pairs).",
    )
    answer_type: AnswerType
    question_type: str = Field(description="presence, location, side, count, size, modality, ...")
    split: Split
    modality: str | None = None
    dataset: str = "synthlesion"
    lesions: list[Lesion] = Field(default_factory=list)


class Rollout(BaseModel):
    """One on-policy answer sampled from the policy (a line of the `sample` stage)."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(description="'<record id>#<sample index>'.")
    record_id: str
    sample_index: int = Field(ge=0)
    question: str
    response: str
    engine: str = Field(description="hf, vllm or openai.")
    model_key: str = Field(description="Store key (or name) of the model/adapter that sampled it.")
    seed: int


Span = tuple[int, int]


class PreferencePair(BaseModel):
    """A minimal-edit chosen/rejected pair with the changed spans marked (a line of `judge`).

    Spans are half-open character offsets [start, end) into `chosen` / `rejected`; the text outside
    the spans is identical in both. Image paths are relative to the dataset root of the
    `prepare` stage (`image_root` of the manifest); `corrupted_image` is filled by `corrupt`,
    relative to the corrupt stage's own folder.
    """

    model_config = ConfigDict(extra="forbid")

    id: str
    record_id: str
    image: str
    mask: str | None = None
    question: str
    answer_type: AnswerType
    chosen: str = Field(min_length=1)
    rejected: str = Field(min_length=1)
    chosen_spans: list[Span] = Field(min_length=1)
    rejected_spans: list[Span] = Field(min_length=1)
    verdict: Literal["correct", "incorrect"] = Field(
        description="Judge verdict on the sampled response (incorrect: it is `rejected`)."
    )
    style: Literal["on_policy", "gt_style", "style_agnostic"] = "on_policy"
    corrupted_image: str | None = None
    reverses_on_removal: bool | None = Field(
        default=None,
        description="True when removing the lesion (v') makes `rejected` the right answer, so "
        "the reverse visual term r(v', y-) > r(v', y+) is semantically right for this pair "
        "(see `lesion_removal_reverses`); None: not known (pairs written before this field).",
    )

    @classmethod
    def for_record(
        cls,
        record: VQARecord,
        rollout_id: str,
        chosen: tuple[str, list[Span]],
        rejected: tuple[str, list[Span]],
        verdict: Literal["correct", "incorrect"],
        style: Literal["on_policy", "gt_style", "style_agnostic"] = "on_policy",
    ) -> PreferencePair:
        """A pair for `record` (image, mask, question copied) from (text, spans) of each side."""
        return cls(
            id=rollout_id,
            record_id=record.id,
            image=record.image,
            mask=record.mask,
            question=record.question,
            answer_type=record.answer_type,
            chosen=chosen[0],
            rejected=rejected[0],
            chosen_spans=chosen[1],
            rejected_spans=rejected[1],
            verdict=verdict,
            style=style,
            reverses_on_removal=lesion_removal_reverses(record, chosen[0], rejected[0]),
        )


#: Question types whose "yes" becomes "no" once every lesion is removed (closed), or whose answer
#: becomes "none" (open).
_YES_TO_NO = frozenset({"presence", "quadrant", "count"})
_TO_NONE = frozenset({"count", "abnormality"})


def _first_word(text: str) -> str:
    words = re.findall(r"[a-z0-9]+", text.lower())
    return words[0] if words else ""


def lesion_removal_reverses(record: VQARecord, chosen: str, rejected: str) -> bool:
    """Whether v' (the image with its lesions removed) makes ``rejected`` the right answer.

    The paper's reverse visual term asks r(v', y-) > r(v', y+) of every pair. That is right only
    where y+ asserts the lesion that v' removes and y- denies it: a closed presence / quadrant /
    count question answered "yes" by y+ and "no" by y-, or an open count / abnormality question
    whose y- is "none". For a modality question, a "no" answer, a lesion attribute or a
    lesion-free scan it pushes toward the wrong answer (measured on SynthLesion: right for 23%
    of pairs). Needs the record's lesion mask (no mask: nothing is removed)."""
    if not record.mask:
        return False
    qtype = record.question_type.strip().lower()
    if record.answer_type == "closed" and qtype in _YES_TO_NO:
        return _first_word(chosen) == "yes" and _first_word(rejected) == "no"
    if record.answer_type == "open" and qtype in _TO_NONE:
        return _first_word(rejected) == "none" and _first_word(chosen) != "none"
    return False
