"""Lesion-mask sources: mask image files, COCO run-length encodings and boxes, as bool HxW arrays.

Every function returns a numpy bool array, True on the lesion, the form
:func:`fire_mpo_core.corruption.corrupt` takes. Usage::

    from fire_mpo_core.corruption.masks import load_mask, decode_rle, box_mask, mask_from_source
    m = load_mask("lesions/busi/masks/benign (1)_mask.png")       # 1-bit PNG, JPEG, grey or RGB
    m = decode_rle({"size": [h, w], "counts": "0X1..."})           # COCO compressed or list counts
    m = box_mask([x0, y0, x1, y1], (h, w))
    m = mask_from_source(any_of_the_above, image.shape, resize=False)

Mask files are binarised as grey > 127 (grey = ITU-R 601 luma, PIL's "L" conversion), which turns
1-bit PNGs (0/255 after conversion) into exact masks and removes JPEG ringing around a 0/255 mask;
masks stored as 0/1 label images (max <= 1), which "> 127" would empty, count every non-zero pixel.
Masks whose size differs from the image's are an error unless `resize=True` is asked for; then they
are resized with nearest neighbour, which keeps them binary and does not grow or shrink the lesion
by more than a pixel.

COCO RLE (the `counts` format of pycocotools' maskApi.c, re-implemented here in a few lines): the
mask is flattened in column-major (Fortran) order and described by alternating run lengths,
starting with a run of 0s (possibly of length 0). The compressed string form writes each count
as a little-endian base-32 varint, 5 data bits per character, 0x20 as the "more" bit, 0x10 of the
last character as the sign, each character offset by 48 ('0'); from the fourth count on
(index > 2) it stores the difference to the count two places before (the previous run of the
same value).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image

#: Grey threshold for binarising mask images: foreground is grey > 127.
MASK_THRESHOLD = 127


def _threshold_grey(grey: np.ndarray, threshold: float) -> np.ndarray:
    """grey > threshold, except for 0/1 label masks (max <= 1), where > threshold would be empty:
    those count every non-zero pixel (floats: > 0.5)."""
    top = grey.max() if grey.size else 0
    if top <= 1:
        return grey > (0.5 if np.issubdtype(grey.dtype, np.floating) else 0)
    return grey > threshold


def binarize(mask: np.ndarray, threshold: float = MASK_THRESHOLD) -> np.ndarray:
    """bool HxW from a bool, grey HxW or colour HxWx{3,4} array; foreground = grey > threshold.

    Colour is reduced to grey with the ITU-R 601 luma weights (0.299, 0.587, 0.114) that PIL's
    "L" conversion uses, so an array and the file it came from binarise the same way. Label
    masks stored as 0/1 (max <= 1) count every non-zero pixel, not > 127, which would be empty.
    """
    mask = np.asarray(mask)
    if mask.dtype == np.bool_:
        if mask.ndim != 2:
            raise ValueError(f"bool mask must be HxW, got shape {mask.shape}")
        return mask.copy()
    if mask.ndim == 3 and mask.shape[2] in (3, 4):
        grey = mask[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
        if mask.max() <= 1:
            return mask[..., :3].max(axis=2) > 0
    elif mask.ndim == 2:
        grey = mask
    else:
        raise ValueError(f"mask must be HxW or HxWx3/4, got shape {mask.shape}")
    return np.asarray(_threshold_grey(grey, threshold))


def load_mask(path: str | Path, threshold: float = MASK_THRESHOLD) -> np.ndarray:
    """Read a mask image file (PNG incl. 1-bit, JPEG, TIFF, ...) as bool HxW, grey > threshold.

    16-bit or 32-bit integer images (label maps) count every non-zero label as foreground, and so
    do 8-bit masks stored as 0/1 (see :func:`binarize`).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mask file not found: {path}")
    with Image.open(path) as im:
        if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
            return np.asarray(im) > 0
        grey = np.asarray(im.convert("L"))
    return _threshold_grey(grey, threshold)


def _check_size(size: Any) -> tuple[int, int]:
    if not isinstance(size, Sequence) or len(size) != 2:
        raise ValueError(f"RLE 'size' must be [height, width], got {size!r}")
    h, w = int(size[0]), int(size[1])
    if h < 0 or w < 0:
        raise ValueError(f"RLE 'size' must be non-negative, got {size!r}")
    return h, w


def rle_string_to_counts(s: str | bytes) -> list[int]:
    """Decode a COCO compressed RLE string into its run lengths (pycocotools' rleFrString)."""
    if isinstance(s, bytes):
        s = s.decode("ascii")
    counts: list[int] = []
    p = 0
    while p < len(s):
        x = 0
        k = 0
        more = True
        while more:
            if p >= len(s):
                raise ValueError(f"truncated RLE string {s!r}: a count's last character is missing")
            c = ord(s[p]) - 48
            if not 0 <= c < 64:
                raise ValueError(f"invalid character {s[p]!r} in RLE string at position {p}")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)  # sign-extend: the last group's 0x10 bit is the sign
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def counts_to_rle_string(counts: Sequence[int]) -> str:
    """Encode run lengths as a COCO compressed RLE string (pycocotools' rleToString)."""
    out: list[str] = []
    for i, cnt in enumerate(counts):
        x = int(cnt) - (int(counts[i - 2]) if i > 2 else 0)
        more = True
        while more:
            c = x & 0x1F
            x >>= 5  # arithmetic shift, as in C on a signed long
            more = x != -1 if c & 0x10 else x != 0
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return "".join(out)


def decode_rle(rle: dict[str, Any]) -> np.ndarray:
    """bool HxW from a COCO RLE dict {"size": [h, w], "counts": str | bytes | list[int]}."""
    if not isinstance(rle, dict) or "size" not in rle or "counts" not in rle:
        raise ValueError("RLE must be a dict with 'size' [h, w] and 'counts'")
    h, w = _check_size(rle["size"])
    counts = rle["counts"]
    if isinstance(counts, str | bytes):
        counts = rle_string_to_counts(counts)
    counts = [int(c) for c in counts]
    if any(c < 0 for c in counts):
        raise ValueError("RLE counts must be non-negative (corrupt or wrongly decoded RLE)")
    if sum(counts) != h * w:
        raise ValueError(f"RLE counts sum to {sum(counts)}, expected h*w = {h}*{w} = {h * w}")
    # Runs alternate 0, 1, 0, ... starting with 0s: repeat each run's value by its length.
    values = np.arange(len(counts)) % 2 == 1
    flat = np.repeat(values, counts)
    return flat.reshape((w, h)).T.copy()  # column-major, as COCO stores it


def encode_rle(mask: np.ndarray, compress: bool = True) -> dict[str, Any]:
    """COCO RLE dict of a bool HxW mask; `compress=False` gives the list-of-counts form."""
    mask = np.asarray(mask)
    if mask.dtype != np.bool_ or mask.ndim != 2:
        raise ValueError(f"encode_rle needs a bool HxW mask, got {mask.dtype} {mask.shape}")
    h, w = mask.shape
    flat = mask.T.reshape(-1)
    # Run boundaries: positions where the value changes, plus the ends; a leading 0-run of
    # length 0 when the mask starts with a 1.
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    bounds = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat.size and flat[0]:
        counts = [0, *counts]
    if flat.size == 0:
        counts = [0]
    return {"size": [h, w], "counts": counts_to_rle_string(counts) if compress else counts}


def box_mask(box: Sequence[float], shape: tuple[int, ...]) -> np.ndarray:
    """bool HxW that is True on the pixels a box [x0, y0, x1, y1] covers.

    Coordinates are in pixel edges (x across columns, y down rows, the image spans [0, W] x
    [0, H]); a pixel is in the box when any part of it is, so fractional boxes round outwards.
    The box is clipped to the image; an empty or inverted box is an error.
    """
    if len(box) != 4:
        raise ValueError(f"box must be [x0, y0, x1, y1], got {box!r}")
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (x1 > x0 and y1 > y0):
        raise ValueError(f"box must have x1 > x0 and y1 > y0, got {box!r}")
    h, w = int(shape[0]), int(shape[1])
    c0, c1 = max(0, int(np.floor(x0))), min(w, int(np.ceil(x1)))
    r0, r1 = max(0, int(np.floor(y0))), min(h, int(np.ceil(y1)))
    mask = np.zeros((h, w), dtype=bool)
    if c1 <= c0 or r1 <= r0:
        raise ValueError(f"box {box!r} lies outside the {h}x{w} image")
    mask[r0:r1, c0:c1] = True
    return mask


def resize_mask(mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Nearest-neighbour resize of a bool mask to `shape[:2]` (stays binary)."""
    h, w = int(shape[0]), int(shape[1])
    if mask.shape == (h, w):
        return mask
    out = cv2.resize(mask.astype(np.uint8), (w, h), interpolation=cv2.INTER_NEAREST)
    return out.astype(bool)


def fit_mask(mask: np.ndarray, image_shape: tuple[int, ...], resize: bool = False) -> np.ndarray:
    """Return `mask` if it matches the image's HxW; resize it (nearest) only if `resize`."""
    if mask.shape == tuple(image_shape[:2]):
        return mask
    if not resize:
        raise ValueError(
            f"mask is {mask.shape[0]}x{mask.shape[1]} but the image is "
            f"{image_shape[0]}x{image_shape[1]}; pass resize=True to resize it (nearest neighbour)"
        )
    return resize_mask(mask, image_shape)


def mask_from_source(
    source: Any,
    image_shape: tuple[int, ...],
    resize: bool = False,
    base_dir: str | Path | None = None,
) -> np.ndarray | None:
    """bool HxW for the image from any mask source, or None when `source` is None.

    `source` may be: a bool/uint8/RGB array; a path (str or Path, relative to `base_dir` if
    given) of a mask image; a COCO RLE dict; a box [x0, y0, x1, y1] of numbers.

    A mask file whose every pixel is foreground is refused (ValueError): a dataset lesion mask
    that covers the whole image is an export error (an inverted or blank-white file), and
    corrupting "inside" it would silently turn the lesion ablation into whole-image noise. An
    empty mask is returned as is; the corrupt stage records it (``empty_mask``) and applies the
    paper's no-mask fallback.
    """
    if source is None:
        return None
    if isinstance(source, np.ndarray):
        mask = binarize(source)
    elif isinstance(source, str | Path):
        path = Path(source)
        if base_dir is not None and not path.is_absolute():
            path = Path(base_dir) / path
        mask = load_mask(path)
        if mask.size and mask.all():
            raise ValueError(
                f"mask file {path.name!r} marks every pixel as lesion (all foreground): "
                "not a lesion mask (inverted or blank export?)"
            )
    elif isinstance(source, dict):
        mask = decode_rle(source)
    elif isinstance(source, Sequence) and len(source) == 4:
        return box_mask(source, image_shape)
    else:
        raise TypeError(
            f"unsupported mask source {type(source).__name__}: expected an array, a path, "
            "a COCO RLE dict or a box [x0, y0, x1, y1]"
        )
    return fit_mask(mask, image_shape, resize=resize)
