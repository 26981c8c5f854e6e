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

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from fire_mpo_core.corruption import CorruptConfig, CorruptItem
from fire_mpo_core.corruption.batch import CorruptResult, corrupt_to_files, merge_corrupted
from fire_mpo_core.corruption.stage import CorruptInputs, run_corrupt
from fire_mpo_core.store import StageWriter
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


def _sharded(cfg: CorruptConfig):
    """The stage's `corrupt_items`: in this task, or split over `corrupt-shard` tasks."""
    if cfg.shards == 1:
        return corrupt_to_files

    def run(todo: list[CorruptItem], cfg: CorruptConfig, image_dir: Path) -> list[CorruptResult]:
        params = [
            {"index": i, "items": todo[a:b], "config": cfg, "image_dir": image_dir}
            for i, (a, b) in enumerate(shard_bounds(len(todo), cfg.shards))
        ]
        return merge_corrupted(run_shards(corrupt_shard_task, params))

    return run


def body(call: StageCall, w: StageWriter) -> dict:
    cfg = CorruptConfig.model_validate(call.config["corrupt"])
    inputs = CorruptInputs(prepare=call.inputs["prepare"], judge=call.inputs["judge"])
    counts = run_corrupt(inputs, cfg, w.path, w.reject, corrupt_items=_sharded(cfg))
    return counts.as_counts()


corrupt = stage_task(
    "corrupt",
    body,
)
