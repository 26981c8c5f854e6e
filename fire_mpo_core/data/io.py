"""Reading a prepared dataset folder: records and their images, with per-record rejects."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from PIL import Image

from fire_mpo_core.data.records import VQARecord
from fire_mpo_core.store import DATA, read_jsonl

# Decompression bombs are refused rather than decoded (medical scans are far below this).
MAX_IMAGE_PIXELS = 64_000_000
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS


def load_records(
    root: Path,
    splits: tuple[str, ...] | None = None,
    answer_types: tuple[str, ...] | None = None,
    on_reject: Callable[[str, str], None] | None = None,
) -> list[VQARecord]:
    """Records of `root/data.jsonl`, filtered by split and answer type."""
    out = []
    for r in read_jsonl(Path(root) / DATA, VQARecord, on_reject):
        if splits and r.split not in splits:
            continue
        if answer_types and r.answer_type not in answer_types:
            continue
        out.append(r)
    return out


def resolve_in_root(root: Path, rel: str) -> Path:
    """Resolve a record's relative path, refusing paths that escape the dataset root."""
    root = Path(root).resolve()
    p = (root / rel).resolve()
    if not p.is_relative_to(root):
        raise ValueError(f"path {rel!r} escapes the dataset root {root}")
    return p


def open_image(root: Path, rel: str) -> Image.Image:
    """Open a record image as RGB (vision towers expect 3 channels), fully decoded."""
    with Image.open(resolve_in_root(root, rel)) as im:
        im.load()
        return im.convert("RGB")
