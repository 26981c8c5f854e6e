"""Per-image quality numbers of a corruption: did it change the lesion, and only the lesion?

Usage::

    from fire_mpo_core.corruption.quality import corruption_quality
    q = corruption_quality(image, corrupted, mask)       # a CorruptionQuality model
    q.frac_changed_outside == 0.0                         # for every kind but crop

Numbers (pixels are HxW positions; a pixel counts as changed when any channel differs):

- ``frac_changed_inside``  share of mask pixels that changed.
- ``frac_changed_outside`` share of non-mask pixels that changed (0 is the contract for all
  kinds but crop); None when the mask covers the whole image.
- ``mean_abs_change``      mean over all pixels and channels of |x' - x| (0-255 scale).
- ``mean_abs_change_inside`` the same over the mask's pixels.
- ``ssim_inside``          SSIM (Wang et al. 2004) between x and x' on the mask's bounding box,
  with scikit-image's `structural_similarity` defaults (7x7 uniform window, sample covariance,
  K1 = 0.01, K2 = 0.03, data range 255, mean over the valid window centres and the channels);
  1 = unchanged, near 0 = structure destroyed. The window shrinks to the box's shorter odd side
  for small boxes; None when that side is under 3 px. Computed by :func:`ssim`, an OpenCV
  box-filter form of the same formula: it agrees with scikit-image to 1e-6 (tested) and is about
  5x faster (0.2 s instead of 1 s on a 1310x1024 RGB VQA-RAD image on 2 cores), which matters
  when whole-image corruption makes the box the whole image.
- ``mask_fraction``        the mask's share of the image.
- ``lesion_contrast_before`` / ``lesion_contrast_after``: lesion evidence, when the lesion's own
  mask is known (:func:`lesion_contrast`): mean grey level inside the lesion minus the mean of a
  ring of tissue around it (pixels 3-6 px beyond the corrupted region, so the ring is never
  corrupted itself), signed so that the lesion's own direction is positive (a bright lesion's
  contrast stays positive while it is visible, a dark one's too).
- ``evidence_remaining``   ``max(0, after) / before``: 1 = the lesion stands out as before, 0 =
  gone. ``evidence_removed`` is ``evidence_remaining <= EVIDENCE_REMOVED_MAX`` (0.25). Measured
  on 300 SynthLesion train lesion scans (share removed): noise sigma 45 inside the mask 0.06
  (zero-mean noise keeps the lesion's mean shift), inpainting (Telea) the mask grown by 0 / 1 /
  2 / 3 px 0.91 / 0.92 / 0.88 / 0.81. The ring moves out with the corrupted region, so a larger
  dilation is compared with tissue farther away; the number is a property of this definition.

`mask=None` means the whole image was the target.
"""

from __future__ import annotations

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from fire_mpo_core.corruption.ops import dilate_mask, mask_bbox, validate_image, validate_mask


class CorruptionQuality(BaseModel):
    """Quality numbers of one corrupted image (see the module docstring)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mask_fraction: float = Field(ge=0, le=1, description="Share of the image inside the mask.")
    frac_changed_inside: float | None = Field(
        ge=0, le=1, description="Share of mask pixels changed (None: empty mask)."
    )
    frac_changed_outside: float | None = Field(
        ge=0, le=1, description="Share of pixels outside the mask changed (None: no outside)."
    )
    mean_abs_change: float = Field(ge=0, description="Mean |x' - x| over the image, 0-255 scale.")
    mean_abs_change_inside: float | None = Field(
        ge=0, description="Mean |x' - x| inside the mask, 0-255 scale (None: empty mask)."
    )
    ssim_inside: float | None = Field(
        description="SSIM of x vs x' on the mask's bounding box (None: box under 3 px)."
    )
    lesion_contrast_before: float | None = Field(
        default=None,
        description="Lesion minus surrounding ring, grey levels, in x (None: no "
        "lesion mask known).",
    )
    lesion_contrast_after: float | None = Field(
        default=None, description="The same in x', signed in the lesion's direction."
    )
    evidence_remaining: float | None = Field(
        default=None, ge=0, description="max(0, after) / before: 1 = lesion as visible, 0 = gone."
    )
    evidence_removed: bool | None = Field(
        default=None, description="evidence_remaining <= 0.25 (EVIDENCE_REMOVED_MAX)."
    )


#: A lesion counts as removed from v' when at most this share of its contrast remains.
EVIDENCE_REMOVED_MAX = 0.25
#: The reference ring: this many pixels beyond the corrupted region, to this many more.
_RING_GAP_PX, _RING_WIDTH_PX = 2, 4


def lesion_contrast(image: np.ndarray, lesion: np.ndarray, region: np.ndarray) -> float | None:
    """Mean grey level inside ``lesion`` minus that of a ring of tissue just outside ``region``
    (the corrupted area, ``lesion`` grown by the corruption's dilation): pixels between
    ``_RING_GAP_PX + 1`` and ``_RING_GAP_PX + _RING_WIDTH_PX`` px beyond it. None when the ring
    or the lesion is empty. Colour images are averaged over channels."""
    grey = image.mean(axis=2) if image.ndim == 3 else image.astype(np.float64)
    inner = dilate_mask(region, _RING_GAP_PX)
    ring = dilate_mask(region, _RING_GAP_PX + _RING_WIDTH_PX) & ~inner
    if not lesion.any() or not ring.any():
        return None
    return float(grey[lesion].mean() - grey[ring].mean())


def ssim(a: np.ndarray, b: np.ndarray, win_size: int = 7, data_range: float = 255.0) -> float:
    """Mean SSIM of two same-shape HxW or HxWxC arrays, as scikit-image computes it by default.

    S = (2 mu_a mu_b + C1)(2 s_ab + C2) / ((mu_a^2 + mu_b^2 + C1)(s_a^2 + s_b^2 + C2)) with
    C1 = (0.01 L)^2, C2 = (0.03 L)^2, local means and N/(N-1)-corrected (co)variances over a
    win_size^2 uniform window; averaged over centres at least (win_size - 1) / 2 from the edge
    (and over channels). Float32 on data shifted by L/2 keeps the variance cancellation error
    near 1e-3 grey levels^2, far below C2 = 58.5.
    """
    if a.shape != b.shape:
        raise ValueError(f"ssim: shapes differ, {a.shape} vs {b.shape}")
    if win_size < 3 or win_size % 2 == 0 or win_size > min(a.shape[:2]):
        raise ValueError(f"ssim: win_size must be odd, >= 3 and <= the image side, got {win_size}")
    half = np.float32(data_range / 2)
    x = a.astype(np.float32) - half
    y = b.astype(np.float32) - half

    def mean(z: np.ndarray) -> np.ndarray:
        return cv2.boxFilter(z, -1, (win_size, win_size), normalize=True)

    ux, uy = mean(x), mean(y)
    n = win_size * win_size
    cov = np.float32(n / (n - 1))
    vx = cov * (mean(x * x) - ux * ux)
    vy = cov * (mean(y * y) - uy * uy)
    vxy = cov * (mean(x * y) - ux * uy)
    ux += half
    uy += half
    c1, c2 = np.float32((0.01 * data_range) ** 2), np.float32((0.03 * data_range) ** 2)
    s = (2 * ux * uy + c1) * (2 * vxy + c2) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    p = (win_size - 1) // 2
    return float(s[p : s.shape[0] - p, p : s.shape[1] - p].mean(dtype=np.float64))


def corruption_quality(
    image: np.ndarray,
    corrupted: np.ndarray,
    mask: np.ndarray | None,
    lesion: np.ndarray | None = None,
) -> CorruptionQuality:
    """Quality numbers of `corrupted` against `image` for the target `mask` (None = whole image).

    Shapes: image, corrupted uint8 HxW or HxWx3 (the same); mask bool HxW or None; `lesion`
    (bool HxW, the lesion's own mask before any dilation) turns on the evidence numbers.
    """
    image = validate_image(image)
    corrupted = validate_image(corrupted)
    if corrupted.shape != image.shape:
        raise ValueError(f"corrupted shape {corrupted.shape} differs from image {image.shape}")
    mask = validate_mask(mask, image.shape)
    h, w = image.shape[:2]
    target = np.ones((h, w), dtype=bool) if mask is None else mask
    # Counts and sums instead of boolean indexing: this runs once per corrupted image.
    diff = cv2.absdiff(corrupted, image)
    changed = (diff.max(axis=2) if diff.ndim == 3 else diff) > 0
    n_in = int(np.count_nonzero(target))
    n_out = target.size - n_in
    changed_in = int(np.count_nonzero(changed & target))
    changed_out = int(np.count_nonzero(changed)) - changed_in
    channels = 1 if diff.ndim == 2 else diff.shape[2]
    sum_all = float(diff.sum(dtype=np.int64))
    # Per pixel, |x' - x| is averaged over the channels; cv2.mean gives per-channel means.
    mean_in = (
        float(np.mean(cv2.mean(diff, mask=target.view(np.uint8))[:channels])) if n_in else None
    )
    ssim_val = None
    box = mask_bbox(target)
    if box is not None:
        y0, y1, x0, x1 = box
        side = min(y1 - y0, x1 - x0)
        win = min(7, side if side % 2 else side - 1)
        if win >= 3:
            ssim_val = ssim(image[y0:y1, x0:x1], corrupted[y0:y1, x0:x1], win_size=win)
    evidence: dict[str, float | bool | None] = {}
    if lesion is not None and lesion.any():
        region = target if mask is not None else lesion
        before = lesion_contrast(image, lesion, region)
        after = lesion_contrast(corrupted, lesion, region)
        if before is not None and after is not None and abs(before) > 0:
            sign = 1.0 if before > 0 else -1.0
            remaining = max(0.0, sign * after) / abs(before)
            evidence = {
                "lesion_contrast_before": round(abs(before), 3),
                "lesion_contrast_after": round(sign * after, 3),
                "evidence_remaining": round(remaining, 4),
                "evidence_removed": remaining <= EVIDENCE_REMOVED_MAX,
            }
    return CorruptionQuality(
        **evidence,
        mask_fraction=n_in / target.size,
        frac_changed_inside=changed_in / n_in if n_in else None,
        frac_changed_outside=changed_out / n_out if n_out else None,
        mean_abs_change=sum_all / diff.size,
        mean_abs_change_inside=mean_in,
        ssim_inside=ssim_val,
    )
