"""SynthLesion: a generated, medical-like VQA and report benchmark with ground-truth lesion masks.

The embedded default dataset of the pipeline (docs/design.md section 4). Every scan is a grayscale
8-bit image in one of three styles -- ``ct`` (round abdomen outline, soft-tissue texture, bright
rib rim, spine), ``mri`` (smooth head outline, dark skull, gray/white matter, ventricles) or
``x-ray`` (chest PA: dark lungs either side, bright mediastinum and heart, rib and clavicle
hints) -- with 0-2 lesions of known mask, centre, radius, size class, intensity and shape.

Usage::

    from fire_mpo_core.data.config import DataConfig
    from fire_mpo_core.data.synthlesion import generate_synthlesion
    counts = generate_synthlesion(DataConfig(seed=0), Path("out"))
    # out/images/train-00000.png, out/masks/train-00000.png (union), out/masks/train-00000-l0.png,
    # out/data.jsonl: one VQARecord a line, paths relative to `out`.

Conventions:

* **Patient frame, radiological convention**: the image's right is the patient's LEFT. A lesion's
  ``side`` is ``"left"`` when its centroid column is right of the vertical midline
  ``x = (S - 1) / 2``; ``vertical`` is ``"upper"`` above the horizontal midline; ``quadrant`` is
  ``f"{vertical} {side}"``. Every lesion lies wholly inside one quadrant, at least
  ``max(1.5, 0.03 S)`` px from both midlines, and two lesions of a scan sit in different quadrants,
  so they never touch and every label is unambiguous. Lesions lie inside the body: within the
  rib cage off the spine (CT), in the brain off the ventricles (MRI), in the lung fields,
  the retrocardiac part included (X-ray). ``hyperdense``/``hypodense`` name brighter/darker
  lesions in every modality (one lexicon for the judge).
* **Size classes** from the equivalent radius ``r = sqrt(area / pi)`` of the rasterised mask:
  small ``r < 0.053 S``, medium ``0.053 S <= r < 0.075 S``, large ``r >= 0.075 S``. Radii are drawn
  from bands well inside each class (:data:`RADIUS_BANDS`), so classes are visually distinct.
* **Reproducible per image**: scan ``i`` of a split draws from
  ``np.random.default_rng(SeedSequence([seed, split_code, i]))``, so any image can be regenerated
  alone; PNGs are written by Pillow with a fixed compression level and no timestamps, so the same
  config gives byte-identical files.

Questions are SLAKE-style. Closed (yes/no): presence, side, quadrant, size, intensity, count,
modality. Open: location, side, size, shape, count (``none``/``one``/``two``), modality
(``ct``/``mri``/``x-ray``), abnormality (``"hyperdense round lesion"``). Lesion-attribute questions
about "the lesion" are only asked when there is exactly one; with two lesions only quadrant,
count, location ("Where are the lesions?" -> ``"upper left and lower right"``) and abnormality
questions are asked. About half the slots are closed, half open. ``answer`` is the canonical short
answer in the model's style (lowercase); ``reference`` is the same fact in a verbose clinical style
("Yes, a focal lesion is present.", "The lesion is located in the left upper quadrant."), the
paper's "reference texts in another style" failure mode. A ``sentence_fraction`` share of the
question phrasings (all splits alike, :func:`framed`) gets its answers as a model-style sentence
(:func:`sentence_answer`: "Upper left, based on the image."), so that most response tokens lie
outside the clinical spans, as in a real model's answers. For ``report_fraction`` of the scans an
IU-Xray-style report record is added: 2-4 sentences where 1-2 clinical sentences carry the facts
among filler sentences ("No motion artifact is present."); its reference is a differently worded
report of the same facts.

**Language prior (deliberate, train split only).** With strength ``p = language_prior`` (0.5 means
none): a train scan has a lesion with probability ``p``, so presence questions are answered
"yes" at rate ``p``; quadrant questions (:data:`PRIOR_CLOSED_TYPES`) are drawn to have the
answer "yes" with probability ``p`` (other closed types stay 50/50, so the prior is partial);
and the first lesion of a train scan is put in its modality's preferred quadrant
(:data:`PRIOR_QUADRANT`, e.g. upper left for CT) with probability ``(2p - 1) + (2 - 2p) / 4``
(0.7 for ``p = 0.8``), else uniformly; a second lesion goes to a uniform other quadrant. A blind
model therefore beats chance on train. Val and test
are balanced: half the scans have lesions, closed targets are yes/no 50/50 per question type and
lesion quadrants are uniform. Lesion presence uses a low-discrepancy (golden-ratio) sequence over
the scan index, so the presence rate of a split is close to its target even for small splits.

Package layout, one module per part of the above: :mod:`.labels` (vocabulary, patient-frame
labels, size classes), :mod:`.backgrounds` (the three modality backgrounds), :mod:`.render`
(lesion outlines, placement, :func:`render_scan`), :mod:`.text` (the question record, answer
wording, the model-style sentence frame), :mod:`.questions` (the SLAKE-style question draw),
:mod:`.reports` (the IU-Xray-style reports), :mod:`.plan` (per-scan seeds, modality and lesion
plan, the language prior) and :mod:`.generate` (the writer). Every public name is re-exported
here.
"""

from fire_mpo_core.data.synthlesion.generate import generate_synthlesion, load_records
from fire_mpo_core.data.synthlesion.labels import (
    COUNT_WORDS,
    INTENSITIES,
    LARGE_MIN_FRAC,
    MODALITIES,
    QUADRANTS,
    RADIUS_BANDS,
    SHAPES,
    SIZES,
    SMALL_MAX_FRAC,
    midline,
    quadrant_of,
    side_of,
    size_class,
    vertical_of,
)
from fire_mpo_core.data.synthlesion.plan import (
    PRIOR_QUADRANT,
    SPLITS,
    TWO_LESION_RATE,
    image_rng,
    pretrain_scan,
    scan_plan,
)
from fire_mpo_core.data.synthlesion.questions import (
    COUNT_QUESTION_RATE,
    PRESENCE_QUESTION_RATE,
    PRIOR_CLOSED_TYPES,
    make_questions,
)
from fire_mpo_core.data.synthlesion.render import LesionSpec, RenderedLesion, render_scan
from fire_mpo_core.data.synthlesion.reports import make_report
from fire_mpo_core.data.synthlesion.text import QA, SENTENCE_FRAME, framed, sentence_answer

__all__ = [
    "COUNT_QUESTION_RATE",
    "COUNT_WORDS",
    "INTENSITIES",
    "LARGE_MIN_FRAC",
    "MODALITIES",
    "PRESENCE_QUESTION_RATE",
    "PRIOR_CLOSED_TYPES",
    "PRIOR_QUADRANT",
    "QA",
    "QUADRANTS",
    "RADIUS_BANDS",
    "SENTENCE_FRAME",
    "SHAPES",
    "SIZES",
    "SMALL_MAX_FRAC",
    "SPLITS",
    "TWO_LESION_RATE",
    "LesionSpec",
    "RenderedLesion",
    "framed",
    "generate_synthlesion",
    "image_rng",
    "load_records",
    "make_questions",
    "make_report",
    "midline",
    "pretrain_scan",
    "quadrant_of",
    "render_scan",
    "scan_plan",
    "sentence_answer",
    "side_of",
    "size_class",
    "vertical_of",
]
