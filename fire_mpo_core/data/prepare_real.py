"""Prepare a real dataset (SLAKE, VQA-RAD, IU X-Ray, HF on disk, JSONL) as a stage folder.

    from fire_mpo_core.data.prepare_real import prepare_real_dataset
    counts = prepare_real_dataset(cfg.data, out_dir, on_reject=writer.reject)

The `prepare` stage calls this when `data.dataset` is not `synthlesion`. It reads each split
with :func:`fire_mpo_core.data.loaders.load_dataset_records` (the datasets' own layouts) and
writes the same contract SynthLesion does: `out_dir/data.jsonl` (one :class:`VQARecord` a line,
train, val, test) with image and mask paths relative to `out_dir`, the files under
`out_dir/raw/<their path in the dataset>` (hard links where the filesystem allows, else copies),
so the store is self-contained and its content digest covers the images. A split the dataset
does not have (VQA-RAD has no val) is skipped and counted; a record whose image is missing is a
per-record reject, as in the loaders.

The flow adds :meth:`DataConfig.fingerprint` (sizes and modification times of the dataset's
files) to the `prepare` key, so an edited annotation file gives a new key without hashing
gigabytes of images on every run.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from fire_mpo_core.data.config import DataConfig
from fire_mpo_core.data.io import resolve_in_root
from fire_mpo_core.data.loaders import load_dataset_records
from fire_mpo_core.data.records import VQARecord
from fire_mpo_core.store import DATA, write_jsonl

SPLITS = ("train", "val", "test")
RAW = "raw"


def _place(src: Path, dst: Path) -> None:
    if dst.exists():
        return
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)  # same filesystem: no copy, same bytes
    except OSError:
        shutil.copy2(src, dst)


def prepare_real_dataset(
    cfg: DataConfig, out_dir: Path, on_reject: Callable[[str, str], None] | None = None
) -> dict[str, int]:
    """Load every split of `cfg.path` (kind `cfg.dataset`) into `out_dir` (see module doc).

    Returns counts: records per split, per answer type, `images`, `splits_missing`.
    """
    assert cfg.path is not None and cfg.dataset != "synthlesion"
    out_dir = Path(out_dir)
    # Every split re-reads a shared annotation file (one data.jsonl for all splits): a line
    # that does not parse is the same reject in each pass, and is written once.
    seen: set[tuple[str, str]] = set()

    def reject_once(rid: str, reason: str) -> None:
        if (rid, reason) not in seen and on_reject is not None:
            seen.add((rid, reason))
            on_reject(rid, reason)

    records: list[VQARecord] = []
    counts: dict[str, int] = {"splits_missing": 0, "images": 0}
    for split in SPLITS:
        try:
            ds = load_dataset_records(
                cfg.dataset,
                cfg.path,
                split,
                lang=cfg.lang,
                annotation=cfg.annotation,
                export_dir=out_dir / ".export" / split,
                max_records=cfg.max_records_per_split,
                on_reject=reject_once,
            )
        except (ValueError, FileNotFoundError) as e:
            optional = split == "val" and isinstance(e, FileNotFoundError)
            if optional or "has no" in str(e):
                counts["splits_missing"] += 1  # e.g. VQA-RAD: train and test only
                continue
            raise
        for r in ds.records:
            update = {"image": f"{RAW}/{r.image}"}
            _place(resolve_in_root(ds.root, r.image), out_dir / RAW / r.image)
            if r.mask:
                update["mask"] = f"{RAW}/{r.mask}"
                _place(resolve_in_root(ds.root, r.mask), out_dir / RAW / r.mask)
            records.append(r.model_copy(update=update))
        counts[split] = len(ds.records)
    shutil.rmtree(out_dir / ".export", ignore_errors=True)
    if not records:
        raise ValueError(
            f"data.path {cfg.path}: no usable {cfg.dataset} record in any split "
            "(see rejects.jsonl for why)"
        )
    write_jsonl(out_dir / DATA, records)
    for r in records:
        counts[r.answer_type] = counts.get(r.answer_type, 0) + 1
    counts["images"] = len({r.image for r in records})
    counts["records"] = len(records)
    return counts
