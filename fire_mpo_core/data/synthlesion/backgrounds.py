"""SynthLesion's modality backgrounds: the anatomy a scan is drawn on, before its lesions.

Each background draws from the scan's own generator and returns (image float32 S x S, the bool
region where lesions may go, the noise sigma of the final image): ``ct`` (axial abdomen: fat ring,
ribs, liver, kidneys, spine), ``mri`` (axial T1-like brain: skull, gray/white matter,
ventricles, bias field) and ``x-ray`` (chest PA: lungs, mediastinum and heart, ribs,
clavicles)::

    img, allowed, sigma = BACKGROUNDS["ct"](rng, 128)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import cv2
import numpy as np

from fire_mpo_core.data.synthlesion.labels import midline


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


BACKGROUNDS: dict[
    str, Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray, float]]
] = {"ct": _ct_background, "mri": _mri_background, "x-ray": _xray_background}
#: Blur (px) of the rendered image: CT crisp, MRI smooth, radiographs soft.
FINAL_BLUR = {"ct": 0.55, "mri": 0.8, "x-ray": 0.9}
