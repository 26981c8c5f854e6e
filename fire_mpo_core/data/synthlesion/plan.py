"""SynthLesion's per-scan plan: each scan's own generator, its modality and its lesion specs.

Scan ``i`` of a split draws from ``np.random.default_rng(SeedSequence([seed, split_code, i]))``
(:func:`image_rng`), so any scan can be regenerated alone. The train split carries the language
prior (lesion rate, the preferred quadrant per modality); val and test are balanced::

    rng = image_rng(0, "train", 5)
    modality, specs = scan_plan(rng, 0, "train", 5, prior=0.8)
"""

from __future__ import annotations

import math

import numpy as np

from fire_mpo_core.data.synthlesion.labels import INTENSITIES, MODALITIES, QUADRANTS, SHAPES, SIZES
from fire_mpo_core.data.synthlesion.render import LesionSpec, render_scan

#: Train-only location prior: the quadrant each modality's first lesion is skewed towards.
PRIOR_QUADRANT: dict[str, str] = {"ct": "upper left", "mri": "lower right", "x-ray": "upper right"}
#: Share of lesion scans with two lesions (all splits).
TWO_LESION_RATE = 0.4

SPLITS: tuple[str, ...] = ("train", "val", "test")
#: "pretrain" is no dataset split: it seeds the unlabeled scans of the vision warm start.
_SPLIT_CODE = {"train": 1, "val": 2, "test": 3, "pretrain": 4}
_INV_PHI = (math.sqrt(5.0) - 1.0) / 2.0  # golden-ratio step of the low-discrepancy sequence


def _seed64(seed: int) -> int:
    return seed % (1 << 64)  # SeedSequence wants a non-negative entropy


def image_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of scan ``index`` of ``split``: each scan is reproducible on its own."""
    return np.random.default_rng(np.random.SeedSequence([_seed64(seed), _SPLIT_CODE[split], index]))


def _split_offsets(seed: int, split: str) -> tuple[float, int]:
    """(phase of the split's presence sequence, modality rotation)."""
    rng = np.random.default_rng(
        np.random.SeedSequence([_seed64(seed), _SPLIT_CODE[split], 1 << 40])
    )
    return float(rng.random()), int(rng.integers(len(MODALITIES)))


def scan_plan(
    rng: np.random.Generator, seed: int, split: str, index: int, prior: float
) -> tuple[str, list[LesionSpec]]:
    """Modality and lesion specs of a scan (before rendering).

    Presence: ``frac(phase + (index + 1) / phi) < p`` with p = ``prior`` in train, 0.5 elsewhere
    (a golden-ratio sequence: any run of scans has a lesion rate close to p). Modalities rotate
    with the index. The first lesion of a train scan goes to the modality's preferred quadrant
    with probability ``2 p - 1``, else to a uniform quadrant; a second lesion (40% of lesion scans)
    to a uniform other quadrant.
    """
    phase, rot = _split_offsets(seed, split)
    p = prior if split == "train" else 0.5
    modality = MODALITIES[(index + rot) % len(MODALITIES)]
    has_lesion = (phase + (index + 1) * _INV_PHI) % 1.0 < p
    n = (2 if rng.random() < TWO_LESION_RATE else 1) if has_lesion else 0
    skew_draw = rng.random()
    quads: list[str] = []
    for j in range(n):
        if j == 0 and skew_draw < 2 * p - 1:
            quads.append(PRIOR_QUADRANT[modality])
        else:
            free = [q for q in QUADRANTS if q not in quads]
            quads.append(free[int(rng.integers(len(free)))])
    specs = [
        LesionSpec(
            quadrant=q,
            size=SIZES[int(rng.integers(3))],
            intensity=INTENSITIES[int(rng.integers(2))],
            shape=SHAPES[int(rng.integers(3))],
        )
        for q in quads
    ]
    return modality, specs


def pretrain_scan(seed: int, index: int, image_size: int) -> tuple[str, np.ndarray, list]:
    """Scan ``index`` of the vision warm start's image pool: (modality, uint8 image, lesions).

    Drawn like a val/test scan (balanced presence, uniform quadrants) from its own seed stream,
    so it is none of the dataset's images; it stands in for the images a real vision encoder
    was pretrained on. No questions are drawn for it."""
    rng = image_rng(seed, "pretrain", index)
    modality, specs = scan_plan(rng, seed, "pretrain", index, 0.5)
    image, lesions = render_scan(rng, modality, image_size, specs)
    return modality, image, lesions
