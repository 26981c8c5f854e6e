"""Rendering a SynthLesion scan: lesion outlines, their placement and :func:`render_scan`.

A lesion is drawn additively on its modality's background (:mod:`.backgrounds`), inside one
quadrant and the anatomy's allowed region; its labels are derived from the rasterised mask::

    rng = image_rng(seed, "train", 0)
    image, lesions = render_scan(rng, "ct", 128, [LesionSpec("upper left", "small", "hyperdense",
                                                            "round")])
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np
from skimage.draw import polygon as draw_polygon

from fire_mpo_core.data.synthlesion.backgrounds import BACKGROUNDS, FINAL_BLUR, _fine_noise
from fire_mpo_core.data.synthlesion.labels import (
    MODALITIES,
    RADIUS_BANDS,
    SIZES,
    midline,
    quadrant_of,
    quadrant_signs,
    side_of,
    size_class,
    vertical_of,
)


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
    sx, sy = quadrant_signs(quadrant)
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
    if modality not in BACKGROUNDS:
        raise ValueError(f"unknown modality {modality!r}; expected one of {MODALITIES}")
    if len({sp.quadrant for sp in lesions_spec}) != len(lesions_spec):
        raise ValueError("lesions must be in distinct quadrants")
    img, allowed, noise_sigma = BACKGROUNDS[modality](rng, size)
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
    img = cv2.GaussianBlur(img.astype(np.float32), (0, 0), FINAL_BLUR[modality])
    n1 = rng.standard_normal((size, size), dtype=np.float32) * noise_sigma
    if modality == "mri":  # magnitude images have Rician noise
        n2 = rng.standard_normal((size, size), dtype=np.float32) * noise_sigma
        img = np.sqrt((img + n1) ** 2 + n2**2)
    else:
        img = img + n1
    return np.clip(np.round(img), 0, 255).astype(np.uint8), out
