"""Reading a prepared dataset folder: records and their images, with per-record rejects::

    from fire_mpo_core.data.io import load_records, open_image
    records = load_records(root, splits=("train",), on_reject=writer.reject)
    image = open_image(root, records[0].image)        # PIL RGB, fully decoded

Bad input never crashes a stage: a record line that is not JSON / not UTF-8 / misses fields, or
repeats an id already seen, goes to ``on_reject(id, reason)``; an image that is missing, empty,
truncated, not an image, too large (a decompression bomb), or whose path escapes the dataset root
(``../``, an absolute path, a symlink pointing outside) raises :class:`ImageError` (a
``ValueError``) naming the file and the reason, which the stages turn into a per-record reject.
16-bit greyscale (and 32-bit integer / float) images are scaled to 8 bits by their own min..max
range (a 12-bit scan in a 16-bit container would otherwise be near-black); palette, CMYK, LA and
RGBA images are converted to RGB.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from fire_mpo_core.data.records import VQARecord
from fire_mpo_core.faults import fault_point
from fire_mpo_core.store import DATA, read_jsonl

# Decompression bombs are refused rather than decoded (medical scans are far below this).
MAX_IMAGE_PIXELS = 64_000_000
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS

# Modes whose samples are wider than 8 bits: scaled by their own range, not clipped.
_WIDE_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N", "F"}


class ImageError(ValueError):
    """An image that cannot be used; the message names the file and why."""


def load_records(
    root: Path,
    splits: tuple[str, ...] | None = None,
    answer_types: tuple[str, ...] | None = None,
    on_reject: Callable[[str, str], None] | None = None,
) -> list[VQARecord]:
    """Records of `root/data.jsonl`, filtered by split and answer type.

    A second record with an id already seen is rejected (``duplicate id``), never silently
    merged or dropped: ids key rollouts, pairs and reference log-probs downstream. Without
    `on_reject` the first bad line raises ``ValueError`` naming the file, the record and the field.
    """
    path = Path(root) / DATA
    seen: set[str] = set()
    out = []
    for r in read_jsonl(path, VQARecord, on_reject):
        if r.id in seen:
            reason = "duplicate id: an earlier record of this file has the same id"
            if on_reject is None:
                raise ValueError(f"{path}: record {r.id}: {reason}")
            on_reject(r.id, reason)
            continue
        seen.add(r.id)
        if splits and r.split not in splits:
            continue
        if answer_types and r.answer_type not in answer_types:
            continue
        out.append(r)
    return out


def resolve_in_root(root: Path, rel: str) -> Path:
    """Resolve a record's relative path, refusing paths that escape the dataset root.

    ``..`` components, absolute paths and symlinks whose target lies outside the root all
    resolve outside it and raise ``ValueError``; so does a path with a NUL byte.
    """
    if "\0" in rel:
        raise ValueError(f"path {rel!r} contains a NUL byte")
    root = Path(root).resolve()
    p = (root / rel).resolve()
    if not p.is_relative_to(root):
        raise ValueError(f"path {rel!r} escapes the dataset root {root}")
    return p


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in _WIDE_MODES:
        a = np.asarray(im, dtype=np.float64)
        if not np.isfinite(a).all():
            raise ValueError("has non-finite pixel values")
        lo, hi = float(a.min()), float(a.max())
        scaled = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
        im = Image.fromarray(np.rint(scaled).astype(np.uint8), mode="L")
    return im if im.mode == "RGB" else im.convert("RGB")


def open_image(root: Path, rel: str) -> Image.Image:
    """Open a record image as RGB (vision towers expect 3 channels), fully decoded.

    Raises:
        ImageError: the file is missing, empty, truncated, corrupt, not an image, over
            ``MAX_IMAGE_PIXELS`` pixels, or its path escapes ``root``; the message names it.
    """
    fault_point("io.open_image")
    try:
        path = resolve_in_root(root, rel)
    except ValueError as e:
        raise ImageError(f"image {rel!r}: {e}") from None
    if not path.is_file():
        raise ImageError(f"image {rel!r}: file not found under {Path(root).resolve()}")
    if path.stat().st_size == 0:
        raise ImageError(f"image {rel!r}: file is empty (0 bytes)")
    try:
        with Image.open(path) as im:
            w, h = im.size
            # Checked before decoding: PIL only refuses above twice its limit, with a warning
            # (not an error) in between.
            if w * h > MAX_IMAGE_PIXELS:
                raise ImageError(
                    f"image {rel!r}: {w}x{h} = {w * h} pixels exceeds the limit of "
                    f"{MAX_IMAGE_PIXELS} (decompression bomb?)"
                )
            im.load()
            return _to_rgb(im)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:  # over twice the limit: PIL refuses in open()
        raise ImageError(f"image {rel!r}: refused: {e}") from None
    # PIL reports corrupt files with OSError, SyntaxError (broken PNG chunks), EOFError,
    # ValueError or struct errors depending on the codec: all mean "unusable image".
    except Exception as e:
        raise ImageError(f"image {rel!r}: cannot be decoded: {type(e).__name__}: {e}") from None
