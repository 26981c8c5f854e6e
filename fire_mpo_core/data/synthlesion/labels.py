"""SynthLesion's vocabulary and labels in the patient frame (radiological convention).

The image's right is the patient's LEFT: a lesion's side is ``"left"`` when its centroid column is
right of the vertical midline ``x = (S - 1) / 2``; size classes come from the equivalent radius of
the rasterised mask (see :mod:`fire_mpo_core.data.synthlesion`)::

    quadrant_of(40, 10, 64)   # 'upper left'
    size_class(4.8, 64)       # 'large'
"""

from __future__ import annotations

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


def quadrant_signs(quadrant: str) -> tuple[int, int]:
    """(sx, sy): sign of (x - mid) and (y - mid) for a patient-frame quadrant."""
    vertical, side = quadrant.split()
    return (1 if side == "left" else -1), (-1 if vertical == "upper" else 1)


def location_words(quadrant: str) -> str:
    """Clinical word order of a quadrant: 'upper left' -> 'left upper'."""
    vertical, side = quadrant.split()
    return f"{side} {vertical}"
