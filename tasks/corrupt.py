"""Stage `corrupt`: lesion-corrupted images v' for the visual-contrastive term.

Inputs `prepare` (images, lesion masks) and `judge` (pairs). Each distinct (image, mask source)
is corrupted once, deterministically, into `images/<id>.png`; output `data.jsonl` holds the pairs
with `corrupted_image` set (relative to this folder), `quality.jsonl` the per-image checks
(changed fraction inside / outside the mask, SSIM inside, and the lesion evidence that
remains in v': `evidence_remaining`, `evidence_removed`), and `hf_dataset/` the pairs in TRL's
conversational vision format (`trl.DPOTrainer` trains on it as it is) plus our span columns.

With `corrupt.shards: N > 1` the distinct images are split into N contiguous shards corrupted by
parallel `corrupt-shard` tasks (:mod:`tasks.shards`: threads, or Dask workers that share the
store's filesystem), each writing its PNGs into `images/`; results merge in shard order and the
output is byte-identical to the unsharded run.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from fire_mpo_core.corruption import CorruptConfig, CorruptItem, prompt_from_qa
from fire_mpo_core.corruption.batch import CorruptResult, corrupt_to_files, merge_corrupted
from fire_mpo_core.data.export import export_hf_dataset
from fire_mpo_core.data.io import resolve_in_root
from fire_mpo_core.data.records import PreferencePair
from fire_mpo_core.store import DATA, StageWriter, read_jsonl, write_jsonl
from tasks.common import StageCall, stage_task
from tasks.shards import run_shards, shard_bounds


@task(
    name="corrupt-shard",
    task_run_name="corrupt-shard-{index}",
    cache_policy=NO_CACHE,  # the stage folder is the cache; a retry rewrites the same PNGs
    persist_result=False,
    retries=1,
)
def corrupt_shard_task(
    index: int, items: list[CorruptItem], config: CorruptConfig, image_dir: Path
) -> list[CorruptResult]:
    """One shard of the corrupt stage (``index`` only names the task run)."""
    return corrupt_to_files(items, config, image_dir)


def _item_id(image: str, source: str | None) -> str:
    return hashlib.sha256(f"{image}\0{source}".encode()).hexdigest()[:16]


def body(call: StageCall, w: StageWriter) -> dict:
    cfg = CorruptConfig.model_validate(call.config["corrupt"])
    root = call.inputs["prepare"]
    pairs = list(read_jsonl(call.inputs["judge"] / DATA, PreferencePair, w.reject))
    items: dict[str, CorruptItem] = {}
    pair_item: dict[str, str] = {}
    for p in pairs:
        try:
            image = resolve_in_root(root, p.image)
            mask = resolve_in_root(root, p.mask) if p.mask else None
        except ValueError as e:
            w.reject(p.id, str(e))
            continue
        # Dataset masks are per image; without one the segmentation prompt depends on the QA.
        prompt = None if mask else prompt_from_qa(p.question, p.chosen)
        iid = _item_id(p.image, p.mask or prompt)
        items.setdefault(iid, CorruptItem(id=iid, image=image, mask=mask, prompt=prompt))
        pair_item[p.id] = iid
    image_dir = w.path / "images"
    image_dir.mkdir()
    todo = list(items.values())
    if cfg.shards > 1:
        params = [
            {"index": i, "items": todo[a:b], "config": cfg, "image_dir": image_dir}
            for i, (a, b) in enumerate(shard_bounds(len(todo), cfg.shards))
        ]
        results = merge_corrupted(run_shards(corrupt_shard_task, params))
    else:
        results = corrupt_to_files(todo, cfg, image_dir)
    ok: set[str] = set()
    paths: Counter[str] = Counter()
    evidence: Counter[str] = Counter()
    with (w.path / "quality.jsonl").open("w") as q:
        for res in results:
            if res.error is not None:
                w.reject(res.id, f"corruption failed: {res.error}")
                continue
            q.write(json.dumps({"id": res.id, **res.info}, sort_keys=True, default=str) + "\n")
            paths[str(res.info.get("path", "unknown"))] += 1
            removed = (res.info.get("quality") or {}).get("evidence_removed")
            if removed is not None:
                evidence["removed" if removed else "kept"] += 1
            ok.add(res.id)
    out = []
    for p in pairs:
        iid = pair_item.get(p.id)
        if iid is None:
            continue
        if iid not in ok:
            w.reject(p.id, f"its image {p.image} could not be corrupted")
            continue
        out.append(p.model_copy(update={"corrupted_image": f"images/{iid}.png"}))
    write_jsonl(w.path / DATA, out)
    export_hf_dataset(out, root, w.path / "hf_dataset", corrupt_root=w.path)
    lesion_images = evidence["removed"] + evidence["kept"]
    return {
        "pairs": len(out),
        "images": len(ok),
        # Lesion images whose v' no longer shows the lesion (quality.jsonl: evidence_removed).
        "lesion_images": lesion_images,
        "evidence_removed": evidence["removed"],
        "evidence_removed_share": round(evidence["removed"] / lesion_images, 4)
        if lesion_images
        else None,
        **{f"path_{k}": v for k, v in sorted(paths.items())},
    }


corrupt = stage_task(
    "corrupt",
    body,
)
