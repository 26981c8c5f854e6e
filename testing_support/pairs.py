"""Test helper (not product code): preference pairs built straight from SynthLesion records.

The pipeline makes pairs by sampling the policy and judging its answers; tests need pairs without
a trained model, so here chosen = the record's answer and rejected = a wrong answer of the same
question type taken from another record, each marked as one whole-answer span. Corrupted images
are the scan with Gaussian noise inside the lesion mask (whole image without one), made with
``fire_mpo_core.corruption.corrupt`` and saved next to the pairs' ``data.jsonl``.

    pairs_path = write_pairs(records, data_dir, out_dir, n=8)
    pairs = load_pairs(pairs_path)
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from fire_mpo_core.data.records import PreferencePair, VQARecord
from fire_mpo_core.store import write_jsonl

try:  # the corruption module is built in parallel; without it pairs get no v'
    from fire_mpo_core.corruption import corrupt
except ImportError:  # pragma: no cover - depends on the checkout
    corrupt = None


def make_pairs(records: Sequence[VQARecord], n: int | None = None) -> list[PreferencePair]:
    """Pairs (chosen = answer, rejected = a different answer of the same question type) for up to
    ``n`` non-report records that have such a wrong answer; whole-answer spans."""
    by_type: dict[str, list[str]] = {}
    for r in records:
        answers = by_type.setdefault(r.question_type, [])
        if r.answer not in answers:
            answers.append(r.answer)
    pairs = []
    for r in records:
        if r.answer_type == "report":
            continue
        wrong = [a for a in by_type[r.question_type] if a != r.answer]
        if not wrong:
            continue
        rejected = wrong[len(pairs) % len(wrong)]
        pairs.append(
            PreferencePair(
                id=f"{r.id}#pair",
                record_id=r.id,
                image=r.image,
                mask=r.mask,
                question=r.question,
                answer_type=r.answer_type,
                chosen=r.answer,
                rejected=rejected,
                chosen_spans=[(0, len(r.answer))],
                rejected_spans=[(0, len(rejected))],
                verdict="correct",
            )
        )
        if n is not None and len(pairs) == n:
            break
    return pairs


def add_corrupted_images(
    pairs: Sequence[PreferencePair], data_dir: Path, out_dir: Path, seed: int = 0
) -> list[PreferencePair]:
    """Copies of ``pairs`` with ``corrupted_image`` set to a lesion-noise image under
    ``out_dir/corrupted/`` (relative to ``out_dir``); unchanged when the corruption module is
    missing."""
    if corrupt is None:
        return list(pairs)
    (out_dir / "corrupted").mkdir(parents=True, exist_ok=True)
    out = []
    for i, p in enumerate(pairs):
        image = np.asarray(Image.open(data_dir / p.image).convert("L"))
        mask = None
        if p.mask is not None:
            mask = np.asarray(Image.open(data_dir / p.mask).convert("L")) > 127
        rel = f"corrupted/{p.record_id}.png"
        Image.fromarray(corrupt(image, mask, "noise", seed + i)).save(out_dir / rel)
        out.append(p.model_copy(update={"corrupted_image": rel}))
    return out


def write_pairs(
    records: Sequence[VQARecord],
    data_dir: Path,
    out_dir: Path,
    n: int | None = None,
    with_corrupted: bool = True,
    extra: Sequence[PreferencePair | dict] = (),
) -> Path:
    """Make pairs (with v' unless ``with_corrupted`` is False), append ``extra`` records verbatim
    and write ``out_dir/data.jsonl``; returns its path. ``out_dir`` is the corrupt root."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pairs = make_pairs(records, n)
    if with_corrupted:
        pairs = add_corrupted_images(pairs, data_dir, out_dir)
    path = out_dir / "data.jsonl"
    write_jsonl(path, [*pairs, *extra])
    return path
