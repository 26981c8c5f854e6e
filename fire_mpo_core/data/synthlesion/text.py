"""SynthLesion's answer texts: the question record, canonical wording and the sentence frame.

:class:`QA` is one question with its canonical short answer (the model's style) and its verbose
reference (another style). A stable share of the question phrasings gets its answers as a
model-style sentence (:func:`framed`, :func:`sentence_answer`)::

    sentence_answer("upper left")   # 'Upper left, based on the image.'
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from fire_mpo_core.data.synthlesion.labels import QUADRANTS
from fire_mpo_core.data.synthlesion.render import RenderedLesion

MODALITY_NAME = {"ct": "CT", "mri": "MRI", "x-ray": "X-ray"}
MODALITY_LONG = {
    "ct": "a computed tomography (CT) image",
    "mri": "a magnetic resonance imaging (MRI) image",
    "x-ray": "a plain radiograph (X-ray)",
}


@dataclass(frozen=True)
class QA:
    """One question with its canonical answer and its verbose reference."""

    question: str
    answer: str
    reference: str
    answer_type: str
    question_type: str
    key: str = ""  # the fact asked (type + parameter); two phrasings of a fact share it


def yn(flag: bool) -> str:
    return "yes" if flag else "no"


def describe(les: RenderedLesion) -> str:
    return f"{les.intensity} {les.shape} lesion"


def in_quadrant_order(lesions: Sequence[RenderedLesion]) -> list[RenderedLesion]:
    return sorted(lesions, key=lambda le: QUADRANTS.index(le.quadrant))


#: The model-style sentence frame of a short answer (``DataConfig.sentence_fraction``).
SENTENCE_FRAME = "{}, based on the image."


def sentence_answer(short: str) -> str:
    """A short answer as a model-style sentence: ``"upper left"`` -> ``"Upper left, based on the
    image."``. The frame carries no clinical word, so a judge's minimal edit changes only the
    answer words and most response tokens lie outside the marked spans (span-level ranking and
    the span KL then differ from sequence-level DPO)."""
    return SENTENCE_FRAME.format(short[:1].upper() + short[1:])


def framed(question: str, fraction: float) -> bool:
    """Whether answers to this question phrasing are sentences: a stable digest of the phrasing,
    so each phrasing always gets one format (a model can learn which) and about ``fraction`` of
    the phrasings are framed."""
    digest = hashlib.blake2b(question.encode(), digest_size=4).digest()
    return int.from_bytes(digest, "big") / 2**32 < fraction
