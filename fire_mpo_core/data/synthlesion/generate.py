"""SynthLesion's writer: scans, masks and records of every split into one dataset folder.

    from fire_mpo_core.data.synthlesion import generate_synthlesion, load_records
    counts = generate_synthlesion(DataConfig(seed=0), Path("out"))
    records = load_records(Path("out"))

PNGs are written by Pillow with a fixed compression level and no timestamps, so the same config
gives byte-identical files.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from fire_mpo_core.data.config import DataConfig
from fire_mpo_core.data.records import Lesion, VQARecord
from fire_mpo_core.data.synthlesion.plan import SPLITS, image_rng, scan_plan
from fire_mpo_core.data.synthlesion.questions import make_questions
from fire_mpo_core.data.synthlesion.render import RenderedLesion, render_scan
from fire_mpo_core.data.synthlesion.reports import make_report
from fire_mpo_core.data.synthlesion.text import QA, framed, sentence_answer

_PNG_COMPRESS_LEVEL = 6


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
    counts: Counter[str] = Counter({k: 0 for k in (*SPLITS, "closed", "open", "report")})
    tmp = out_dir / "data.jsonl.tmp"
    with tmp.open("w", encoding="utf-8") as fh:
        for split, n_images in zip(
            SPLITS, (cfg.n_train_images, cfg.n_val_images, cfg.n_test_images)
        ):
            for i in range(n_images):
                records, n_lesions = _scan_records(cfg, split, i, out_dir)
                for rec in records:
                    fh.write(rec.model_dump_json() + "\n")
                    counts[split] += 1
                    counts[rec.answer_type] += 1
                counts[f"images_{split}"] += 1
                counts["lesions"] += n_lesions
    os.replace(tmp, out_dir / "data.jsonl")
    counts["images"] = sum(counts[f"images_{sp}"] for sp in SPLITS)
    counts["records"] = sum(counts[sp] for sp in SPLITS)
    return dict(counts)


def _scan_records(
    cfg: DataConfig, split: str, i: int, out_dir: Path
) -> tuple[list[VQARecord], int]:
    """Render scan ``i`` of ``split``, write its image and masks, draw its questions (and maybe
    a report); returns its records and its lesion count. All draws come from the scan's own
    generator, in this order: plan, rendering, questions, report."""
    rng = image_rng(cfg.seed, split, i)
    modality, specs = scan_plan(rng, cfg.seed, split, i, cfg.language_prior)
    image, lesions = render_scan(rng, modality, cfg.image_size, specs)
    stem = f"{split}-{i:05d}"
    image_rel, mask_rel, lesion_models = _write_scan(out_dir, stem, image, lesions)
    p_yes = cfg.language_prior if split == "train" else 0.5
    qas = make_questions(rng, modality, lesions, cfg.questions_per_image, p_yes)
    ids = [f"{stem}-q{k}" for k in range(len(qas))]
    if rng.random() < cfg.report_fraction:
        qas.append(make_report(rng, modality, lesions))
        ids.append(f"{stem}-report")
    records = [
        VQARecord(
            id=rid,
            image=image_rel,
            mask=mask_rel,
            question=qa.question,
            answer=_styled_answer(qa, cfg.sentence_fraction),
            reference=qa.reference,
            answer_type=qa.answer_type,
            question_type=qa.question_type,
            split=split,
            modality=modality,
            dataset="synthlesion",
            lesions=lesion_models,
        )
        for rid, qa in zip(ids, qas)
    ]
    return records, len(lesions)


def _styled_answer(qa: QA, sentence_fraction: float) -> str:
    """The record's answer: the short answer, as a sentence for framed question phrasings."""
    if qa.answer_type != "report" and framed(qa.question, sentence_fraction):
        return sentence_answer(qa.answer)
    return qa.answer


def _write_scan(
    out_dir: Path, stem: str, image: np.ndarray, lesions: list[RenderedLesion]
) -> tuple[str, str | None, list[Lesion]]:
    """Write the scan, each lesion's mask and their union; returns (image path, union mask path
    or None without lesions, the lesion records), paths relative to ``out_dir``."""
    image_rel = f"images/{stem}.png"
    _write_png(out_dir / image_rel, image)
    if not lesions:
        return image_rel, None, []
    union = np.zeros(image.shape, bool)
    lesion_models = []
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
    return image_rel, mask_rel, lesion_models


def load_records(out_dir: Path) -> list[VQARecord]:
    """Read and validate ``out_dir/data.jsonl``."""
    with (Path(out_dir) / "data.jsonl").open(encoding="utf-8") as fh:
        return [VQARecord.model_validate(json.loads(line)) for line in fh if line.strip()]
