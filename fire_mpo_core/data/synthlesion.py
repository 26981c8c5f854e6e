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
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image
from skimage.draw import polygon as draw_polygon

from fire_mpo_core.data.config import DataConfig
from fire_mpo_core.data.records import Lesion, VQARecord

MODALITIES: tuple[str, ...] = ("ct", "mri", "x-ray")
QUADRANTS: tuple[str, ...] = ("upper left", "upper right", "lower left", "lower right")
SIZES: tuple[str, ...] = ("small", "medium", "large")
INTENSITIES: tuple[str, ...] = ("hyperdense", "hypodense")
SHAPES: tuple[str, ...] = ("round", "oval", "irregular")
COUNT_WORDS: tuple[str, ...] = ("none", "one", "two")

#: Size-class thresholds on the equivalent radius, as fractions of the image side.
SMALL_MAX_FRAC = 0.053
LARGE_MIN_FRAC = 0.075
#: Radius bands (fractions of the image side) the generator draws from, inside each class.
RADIUS_BANDS: dict[str, tuple[float, float]] = {
    "small": (0.038, 0.046),
    "medium": (0.060, 0.068),
    "large": (0.082, 0.090),
}
#: Train-only location prior: the quadrant each modality's first lesion is skewed towards.
PRIOR_QUADRANT: dict[str, str] = {"ct": "upper left", "mri": "lower right", "x-ray": "upper right"}
#: Share of lesion scans with two lesions (all splits).
TWO_LESION_RATE = 0.4
#: Probability that a scan with at least one closed slot gets a presence question; independent of
#: the scan's content so that the presence yes-rate equals the split's lesion rate.
PRESENCE_QUESTION_RATE = 0.5
#: Closed types whose train yes-rate follows the language prior (presence follows the lesion
#: rate). The others stay 50/50 even in train, so SFT must learn to look at the image.
PRIOR_CLOSED_TYPES = frozenset({"quadrant"})
#: Probability that the first open slot is the count question (content-independent, as above).
COUNT_QUESTION_RATE = 0.35

SPLITS: tuple[str, ...] = ("train", "val", "test")
#: "pretrain" is no dataset split: it seeds the unlabeled scans of the vision warm start.
_SPLIT_CODE = {"train": 1, "val": 2, "test": 3, "pretrain": 4}
_INV_PHI = (math.sqrt(5.0) - 1.0) / 2.0  # golden-ratio step of the low-discrepancy sequence
_PNG_COMPRESS_LEVEL = 6

_MODALITY_NAME = {"ct": "CT", "mri": "MRI", "x-ray": "X-ray"}
_MODALITY_LONG = {
    "ct": "a computed tomography (CT) image",
    "mri": "a magnetic resonance imaging (MRI) image",
    "x-ray": "a plain radiograph (X-ray)",
}


# ----------------------------------------------------------------------------------------------
# Labels in the patient frame
# ----------------------------------------------------------------------------------------------


def midline(image_size: int) -> float:
    """Pixel coordinate of both midlines: pixel centres are at integers, so ``(S - 1) / 2``."""
    return (image_size - 1) / 2.0


def side_of(x: float, image_size: int) -> str:
    """Patient side of image column ``x``: image right (``x`` > midline) is the patient's left."""
    return "left" if x > midline(image_size) else "right"


def vertical_of(y: float, image_size: int) -> str:
    """``"upper"`` for rows above the horizontal midline, else ``"lower"``."""
    return "upper" if y < midline(image_size) else "lower"


def quadrant_of(x: float, y: float, image_size: int) -> str:
    """``f"{vertical} {side}"`` of pixel ``(x, y)`` in the patient frame."""
    return f"{vertical_of(y, image_size)} {side_of(x, image_size)}"


def size_class(radius_px: float, image_size: int) -> str:
    """Size class of an equivalent radius: small < 0.053 S <= medium < 0.075 S <= large."""
    if radius_px < SMALL_MAX_FRAC * image_size:
        return "small"
    if radius_px < LARGE_MIN_FRAC * image_size:
        return "medium"
    return "large"


def _quadrant_signs(quadrant: str) -> tuple[int, int]:
    """(sx, sy): sign of (x - mid) and (y - mid) for a patient-frame quadrant."""
    vertical, side = quadrant.split()
    return (1 if side == "left" else -1), (-1 if vertical == "upper" else 1)


def _location_words(quadrant: str) -> str:
    """Clinical word order of a quadrant: 'upper left' -> 'left upper'."""
    vertical, side = quadrant.split()
    return f"{side} {vertical}"


# ----------------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LesionSpec:
    """What to draw: the generator's choice before placement."""

    quadrant: str
    size: str
    intensity: str
    shape: str


@dataclass(frozen=True, eq=False)
class RenderedLesion:
    """A drawn lesion; ``mask`` is bool HxW, labels are derived from the rasterised mask."""

    mask: np.ndarray
    center_xy: tuple[int, int]
    radius_px: float
    size: str
    intensity: str
    shape: str
    side: str
    vertical: str
    quadrant: str


def _value_noise(rng: np.random.Generator, size: int, cell: float) -> np.ndarray:
    """Smooth zero-mean, unit-std noise (S x S float32) with features about ``cell`` px wide:
    a bicubic upsampling of a coarse Gaussian grid (cheap for any feature size)."""
    k = max(2, math.ceil(size / max(cell, 1.0))) + 1
    grid = rng.standard_normal((k, k), dtype=np.float32)
    out = cv2.resize(grid, (size, size), interpolation=cv2.INTER_CUBIC)
    out -= out.mean()
    return out / (out.std() + 1e-6)


def _fine_noise(rng: np.random.Generator, size: int, sigma: float) -> np.ndarray:
    """Gaussian-blurred white noise (S x S float32), renormalised to unit std."""
    out = cv2.GaussianBlur(rng.standard_normal((size, size), dtype=np.float32), (0, 0), sigma)
    return out / (out.std() + 1e-6)


def _ell(
    xx: np.ndarray, yy: np.ndarray, cx: float, cy: float, ax: float, ay: float, angle: float = 0.0
) -> np.ndarray:
    """Normalised elliptic radius: < 1 inside the ellipse of semi-axes (ax, ay) rotated by angle."""
    c, s = math.cos(angle), math.sin(angle)
    dx, dy = xx - cx, yy - cy
    u, v = c * dx + s * dy, -s * dx + c * dy
    return np.sqrt((u / ax) ** 2 + (v / ay) ** 2)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    """Logistic function, clipped so that large images cannot overflow the exponential."""
    return 1.0 / (1.0 + np.exp(-np.clip(z, -60.0, 60.0)))


def _soft(inside: np.ndarray, width: float = 0.03) -> np.ndarray:
    """Soft 0..1 indicator of ``e < 1`` for a normalised radius array (anti-aliased edges)."""
    return _sigmoid((1.0 - inside) / width)


def _ct_background(rng: np.random.Generator, s: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Axial abdominal CT: air, skin, fat ring, ribs (bright rim), liver, kidneys, spine, aorta.

    Returns (image float32 S x S, allowed bool S x S where lesions may go, noise sigma)."""
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    mid = midline(s)
    cx, cy = mid + rng.uniform(-0.02, 0.02) * s, mid + rng.uniform(-0.02, 0.02) * s
    ax, ay = s * rng.uniform(0.45, 0.48), s * rng.uniform(0.41, 0.44)
    e = _ell(xx, yy, cx, cy, ax, ay)
    tissue = 112 + 8 * _value_noise(rng, s, s / 5) + 4 * _fine_noise(rng, s, 0.9)
    # Liver on the patient's right (image left), kidneys either side of the spine.
    liver = _soft(_ell(xx, yy, cx - 0.3 * ax, cy - 0.15 * ay, 0.5 * ax, 0.6 * ay, 0.4), 0.04)
    tissue += 20 * liver
    for sx in (-1, 1):
        kid = _ell(xx, yy, cx + sx * 0.4 * ax, cy + 0.45 * ay, 0.12 * ax, 0.24 * ay, sx * 0.45)
        tissue += 14 * _soft(kid, 0.15)
    img = np.full((s, s), 6.0, np.float32)
    body = _soft(e, 0.01)
    fat = 68 + 5 * _fine_noise(rng, s, 1.2)
    interior = _soft(e / 0.965, 0.012)
    img = img * (1 - body) + body * (106 * (1 - interior) + interior * fat)
    inner = _soft(e / 0.91, 0.012)
    img = img * (1 - inner) + inner * tissue
    # Ribs: a dashed bright rim inside the fat ring, absent at the front of the abdomen.
    theta = np.arctan2(yy - cy, xx - cx)
    n_ribs, phase = int(rng.integers(9, 13)), rng.uniform(0, 2 * np.pi)
    ring = (e > 0.855) & (e < 0.91) & (np.cos(n_ribs * theta + phase) > -0.1)
    ring &= ~((theta > -2.3) & (theta < -0.85))  # theta = -pi/2 is anterior (image top)
    img[ring] = 228
    # Vertebral body (bright cortex, softer centre) and aorta in front of it, on the midline.
    vx, vy, vr = cx, cy + 0.66 * ay, 0.075 * s
    spine = _ell(xx, yy, vx, vy, vr * 1.1, vr)
    img = np.where(spine < 1, np.where(spine > 0.65, 225.0, 175.0), img)
    img = np.where(_ell(xx, yy, vx + 0.02 * s, vy - 1.9 * vr, 0.04 * s, 0.04 * s) < 1, 150.0, img)
    allowed = (e < 0.84) & (_ell(xx, yy, vx, vy, vr * 1.35, vr * 1.35) > 1)
    return img, allowed, 4.0


def _mri_background(rng: np.random.Generator, s: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Axial T1-like brain MRI: scalp, dark skull, gray/white matter, ventricles, bias field."""
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    mid = midline(s)
    cx, cy = mid + rng.uniform(-0.015, 0.015) * s, mid + rng.uniform(-0.015, 0.015) * s
    ax, ay = s * rng.uniform(0.39, 0.41), s * rng.uniform(0.45, 0.47)
    e = _ell(xx, yy, cx, cy, ax, ay)
    img = np.full((s, s), 3.0, np.float32)
    img += (150 + 10 * _value_noise(rng, s, s / 6)) * _soft(e, 0.01)  # scalp fat (bright in T1)
    skull = _soft(e / 0.92, 0.01)
    img = img * (1 - skull) + 22 * skull
    csf = _soft(e / 0.86, 0.01)
    img = img * (1 - csf) + 48 * csf
    brain = _soft(e / 0.83, 0.012)
    # Gray/white matter: white towards the centre, a wiggly (gyral) boundary from smooth noise.
    wiggle = 0.07 * _value_noise(rng, s, s / 8) + 0.07 * _value_noise(rng, s, s / 16)
    wm = _sigmoid((0.66 - e / 0.83 + wiggle) / 0.04)
    tissue = 92 + 42 * wm + 3 * _value_noise(rng, s, s / 12)
    # Sulci: thin dark CSF lines in the cortical ribbon, along zero crossings of smooth noise.
    sulci = np.exp(-((_value_noise(rng, s, s / 7) / 0.12) ** 2)) * (1 - wm) * (e > 0.45)
    tissue -= 18 * sulci
    img = img * (1 - brain) + brain * tissue
    # Lateral ventricles (dark CSF) and the falx on the midline.
    vent = np.ones((s, s), bool)
    for sx in (-1, 1):
        ve = _ell(xx, yy, cx + sx * 0.045 * s, cy - 0.03 * s, 0.03 * s, 0.1 * s, -sx * 0.3)
        img = img * (1 - _soft(ve, 0.08)) + 45 * _soft(ve, 0.08)
        vent &= ve > 1.2
    falx = (np.abs(xx - cx) < 0.5) & (e < 0.8) & (np.abs(yy - cy) > 0.16 * s)
    img[falx] = 0.7 * img[falx] + 0.3 * 45
    img *= 1 + 0.08 * _value_noise(rng, s, s / 1.5)  # coil bias field
    allowed = (e < 0.825) & vent
    return img, allowed, 2.5


def _xray_background(rng: np.random.Generator, s: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Chest PA radiograph: soft-tissue torso, dark lungs either side, bright mediastinum and heart
    (on the image right = patient left), diaphragm domes, posterior ribs and clavicles."""
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    mid = midline(s)
    cx = mid + rng.uniform(-0.015, 0.015) * s
    # Torso: bright soft tissue, tapering to the shoulders at the top, air at the far sides.
    half_w = s * (0.47 - 0.12 * np.clip(0.18 - yy / s, 0, None) / 0.18)
    torso = _sigmoid((half_w - np.abs(xx - cx)) / 0.8)
    img = 30 + (142 + 22 * yy / s + 5 * _value_noise(rng, s, s / 4) - 30) * torso
    lungs = np.zeros((s, s), np.float32)
    lw, lh, ly = s * rng.uniform(0.17, 0.18), s * rng.uniform(0.39, 0.41), s * 0.5
    for sx in (-1, 1):
        lx = cx + sx * 0.215 * s
        le = _ell(xx, yy, lx, ly, lw, lh, sx * 0.06)
        dome = ly + 0.86 * lh - 0.08 * s * (1 - ((xx - lx) / lw) ** 2)  # diaphragm dome
        lungs = np.maximum(lungs, _soft(le, 0.03) * _sigmoid((dome - yy) / 0.7))
    heart = _ell(xx, yy, cx + 0.06 * s, 0.66 * s, 0.16 * s, 0.13 * s, -0.25)
    # Lesions may lie anywhere in the lung fields, including behind the heart shadow.
    allowed = lungs > 0.5
    lungs *= 1 - _soft(heart, 0.04)
    # Lung parenchyma: dark, with vascular markings brightest at the hila.
    hilum = np.exp(-np.minimum(np.abs(xx - cx - 0.12 * s), np.abs(xx - cx + 0.12 * s)) / (0.1 * s))
    hilum *= np.exp(-(((yy - 0.45 * s) / (0.2 * s)) ** 2))
    vessels = 5 * _value_noise(rng, s, s / 10) + 5 * np.abs(_fine_noise(rng, s, 1.2))
    lung_val = 62 + 14 * yy / s + 40 * hilum + vessels * (0.5 + hilum)
    img = img * (1 - lungs) + lungs * lung_val
    # Mediastinum and heart: bright, the heart bulging to the image right (patient left).
    med = _sigmoid((0.07 * s - np.abs(xx - cx)) / 0.8) * (yy > 0.12 * s)
    img = np.maximum(img, (178 + 8 * yy / s) * med)
    img = np.maximum(img, 172 * _soft(heart, 0.04))
    # Posterior ribs (faint bright arcs descending laterally) and clavicles.
    dx = np.abs(xx - cx)
    n_ribs, spacing = 7, 0.085 * s
    first = 0.1 * s + rng.uniform(-0.01, 0.01) * s
    ribs = np.zeros((s, s), np.float32)
    for k in range(n_ribs):
        # A posterior rib leaves the spine rising slightly, then arcs down towards the side.
        rib_y = first + k * spacing - 0.3 * dx + 1.6 * dx**2 / s
        ribs = np.maximum(ribs, np.exp(-(((yy - rib_y) / (0.013 * s)) ** 2)))
    img += 14 * ribs * (dx > 0.06 * s)
    clav_y = 0.13 * s - 0.12 * (dx - 0.06 * s)
    img += 30 * np.exp(-(((yy - clav_y) / (0.018 * s)) ** 2)) * (dx > 0.05 * s) * (dx < 0.4 * s)
    return img, allowed, 3.0


_BACKGROUNDS: dict[
    str, Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray, float]]
] = {"ct": _ct_background, "mri": _mri_background, "x-ray": _xray_background}
#: Blur (px) of the rendered image: CT crisp, MRI smooth, radiographs soft.
_FINAL_BLUR = {"ct": 0.55, "mri": 0.8, "x-ray": 0.9}


def _lesion_outline(rng: np.random.Generator, shape: str, r: float) -> tuple[np.ndarray, float]:
    """Polygon (N x 2 float, offsets from the centre) of area ~pi r^2 and its max extent (px)."""
    phi = np.linspace(0.0, 2 * np.pi, 72, endpoint=False)
    if shape == "round":
        rad = np.full_like(phi, r)
        angle = 0.0
    elif shape == "oval":
        k = rng.uniform(1.4, 1.6)  # axis ratio; semi-axes r*sqrt(k), r/sqrt(k) keep the area
        a, b = r * math.sqrt(k), r / math.sqrt(k)
        rad = a * b / np.sqrt((b * np.cos(phi)) ** 2 + (a * np.sin(phi)) ** 2)
        angle = rng.uniform(0, np.pi)
    else:
        rad = np.ones_like(phi)
        for k in range(2, 6):
            rad += rng.uniform(0.05, 0.1) / math.sqrt(k - 1) * np.cos(k * phi + rng.uniform(0, 7))
        rad = np.clip(rad, 0.45, None)
        rad *= r / math.sqrt(np.mean(rad**2))  # polygon area 0.5 * mean(rad^2) * 2 pi = pi r^2
        angle = 0.0
    pts = np.stack([rad * np.cos(phi + angle), rad * np.sin(phi + angle)], axis=1)
    return pts, float(rad.max())


def _place(
    rng: np.random.Generator, allowed_dist: np.ndarray, quadrant: str, extent: float, s: int
) -> tuple[int, int] | None:
    """Random integer centre for a lesion of max extent ``extent`` inside ``quadrant``, at least
    ``max(1.5, 0.03 s)`` px from both midlines and ``extent + 1`` px inside the allowed region."""
    margin = max(1.5, 0.03 * s)
    mid = midline(s)
    sx, sy = _quadrant_signs(quadrant)
    coords = np.arange(s, dtype=np.float32)
    okx = (
        (sx * (coords - mid) >= extent + margin)
        & (coords >= extent + 1)
        & (coords <= s - 2 - extent)
    )
    oky = (
        (sy * (coords - mid) >= extent + margin)
        & (coords >= extent + 1)
        & (coords <= s - 2 - extent)
    )
    ok = (allowed_dist >= extent + 1.0) & oky[:, None] & okx[None, :]
    ys, xs = np.nonzero(ok)
    if len(xs) == 0:
        return None
    j = int(rng.integers(len(xs)))
    return int(xs[j]), int(ys[j])


def render_scan(
    rng: np.random.Generator, modality: str, size: int, lesions_spec: Sequence[LesionSpec]
) -> tuple[np.ndarray, list[RenderedLesion]]:
    """Render one scan with its lesions.

    Args:
        rng: the image's own generator (all randomness of the scan comes from it).
        modality: ``ct``, ``mri`` or ``x-ray``.
        size: image side S in pixels.
        lesions_spec: 0-2 lesions, each in a distinct quadrant.

    Returns:
        (image uint8 S x S, lesions) where each lesion carries its bool S x S mask and labels
        derived from that mask (centroid -> side/vertical/quadrant, equivalent radius -> size).
        A lesion that does not fit its quadrant at the requested size is drawn a class smaller
        (about 1% of lesions at 64 px, none at 128 px; common only below 48 px).
    """
    if modality not in _BACKGROUNDS:
        raise ValueError(f"unknown modality {modality!r}; expected one of {MODALITIES}")
    if len({sp.quadrant for sp in lesions_spec}) != len(lesions_spec):
        raise ValueError("lesions must be in distinct quadrants")
    img, allowed, noise_sigma = _BACKGROUNDS[modality](rng, size)
    allowed_dist = cv2.distanceTransform(allowed.astype(np.uint8), cv2.DIST_L2, 5)
    out: list[RenderedLesion] = []
    for spec in lesions_spec:
        placed = None
        for cls in SIZES[: SIZES.index(spec.size) + 1][::-1]:
            lo, hi = RADIUS_BANDS[cls]
            pts, extent = _lesion_outline(rng, spec.shape, rng.uniform(lo, hi) * size)
            centre = _place(rng, allowed_dist, spec.quadrant, extent, size)
            if centre is not None:
                placed = (pts, centre)
                break
        if placed is None:
            raise RuntimeError(f"cannot place a lesion in the {spec.quadrant} of a {size}px scan")
        pts, (x0, y0) = placed
        # Pixel-centre inclusion (skimage) keeps the rasterised area unbiased (cv2.fillPoly adds
        # the boundary pixels, which inflates small lesions by about half a pixel of radius).
        mask = np.zeros((size, size), bool)
        rr, cc = draw_polygon(pts[:, 1] + y0, pts[:, 0] + x0, (size, size))
        mask[rr, cc] = True
        ys, xs = np.nonzero(mask)
        cxm, cym = float(xs.mean()), float(ys.mean())
        radius = math.sqrt(mask.sum() / math.pi)
        # Intensity: additive on the background so the underlying texture shows through; the
        # contrast (30-50 grey levels, against noise of 2.5-4 and texture of ~10) is clear but
        # not trivial. Soft edges from a blurred mask, texture inside from smooth noise.
        delta = rng.uniform(30.0, 50.0) * (1 if spec.intensity == "hyperdense" else -1)
        alpha = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), 0.7)
        inner = 1 + (0.25 if spec.shape == "irregular" else 0.1) * _fine_noise(rng, size, 1.0)
        img = img + delta * alpha * inner
        out.append(
            RenderedLesion(
                mask=mask,
                center_xy=(round(cxm), round(cym)),
                radius_px=radius,
                size=size_class(radius, size),
                intensity=spec.intensity,
                shape=spec.shape,
                side=side_of(cxm, size),
                vertical=vertical_of(cym, size),
                quadrant=quadrant_of(cxm, cym, size),
            )
        )
    img = cv2.GaussianBlur(img.astype(np.float32), (0, 0), _FINAL_BLUR[modality])
    n1 = rng.standard_normal((size, size), dtype=np.float32) * noise_sigma
    if modality == "mri":  # magnitude images have Rician noise
        n2 = rng.standard_normal((size, size), dtype=np.float32) * noise_sigma
        img = np.sqrt((img + n1) ** 2 + n2**2)
    else:
        img = img + n1
    return np.clip(np.round(img), 0, 255).astype(np.uint8), out


# ----------------------------------------------------------------------------------------------
# Questions, answers, references, reports
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QA:
    """One question with its canonical answer and its verbose reference."""

    question: str
    answer: str
    reference: str
    answer_type: str
    question_type: str
    key: str = ""  # the fact asked (type + parameter); two phrasings of a fact share it


def _yn(flag: bool) -> str:
    return "yes" if flag else "no"


def _describe(les: RenderedLesion) -> str:
    return f"{les.intensity} {les.shape} lesion"


def _sorted(lesions: Sequence[RenderedLesion]) -> list[RenderedLesion]:
    return sorted(lesions, key=lambda le: QUADRANTS.index(le.quadrant))


def _closed_candidates(modality: str, lesions: Sequence[RenderedLesion]) -> dict[str, list[QA]]:
    """Every closed question this scan supports, by type (presence is handled apart)."""
    n = len(lesions)
    c: dict[str, list[QA]] = {"modality": []}

    def add(qtype: str, param: str, phrasings: Sequence[str], yes: bool, ref: str) -> None:
        # One modality fact per scan (whichever modality is named); other facts per parameter.
        key = "modality" if qtype == "modality" else f"{qtype}:{param}"
        for q in phrasings:
            c.setdefault(qtype, []).append(QA(q, _yn(yes), ref, "closed", qtype, key))

    for m in MODALITIES:
        name = _MODALITY_NAME[m]
        art = "an" if m in ("mri", "x-ray") else "a"
        yes = m == modality
        ref = (
            f"Yes, this is {_MODALITY_LONG[modality]}."
            if yes
            else f"No, this is {_MODALITY_LONG[modality]}, not {art} {name}."
        )
        add(
            "modality",
            m,
            (f"Is this {art} {name} scan?", f"Was this image acquired with {name}?"),
            yes,
            ref,
        )
    if n >= 1:
        occupied = {le.quadrant for le in lesions}
        for q in QUADRANTS:
            yes = q in occupied
            loc = _location_words(q)
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
    if n == 1:
        le = lesions[0]
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
    return c


def _presence_candidates(lesions: Sequence[RenderedLesion]) -> list[QA]:
    yes = bool(lesions)
    ref = "Yes, a focal lesion is present." if yes else "No, no focal lesion is identified."
    return [
        QA(q, _yn(yes), ref, "closed", "presence", "presence")
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
        f"This is {_MODALITY_LONG[modality]}.",
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
        le = lesions[0]
        add(
            "abnormality",
            ("What abnormality is seen?", "What is the main finding in this image?"),
            _describe(le),
            f"A {_describe(le)} is seen.",
        )
        add(
            "location",
            (
                "Where is the lesion?",
                "Where is the lesion located?",
                "In which part of the image is the lesion?",
            ),
            le.quadrant,
            f"The lesion is located in the {_location_words(le.quadrant)} quadrant.",
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
    else:
        a, b = _sorted(lesions)
        add(
            "location",
            ("Where are the lesions?", "Where are the lesions located?"),
            f"{a.quadrant} and {b.quadrant}",
            f"The lesions are located in the {_location_words(a.quadrant)} and "
            f"{_location_words(b.quadrant)} quadrants.",
        )
        add(
            "abnormality",
            ("What abnormalities are seen?", "What are the findings in this image?"),
            f"{_describe(a)} and {_describe(b)}",
            f"Two lesions are seen: a {_describe(a)} and a {_describe(b)}.",
        )
    return c


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
    closed = _closed_candidates(modality, lesions)
    opened = _open_candidates(modality, lesions)
    slots = ["closed" if rng.random() < 0.5 else "open" for _ in range(n_questions)]
    ask_presence = "closed" in slots and rng.random() < PRESENCE_QUESTION_RATE
    ask_count = "open" in slots and rng.random() < COUNT_QUESTION_RATE
    targets = [_yn(rng.random() < p_yes) for _ in slots]
    out: list[QA] = []
    used_q: set[str] = set()
    used_k: set[str] = set()

    def avail(qas: list[QA], fresh: bool, want: str | None = None) -> list[QA]:
        return [
            qa
            for qa in qas
            if qa.question not in used_q
            and (want is None or qa.answer == want)
            and (not fresh or qa.key not in used_k)
        ]

    def ask(cands: list[QA]) -> bool:
        if not cands:
            return False
        qa = cands[int(rng.integers(len(cands)))]
        out.append(qa)
        used_q.add(qa.question)
        used_k.add(qa.key)
        return True

    def ask_closed(fresh: bool, target: str) -> bool:
        types = [
            t for t in sorted(closed) if all(avail(closed[t], fresh, a) for a in ("yes", "no"))
        ]
        if not types:
            return False
        qtype = types[int(rng.integers(len(types)))]
        if qtype not in PRIOR_CLOSED_TYPES:
            target = _yn(rng.random() < 0.5)
        return ask(avail(closed[qtype], fresh, target))

    def ask_open(fresh: bool, target: str) -> bool:  # open answers are not drawn: target unused
        # Count only through its content-independent draw (or as a rephrasing once asked).
        pool = {k: v for k, v in opened.items() if k != "count" or count_asked}
        types = [t for t in sorted(pool) if avail(pool[t], fresh)]
        if not types:
            return False
        return ask(avail(pool[types[int(rng.integers(len(types)))]], fresh))

    # The fixed-answer questions first, while every fact is still new.
    if ask_presence:
        presence = _presence_candidates(lesions)
        ask([presence[int(rng.integers(len(presence)))]])
        slots.remove("closed")
    count_asked = ask_count and ask(avail(opened["count"], True)[:1])
    if count_asked:
        slots.remove("open")
    for slot, target in zip(slots, targets):
        # Own kind first, then the other kind, first new facts only, then rephrasings.
        order = (ask_closed, ask_open) if slot == "closed" else (ask_open, ask_closed)
        any(f(fresh, target) for fresh in (True, False) for f in order)
    return [out[int(i)] for i in rng.permutation(len(out))]


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
                f"There is a {le.size} {_describe(le)} in the {le.quadrant} region.",
                f"A {le.size} {_describe(le)} is noted in the {_location_words(le.quadrant)} "
                "quadrant.",
            )
            for le in _sorted(lesions)
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


# ----------------------------------------------------------------------------------------------
# The dataset
# ----------------------------------------------------------------------------------------------


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


def _write_png(path: Path, array: np.ndarray) -> None:
    """8-bit grayscale PNG, fixed compression, no metadata: same array -> same bytes."""
    Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8)).save(
        path, format="PNG", compress_level=_PNG_COMPRESS_LEVEL
    )


def generate_synthlesion(cfg: DataConfig, out_dir: Path) -> dict[str, int]:
    """Generate SynthLesion into ``out_dir``.

    Writes ``images/<split>-<i:05d>.png`` (8-bit L), ``masks/<split>-<i:05d>.png`` (union mask,
    0/255; only for scans with lesions), ``masks/<split>-<i:05d>-l<j>.png`` (each lesion) and
    ``data.jsonl``: one :class:`VQARecord` a line, train then val then test, ids
    ``<split>-<i:05d>-q<k>`` and ``<split>-<i:05d>-report``, paths relative to ``out_dir``.
    Deterministic: the same ``cfg`` gives byte-identical files. The train split carries the
    language prior described in the module docstring; val/test are balanced.

    Returns:
        counts: records per split (``train``, ``val``, ``test``), per answer type (``closed``,
        ``open``, ``report``), scans per split (``images_<split>``), and ``records``, ``images``,
        ``lesions`` totals.
    """
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "masks").mkdir(parents=True, exist_ok=True)
    s = cfg.image_size
    counts: Counter[str] = Counter({k: 0 for k in (*SPLITS, "closed", "open", "report")})
    tmp = out_dir / "data.jsonl.tmp"
    with tmp.open("w", encoding="utf-8") as fh:
        for split, n_images in zip(
            SPLITS, (cfg.n_train_images, cfg.n_val_images, cfg.n_test_images)
        ):
            p_yes = cfg.language_prior if split == "train" else 0.5
            for i in range(n_images):
                rng = image_rng(cfg.seed, split, i)
                modality, specs = scan_plan(rng, cfg.seed, split, i, cfg.language_prior)
                image, lesions = render_scan(rng, modality, s, specs)
                stem = f"{split}-{i:05d}"
                image_rel = f"images/{stem}.png"
                _write_png(out_dir / image_rel, image)
                mask_rel = None
                lesion_models = []
                if lesions:
                    union = np.zeros((s, s), bool)
                    for j, le in enumerate(lesions):
                        rel = f"masks/{stem}-l{j}.png"
                        _write_png(out_dir / rel, le.mask.astype(np.uint8) * 255)
                        union |= le.mask
                        lesion_models.append(
                            Lesion(
                                center_xy=le.center_xy,
                                radius_px=round(le.radius_px, 3),
                                size=le.size,
                                side=le.side,
                                vertical=le.vertical,
                                quadrant=le.quadrant,
                                intensity=le.intensity,
                                shape=le.shape,
                                mask=rel,
                            )
                        )
                    mask_rel = f"masks/{stem}.png"
                    _write_png(out_dir / mask_rel, union.astype(np.uint8) * 255)
                qas = make_questions(rng, modality, lesions, cfg.questions_per_image, p_yes)
                ids = [f"{stem}-q{k}" for k in range(len(qas))]
                if rng.random() < cfg.report_fraction:
                    qas.append(make_report(rng, modality, lesions))
                    ids.append(f"{stem}-report")
                for rid, qa in zip(ids, qas):
                    answer = qa.answer
                    if qa.answer_type != "report" and framed(qa.question, cfg.sentence_fraction):
                        answer = sentence_answer(answer)
                    rec = VQARecord(
                        id=rid,
                        image=image_rel,
                        mask=mask_rel,
                        question=qa.question,
                        answer=answer,
                        reference=qa.reference,
                        answer_type=qa.answer_type,
                        question_type=qa.question_type,
                        split=split,
                        modality=modality,
                        dataset="synthlesion",
                        lesions=lesion_models,
                    )
                    fh.write(rec.model_dump_json() + "\n")
                    counts[split] += 1
                    counts[qa.answer_type] += 1
                counts[f"images_{split}"] += 1
                counts["lesions"] += len(lesions)
    os.replace(tmp, out_dir / "data.jsonl")
    counts["images"] = sum(counts[f"images_{sp}"] for sp in SPLITS)
    counts["records"] = sum(counts[sp] for sp in SPLITS)
    return dict(counts)


def load_records(out_dir: Path) -> list[VQARecord]:
    """Read and validate ``out_dir/data.jsonl``."""
    with (Path(out_dir) / "data.jsonl").open(encoding="utf-8") as fh:
        return [VQARecord.model_validate(json.loads(line)) for line in fh if line.strip()]
