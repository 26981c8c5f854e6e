"""The `corrupt` stage's contract and its one entry point, :func:`run_corrupt`.

Inputs: the `prepare` folder (images, lesion masks) and the `judge` folder (pairs). Each
distinct (image, mask source) is corrupted once into ``images/<id>.png``; the output holds the
pairs with ``corrupted_image`` set, ``quality.jsonl`` (per-image checks, lesion evidence left in
v') and ``hf_dataset/`` (the pairs in TRL's conversational vision format)::

    from fire_mpo_core.corruption.stage import CorruptInputs, run_corrupt
    counts = run_corrupt(CorruptInputs(prepare=..., judge=...), CorruptConfig(), out_dir,
                         reject=lambda id, reason: print(id, reason))

The Prefect task (`tasks/corrupt.py`) only resolves the folders, passes its sharded runner as
``corrupt_items`` and publishes the counts.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from fire_mpo_core.corruption.batch import CorruptItem, CorruptResult, corrupt_to_files
from fire_mpo_core.corruption.config import CorruptConfig
from fire_mpo_core.corruption.segmenter import prompt_from_qa
from fire_mpo_core.data.export import export_hf_dataset
from fire_mpo_core.data.io import resolve_in_root
from fire_mpo_core.data.records import PreferencePair
from fire_mpo_core.store import DATA, read_jsonl, write_jsonl

Reject = Callable[[str, str], None]
CorruptItems = Callable[[list[CorruptItem], CorruptConfig, Path], Sequence[CorruptResult]]


class CorruptInputs(BaseModel):
    """The folders the stage reads."""

    model_config = ConfigDict(frozen=True)

    prepare: Path = Field(description="The dataset root: the pairs' image and mask paths.")
    judge: Path = Field(description="The judge stage folder: its data.jsonl of pairs.")


class CorruptCounts(BaseModel):
    """What the stage reports (manifest counts, dashboard table)."""

    pairs: int = Field(description="Pairs written with their v'.")
    images: int = Field(description="Distinct images corrupted.")
    lesion_images: int = Field(description="Corrupted images with a lesion to remove.")
    evidence_removed: int = Field(description="Lesion images whose v' no longer shows it.")
    evidence_removed_share: float | None = Field(description="evidence_removed / lesion_images.")
    paths: dict[str, int] = Field(
        description="Images per fallback path taken (corrupt_for_record)."
    )

    def as_counts(self) -> dict[str, int | float | None]:
        flat = self.model_dump(exclude={"paths"})
        return {**flat, **{f"path_{k}": v for k, v in sorted(self.paths.items())}}


def _item_id(image: str, source: str | None) -> str:
    return hashlib.sha256(f"{image}\0{source}".encode()).hexdigest()[:16]


def plan_items(
    pairs: list[PreferencePair], root: Path, reject: Reject
) -> tuple[list[CorruptItem], dict[str, str]]:
    """Distinct (image, mask source) items to corrupt, and pair id -> item id. Dataset masks
    are per image; without one the segmentation prompt depends on the pair's QA."""
    items: dict[str, CorruptItem] = {}
    pair_item: dict[str, str] = {}
    for p in pairs:
        try:
            image = resolve_in_root(root, p.image)
            mask = resolve_in_root(root, p.mask) if p.mask else None
        except ValueError as e:
            reject(p.id, str(e))
            continue
        prompt = None if mask else prompt_from_qa(p.question, p.chosen)
        iid = _item_id(p.image, p.mask or prompt)
        items.setdefault(iid, CorruptItem(id=iid, image=image, mask=mask, prompt=prompt))
        pair_item[p.id] = iid
    return list(items.values()), pair_item


def write_quality(
    results: Sequence[CorruptResult], path: Path, reject: Reject
) -> tuple[set[str], Counter[str], Counter[str]]:
    """``quality.jsonl`` rows of the corrupted images; returns (ids corrupted, images per
    fallback path, lesion images by evidence removed / kept)."""
    ok: set[str] = set()
    paths: Counter[str] = Counter()
    evidence: Counter[str] = Counter()
    with path.open("w") as q:
        for res in results:
            if res.error is not None:
                reject(res.id, f"corruption failed: {res.error}")
                continue
            q.write(json.dumps({"id": res.id, **res.info}, sort_keys=True, default=str) + "\n")
            paths[str(res.info.get("path", "unknown"))] += 1
            removed = (res.info.get("quality") or {}).get("evidence_removed")
            if removed is not None:
                evidence["removed" if removed else "kept"] += 1
            ok.add(res.id)
    return ok, paths, evidence


def run_corrupt(
    inputs: CorruptInputs,
    cfg: CorruptConfig,
    out_dir: Path,
    reject: Reject,
    corrupt_items: CorruptItems = corrupt_to_files,
) -> CorruptCounts:
    """Corrupt every pair's image into ``out_dir`` (see the module docstring).
    ``corrupt_items(items, cfg, image_dir)`` does the work: in one process by default, or the
    caller's sharded runner; either way the results come back in item order."""
    pairs = list(read_jsonl(inputs.judge / DATA, PreferencePair, reject))
    todo, pair_item = plan_items(pairs, inputs.prepare, reject)
    image_dir = out_dir / "images"
    image_dir.mkdir()
    results = corrupt_items(todo, cfg, image_dir)
    ok, paths, evidence = write_quality(results, out_dir / "quality.jsonl", reject)
    out = []
    for p in pairs:
        iid = pair_item.get(p.id)
        if iid is None:
            continue
        if iid not in ok:
            reject(p.id, f"its image {p.image} could not be corrupted")
            continue
        out.append(p.model_copy(update={"corrupted_image": f"images/{iid}.png"}))
    write_jsonl(out_dir / DATA, out)
    export_hf_dataset(out, inputs.prepare, out_dir / "hf_dataset", corrupt_root=out_dir)
    lesion_images = evidence["removed"] + evidence["kept"]
    return CorruptCounts(
        pairs=len(out),
        images=len(ok),
        lesion_images=lesion_images,
        evidence_removed=evidence["removed"],
        evidence_removed_share=round(evidence["removed"] / lesion_images, 4)
        if lesion_images
        else None,
        paths=dict(paths),
    )
