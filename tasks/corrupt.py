"""Stage `corrupt`: lesion-corrupted images v' for the visual-contrastive term.

Inputs `prepare` (images, lesion masks) and `judge` (pairs). Each distinct (image, mask source)
is corrupted once, deterministically, into `images/<id>.png`; output `data.jsonl` holds the pairs
with `corrupted_image` set (relative to this folder), `quality.jsonl` the per-image checks
(changed fraction inside / outside the mask, SSIM inside), and `hf_dataset/` the pairs in TRL's
vision preference columns plus our span columns.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import cv2

from fire_mpo_core.corruption import CorruptConfig, CorruptItem, iter_corrupt, prompt_from_qa
from fire_mpo_core.data.io import resolve_in_root
from fire_mpo_core.data.records import PreferencePair
from fire_mpo_core.judge.export import export_hf_dataset
from fire_mpo_core.store import DATA, StageWriter, read_jsonl, write_jsonl
from tasks.common import StageCall, stage_task


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
    (w.path / "images").mkdir()
    ok: set[str] = set()
    paths: Counter[str] = Counter()
    with (w.path / "quality.jsonl").open("w") as q:
        for res in iter_corrupt(list(items.values()), cfg):
            if res.error is not None:
                w.reject(res.id, f"corruption failed: {res.error}")
                continue
            cv2.imwrite(str(w.path / "images" / f"{res.id}.png"), _bgr(res.image))
            q.write(json.dumps({"id": res.id, **res.info}, sort_keys=True, default=str) + "\n")
            paths[str(res.info.get("path", "unknown"))] += 1
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
    return {
        "pairs": len(out),
        "images": len(ok),
        **{f"path_{k}": v for k, v in sorted(paths.items())},
    }


def _bgr(image):
    return image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2BGR)


corrupt = stage_task(
    "corrupt",
    body,
    ["tasks.corrupt", "fire_mpo_core.corruption", "fire_mpo_core.judge.export"],
)
