"""Grounding probes: questions whose right answer is known both on the image v and on v', the
same image with one or every lesion removed, so a model is scored on whether its answer follows
the image both ways.

Why: a rate measured on v' alone rewards a model that says "no" more often without looking (one
experiment: 0.64 "sensitivity" with a flip rate of 0.05), and a rate on v alone rewards "yes".
Requiring the right answer on v AND on v' cannot be gamed by answer bias: a constant answer
scores 0 on every remove probe. Probes are built per scan of the evaluated split from the
records' per-lesion metadata (SynthLesion: ``record.lesions`` with each lesion's own mask and
quadrant), with the dataset's own question phrasings:

==============  ==============================  ==========  ============================
kind            question                        truth on v  truth on v' (what is removed)
==============  ==============================  ==========  ============================
remove          presence                        yes         no (every lesion)
remove          quadrant of lesion j            yes         no (lesion j)
remove          count (open)                    one / two   none (every lesion)
keep            presence, 2-lesion scan         yes         yes (one lesion)
keep            quadrant of the other lesion    yes         yes (one lesion)
keep            count (open), 2-lesion scan     two         one (one lesion)
free            presence, lesion-free scan      no          (no v')
==============  ==============================  ==========  ============================

The keep probes catch a model that answers "no" to any corrupted image: removing one of two
lesions must not remove the finding. ``free`` probes give presence accuracy for truth "no".

Usage::

    from fire_mpo_core.evaluation.probes import build_probes
    probes = build_probes(records)      # list[Probe], deterministic order
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from fire_mpo_core.data.records import VQARecord

#: The phrasings SynthLesion asks (fire_mpo_core.data.synthlesion), so probes are in-distribution.
PRESENCE_Q = "Is there a lesion in this image?"
COUNT_Q = "How many lesions are there?"
_COUNT_WORDS = ("none", "one", "two")


def quadrant_question(quadrant: str) -> str:
    return f"Is there a lesion in the {quadrant}?"


@dataclass(frozen=True)
class Probe:
    """One grounding probe (module docstring): ask ``question`` on v and on v' (``image`` with
    the lesion masks ``remove`` inpainted away; no v' when ``remove`` is empty)."""

    id: str
    image: str
    question: str
    answer_type: str  # closed | open
    question_type: str  # presence | quadrant | count
    kind: str  # remove | keep | free
    truth: str
    truth_removed: str | None
    remove: tuple[str, ...] = field(default=())
    modality: str = ""


def build_probes(records: Sequence[VQARecord]) -> list[Probe]:
    """Probes for every distinct scan of ``records`` that carries lesion metadata (SynthLesion);
    an empty list for datasets without per-lesion masks."""
    scans: dict[str, VQARecord] = {}
    for r in records:
        if r.dataset == "synthlesion":
            scans.setdefault(r.image, r)
    out: list[Probe] = []
    for image, r in scans.items():
        stem = image.rsplit("/", 1)[-1].rsplit(".", 1)[0]
        lesions = list(r.lesions)
        every = tuple(le.mask for le in lesions)

        def add(name, q, atype, qtype, kind, truth, after, remove=(), r=r, stem=stem):
            out.append(
                Probe(f"{stem}-{name}", r.image, q, atype, qtype, kind, truth, after,
                      tuple(remove), r.modality or "")
            )  # fmt: skip

        if not lesions:
            add("free-presence", PRESENCE_Q, "closed", "presence", "free", "no", None)
            continue
        n = len(lesions)
        add("rm-presence", PRESENCE_Q, "closed", "presence", "remove", "yes", "no", every)
        add("rm-count", COUNT_Q, "open", "count", "remove", _COUNT_WORDS[n], "none", every)
        for j, le in enumerate(lesions):
            q = quadrant_question(le.quadrant)
            add(f"rm-quadrant{j}", q, "closed", "quadrant", "remove", "yes", "no", [le.mask])
        if n == 2:
            for j, le in enumerate(lesions):
                other = lesions[1 - j]
                rm = [le.mask]
                add(f"keep{j}-presence", PRESENCE_Q, "closed", "presence", "keep", "yes", "yes", rm)
                add(f"keep{j}-count", COUNT_Q, "open", "count", "keep", "two", "one", rm)
                q = quadrant_question(other.quadrant)
                add(f"keep{j}-quadrant", q, "closed", "quadrant", "keep", "yes", "yes", rm)
    return out
