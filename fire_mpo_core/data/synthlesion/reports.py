"""SynthLesion's IU-Xray-style reports: 1-2 clinical sentences among filler sentences.

The reference is a differently worded report of the same facts, in the same order::

    qa = make_report(rng, "ct", lesions)   # QA(answer_type="report", ...)
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fire_mpo_core.data.synthlesion.labels import location_words
from fire_mpo_core.data.synthlesion.render import RenderedLesion
from fire_mpo_core.data.synthlesion.text import QA, describe, in_quadrant_order

_REPORT_QUESTIONS = (
    "Describe the findings in this image.",
    "Write a short report for this scan.",
    "What are the findings in this scan?",
)
#: (model-style filler, reference-style paraphrase of the same non-clinical fact).
_FILLER: tuple[tuple[str, str], ...] = (
    ("The patient is positioned appropriately.", "Patient positioning is satisfactory."),
    ("No motion artifact is present.", "There is no evidence of motion artifact."),
    ("Bone structures are unremarkable.", "The osseous structures are intact."),
    ("Image quality is adequate.", "The study is of diagnostic quality."),
    ("The surrounding tissue appears normal.", "Adjacent soft tissues are within normal limits."),
    ("No foreign body is seen.", "No foreign body is identified."),
)


def make_report(rng: np.random.Generator, modality: str, lesions: Sequence[RenderedLesion]) -> QA:
    """An IU-Xray-style short report: 1-2 clinical sentences among filler, 2-4 sentences in all.

    Clinical sentences (the facts): ``"There is a small hyperdense round lesion in the upper left
    region."`` per lesion (quadrant order) or ``"No focal lesion is seen."``. The reference says
    the same facts and fillers, in the same order, in another wording ("A small hyperdense round
    lesion is noted in the left upper quadrant.").
    """
    if lesions:
        clinical = [
            (
                f"There is a {le.size} {describe(le)} in the {le.quadrant} region.",
                f"A {le.size} {describe(le)} is noted in the {location_words(le.quadrant)} "
                "quadrant.",
            )
            for le in in_quadrant_order(lesions)
        ]
    else:
        clinical = [("No focal lesion is seen.", "No focal lesion is identified.")]
    n_filler = int(rng.integers(1, 4 - len(clinical) + 1))
    picks = rng.choice(len(_FILLER), size=n_filler, replace=False)
    filler = [_FILLER[int(i)] for i in sorted(picks)]
    at = int(rng.integers(0, n_filler + 1))
    sentences = filler[:at] + clinical + filler[at:]
    question = _REPORT_QUESTIONS[int(rng.integers(len(_REPORT_QUESTIONS)))]
    return QA(
        question,
        " ".join(a for a, _ in sentences),
        " ".join(r for _, r in sentences),
        "report",
        "report",
        "report",
    )
