"""SynthLesion's SLAKE-style questions: the candidates a scan supports and the per-scan draw.

Closed (yes/no): presence, side, quadrant, size, intensity, count, modality. Open: location, side,
size, shape, count, modality, abnormality. Attribute questions about "the lesion" only when there
is exactly one. Each closed slot draws its answer first, so every closed type's yes-rate is the
split's (:func:`make_questions`)::

    qas = make_questions(rng, "ct", lesions, n_questions=4, p_yes=0.5)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from fire_mpo_core.data.synthlesion.labels import (
    COUNT_WORDS,
    MODALITIES,
    QUADRANTS,
    SIZES,
    location_words,
)
from fire_mpo_core.data.synthlesion.render import RenderedLesion
from fire_mpo_core.data.synthlesion.text import (
    MODALITY_LONG,
    MODALITY_NAME,
    QA,
    describe,
    in_quadrant_order,
    yn,
)

#: Probability that a scan with at least one closed slot gets a presence question; independent of
#: the scan's content so that the presence yes-rate equals the split's lesion rate.
PRESENCE_QUESTION_RATE = 0.5
#: Closed types whose train yes-rate follows the language prior (presence follows the lesion
#: rate). The others stay 50/50 even in train, so SFT must learn to look at the image.
PRIOR_CLOSED_TYPES = frozenset({"quadrant"})
#: Probability that the first open slot is the count question (content-independent, as above).
COUNT_QUESTION_RATE = 0.35


#: ``add(qtype, param, phrasings, yes, reference)`` of :func:`_closed_candidates`.
_AddClosed = Callable[[str, str, Sequence[str], bool, str], None]
#: ``add(qtype, phrasings, answer, reference, key)`` of :func:`_open_candidates`.
_AddOpen = Callable[..., None]


def _closed_candidates(modality: str, lesions: Sequence[RenderedLesion]) -> dict[str, list[QA]]:
    """Every closed question this scan supports, by type (presence is handled apart)."""
    n = len(lesions)
    c: dict[str, list[QA]] = {"modality": []}

    def add(qtype: str, param: str, phrasings: Sequence[str], yes: bool, ref: str) -> None:
        # One modality fact per scan (whichever modality is named); other facts per parameter.
        key = "modality" if qtype == "modality" else f"{qtype}:{param}"
        for q in phrasings:
            c.setdefault(qtype, []).append(QA(q, yn(yes), ref, "closed", qtype, key))

    _closed_modality(add, modality)
    if n >= 1:
        _closed_quadrant_and_count(add, lesions)
    if n == 1:
        _closed_attributes(add, lesions[0])
    return c


def _closed_modality(add: _AddClosed, modality: str) -> None:
    """Closed modality questions ("Is this a CT scan?"), each modality named; one fact."""
    for m in MODALITIES:
        name = MODALITY_NAME[m]
        art = "an" if m in ("mri", "x-ray") else "a"
        yes = m == modality
        ref = (
            f"Yes, this is {MODALITY_LONG[modality]}."
            if yes
            else f"No, this is {MODALITY_LONG[modality]}, not {art} {name}."
        )
        add(
            "modality",
            m,
            (f"Is this {art} {name} scan?", f"Was this image acquired with {name}?"),
            yes,
            ref,
        )


def _closed_quadrant_and_count(add: _AddClosed, lesions: Sequence[RenderedLesion]) -> None:
    """Quadrant questions (each quadrant) and count questions (one, two) of a lesion scan."""
    n = len(lesions)
    occupied = {le.quadrant for le in lesions}
    for q in QUADRANTS:
        yes = q in occupied
        loc = location_words(q)
        ref = (
            f"Yes, a lesion is present in the {loc} quadrant."
            if yes
            else f"No, there is no lesion in the {loc} quadrant."
        )
        add(
            "quadrant",
            q,
            (f"Is there a lesion in the {q}?", f"Is a lesion present in the {q} region?"),
            yes,
            ref,
        )
    for k in (1, 2):
        yes = k == n
        ref = {
            (1, True): "Yes, there is a single lesion.",
            (1, False): "No, there are two lesions.",
            (2, True): "Yes, there are two lesions.",
            (2, False): "No, there is only a single lesion.",
        }[(k, yes)]
        phr = (
            ("Is there exactly one lesion?", "Is there only one lesion in this image?")
            if k == 1
            else ("Are there two lesions?", "Are there two lesions in this image?")
        )
        add("count", str(k), phr, yes, ref)


def _closed_attributes(add: _AddClosed, le: RenderedLesion) -> None:
    """Side, size and intensity questions about the scan's only lesion."""
    for sd in ("left", "right"):
        yes = sd == le.side
        ref = (
            f"Yes, the lesion is on the patient's {le.side} side."
            if yes
            else f"No, the lesion is on the patient's {le.side} side."
        )
        add(
            "side",
            sd,
            (
                f"Is the lesion on the {sd} side?",
                f"Is the lesion located on the patient's {sd} side?",
            ),
            yes,
            ref,
        )
    for sz in SIZES:
        yes = sz == le.size
        ref = f"Yes, the lesion is {le.size}." if yes else f"No, the lesion is {le.size}."
        add("size", sz, (f"Is the lesion {sz}?", f"Is this a {sz} lesion?"), yes, ref)
    for it, word in (("hyperdense", "brighter"), ("hypodense", "darker")):
        yes = it == le.intensity
        ref = (
            f"Yes, the lesion is {le.intensity} relative to the surrounding tissue."
            if yes
            else f"No, the lesion is {le.intensity} relative to the surrounding tissue."
        )
        add(
            "intensity",
            it,
            (f"Is the lesion {it}?", f"Is the lesion {word} than the surrounding tissue?"),
            yes,
            ref,
        )


def _presence_candidates(lesions: Sequence[RenderedLesion]) -> list[QA]:
    yes = bool(lesions)
    ref = "Yes, a focal lesion is present." if yes else "No, no focal lesion is identified."
    return [
        QA(q, yn(yes), ref, "closed", "presence", "presence")
        for q in (
            "Is there a lesion in this image?",
            "Is there any abnormality in this image?",
            "Does this scan show a focal lesion?",
        )
    ]


def _open_candidates(modality: str, lesions: Sequence[RenderedLesion]) -> dict[str, list[QA]]:
    """Every open question this scan supports, by type."""
    n = len(lesions)
    c: dict[str, list[QA]] = {}

    def add(qtype: str, phrasings: Sequence[str], answer: str, ref: str, key: str = "") -> None:
        # Keys name the fact: an open question shares its key with the closed question whose
        # "yes" states the same fact, so a scan is not asked the same fact twice.
        c[qtype] = [QA(q, answer, ref, "open", qtype, key or qtype) for q in phrasings]

    add(
        "modality",
        ("What imaging modality is this?", "What modality was used to take this image?"),
        modality,
        f"This is {MODALITY_LONG[modality]}.",
        "modality",
    )
    count_ref = ("No lesion is seen.", "There is a single lesion.", "There are two lesions.")[n]
    add(
        "count",
        ("How many lesions are there?", "How many lesions are in this image?"),
        COUNT_WORDS[n],
        count_ref,
        f"count:{n}",
    )
    if n == 0:
        add(
            "abnormality",
            ("What abnormality is seen?", "What is the main finding in this image?"),
            "none",
            "No abnormality is seen.",
        )
    elif n == 1:
        _open_one_lesion(add, lesions[0])
    else:
        _open_two_lesions(add, lesions)
    return c


def _open_one_lesion(add: _AddOpen, le: RenderedLesion) -> None:
    """Abnormality, location, side, size and shape questions about the scan's only lesion."""
    add(
        "abnormality",
        ("What abnormality is seen?", "What is the main finding in this image?"),
        describe(le),
        f"A {describe(le)} is seen.",
    )
    add(
        "location",
        (
            "Where is the lesion?",
            "Where is the lesion located?",
            "In which part of the image is the lesion?",
        ),
        le.quadrant,
        f"The lesion is located in the {location_words(le.quadrant)} quadrant.",
        f"quadrant:{le.quadrant}",
    )
    add(
        "side",
        ("Which side is the lesion on?", "On which side of the patient is the lesion?"),
        le.side,
        f"The lesion is on the patient's {le.side} side.",
        f"side:{le.side}",
    )
    add(
        "size",
        ("How large is the lesion?", "What is the size of the lesion?"),
        le.size,
        f"The lesion is {le.size} in size.",
        f"size:{le.size}",
    )
    add(
        "shape",
        ("What is the shape of the lesion?", "What shape does the lesion have?"),
        le.shape,
        f"The lesion has a {le.shape} shape.",
    )


def _open_two_lesions(add: _AddOpen, lesions: Sequence[RenderedLesion]) -> None:
    """Location and abnormality questions about both lesions, in quadrant order."""
    a, b = in_quadrant_order(lesions)
    add(
        "location",
        ("Where are the lesions?", "Where are the lesions located?"),
        f"{a.quadrant} and {b.quadrant}",
        f"The lesions are located in the {location_words(a.quadrant)} and "
        f"{location_words(b.quadrant)} quadrants.",
    )
    add(
        "abnormality",
        ("What abnormalities are seen?", "What are the findings in this image?"),
        f"{describe(a)} and {describe(b)}",
        f"Two lesions are seen: a {describe(a)} and a {describe(b)}.",
    )


def make_questions(
    rng: np.random.Generator,
    modality: str,
    lesions: Sequence[RenderedLesion],
    n_questions: int,
    p_yes: float,
) -> list[QA]:
    """Draw ``n_questions`` distinct questions for one scan.

    Each slot is closed or open with probability 1/2. A closed slot picks a question type among
    those that can still be asked with either answer, THEN draws its answer (yes with probability
    ``p_yes``) and a parameter giving that answer ("Is the lesion on the left side?" for a
    left-sided lesion when the draw is yes), so the yes-rate of every closed type is exactly
    ``p_yes`` in expectation. The presence question and the open count question, whose answers
    the scan fixes, are asked with content-independent probabilities
    (:data:`PRESENCE_QUESTION_RATE`, :data:`COUNT_QUESTION_RATE`), so their answer rates follow
    the split's lesion rate. A new fact is preferred over a rephrasing of an asked one; the order
    of the returned questions is shuffled. With the default 4 questions every scan gets all 4;
    a scan without lesions supports about 6-12 distinct questions, so a larger
    ``n_questions`` gives it fewer rather than skewing the answer rates.
    """
    draw = _QuestionDraw(
        rng, _closed_candidates(modality, lesions), _open_candidates(modality, lesions)
    )
    slots = ["closed" if rng.random() < 0.5 else "open" for _ in range(n_questions)]
    ask_presence = "closed" in slots and rng.random() < PRESENCE_QUESTION_RATE
    ask_count = "open" in slots and rng.random() < COUNT_QUESTION_RATE
    targets = [yn(rng.random() < p_yes) for _ in slots]
    # The fixed-answer questions first, while every fact is still new.
    if ask_presence:
        presence = _presence_candidates(lesions)
        draw.ask([presence[int(rng.integers(len(presence)))]])
        slots.remove("closed")
    draw.count_asked = ask_count and draw.ask(draw.avail(draw.opened["count"], True)[:1])
    if draw.count_asked:
        slots.remove("open")
    for slot, target in zip(slots, targets):
        # Own kind first, then the other kind, first new facts only, then rephrasings.
        order = (draw.closed, draw.open) if slot == "closed" else (draw.open, draw.closed)
        any(f(fresh, target) for fresh in (True, False) for f in order)
    return [draw.out[int(i)] for i in rng.permutation(len(draw.out))]


class _QuestionDraw:
    """The state of one scan's question draw: the candidates, what was asked, the facts used."""

    def __init__(
        self, rng: np.random.Generator, closed: dict[str, list[QA]], opened: dict[str, list[QA]]
    ) -> None:
        self.rng = rng
        self.closed_qas = closed
        self.opened = opened
        self.out: list[QA] = []
        self.used_q: set[str] = set()
        self.used_k: set[str] = set()
        self.count_asked = False

    def avail(self, qas: list[QA], fresh: bool, want: str | None = None) -> list[QA]:
        """Candidates not asked yet (with answer ``want``; of a new fact when ``fresh``)."""
        return [
            qa
            for qa in qas
            if qa.question not in self.used_q
            and (want is None or qa.answer == want)
            and (not fresh or qa.key not in self.used_k)
        ]

    def ask(self, cands: list[QA]) -> bool:
        """Ask one of ``cands``, drawn uniformly; False when there is none."""
        if not cands:
            return False
        qa = cands[int(self.rng.integers(len(cands)))]
        self.out.append(qa)
        self.used_q.add(qa.question)
        self.used_k.add(qa.key)
        return True

    def closed(self, fresh: bool, target: str) -> bool:
        """A closed question: a type that can still be asked with either answer, then the answer
        (``target`` for the prior types, a fair coin for the others)."""
        closed = self.closed_qas
        types = [
            t for t in sorted(closed) if all(self.avail(closed[t], fresh, a) for a in ("yes", "no"))
        ]
        if not types:
            return False
        qtype = types[int(self.rng.integers(len(types)))]
        if qtype not in PRIOR_CLOSED_TYPES:
            target = yn(self.rng.random() < 0.5)
        return self.ask(self.avail(closed[qtype], fresh, target))

    def open(self, fresh: bool, target: str) -> bool:  # open answers are not drawn: target unused
        """An open question of a uniformly drawn type that still has one."""
        # Count only through its content-independent draw (or as a rephrasing once asked).
        pool = {k: v for k, v in self.opened.items() if k != "count" or self.count_asked}
        types = [t for t in sorted(pool) if self.avail(pool[t], fresh)]
        if not types:
            return False
        return self.ask(self.avail(pool[types[int(self.rng.integers(len(types)))]], fresh))
