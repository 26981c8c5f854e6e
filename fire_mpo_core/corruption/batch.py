"""The corrupt stage's library half: the paper's mask fallbacks per record, and a parallel batch.

Per record (docs/design.md section 1, "Corruption in the paper"), :func:`corrupt_for_record`
picks the region to corrupt in this order and records the path it took in ``info["path"]``:

==================  ======================================================  ====================
path                when                                                    what is applied
==================  ======================================================  ====================
``whole_config``    ``cfg.region == "whole"`` (the whole-image ablation)    `cfg.kind`, no mask
``dataset_mask``    the record has a non-empty lesion mask                  `cfg.kind` in it
``no_prompt``       no mask and no prompt                                   noise, `sigma_whole`
``segmenter``       no mask; the segmenter finds the prompt's region        `cfg.kind` in it
``not_found``       no mask; prompt given but the segmenter finds nothing   noise, `sigma_whole`
``no_segmenter``    no mask; prompt given but `cfg.segmenter` is None       noise, `sigma_whole`
==================  ======================================================  ====================

Noise inside a mask uses `sigma_mask` (45); the whole-image fallbacks use `sigma_whole` (12, the
value the paper gives for "prompt but nothing found"; docs/design.md gives no other value for "no
prompt", so it is the contract's whole-image sigma too). Report records are corrupted with
whole-image noise in the paper: the stage passes them with mask None and prompt None. A mask
without a True pixel counts as no mask (the prompt rules then apply), with
``info["empty_mask"] = True``.

Batch::

    from fire_mpo_core.corruption.batch import CorruptConfig, CorruptItem, corrupt_many
    cfg = CorruptConfig(kind="noise", num_workers=2, seed=0)
    items = [CorruptItem(id=r.id, image=path, mask=mask_path, prompt=p) for ...]
    for res in corrupt_many(items, cfg):       # CorruptResult, in input order
        res.image, res.info, res.error          # error: None, or why this record failed

Sharded stage (``cfg.shards``): :func:`corrupt_to_files` corrupts one contiguous shard of items
and writes each image as ``<image_dir>/<id>.png`` (results keep `info` and `error`, not the
array); :func:`merge_corrupted` concatenates the shards' results in shard order, i.e. input
order. The unsharded stage is the one-shard case, so both write the same bytes::

    parts = [corrupt_to_files(items[a:b], cfg, out / "images") for a, b in bounds]  # parallel
    results = merge_corrupted(parts)

Each record's seed is derived from `cfg.seed` and its id with BLAKE2b (:func:`derive_seed`), never
Python's salted `hash()`, so a record gets the same corruption whatever the worker count, chunk
size or order. A failing record (unreadable file, mask of the wrong size, over `max_pixels`)
becomes a result with `error` set; the others go on.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
from PIL import Image

from fire_mpo_core.corruption.config import CorruptConfig
from fire_mpo_core.corruption.masks import mask_from_source
from fire_mpo_core.corruption.ops import (
    corrupt,
    dilate_mask,
    validate_image,
    validate_mask,
)
from fire_mpo_core.corruption.quality import corruption_quality
from fire_mpo_core.corruption.segmenter import Segmenter, get_segmenter

Path_ = Literal[
    "whole_config", "dataset_mask", "no_prompt", "segmenter", "not_found", "no_segmenter"
]


def derive_seed(base_seed: int, record_id: str) -> int:
    """Stable 63-bit seed of a record: BLAKE2b-64 of '<base_seed>:<record_id>'."""
    digest = hashlib.blake2b(f"{int(base_seed)}:{record_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def load_image(path: str | Path) -> np.ndarray:
    """uint8 HxW for grey files (L, 1, I;16 rescaled), HxWx3 for colour ones (alpha dropped)."""
    with Image.open(path) as im:
        if im.mode in ("L", "RGB"):
            return np.asarray(im).copy()
        if im.mode in ("1", "P", "LA"):
            im2 = im.convert("RGB") if im.mode == "P" else im.convert("L")
            return np.asarray(im2).copy()
        if im.mode.startswith("I") or im.mode == "F":
            a = np.asarray(im).astype(np.float64)
            lo, hi = float(a.min()), float(a.max())
            scaled = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
            return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
        return np.asarray(im.convert("RGB")).copy()


def _noise_params(cfg: CorruptConfig, whole: bool) -> dict[str, Any]:
    return {"sigma": cfg.sigma_whole if whole else cfg.sigma_mask}


def corrupt_for_record(
    image: np.ndarray,
    mask: np.ndarray | None,
    prompt: str | None,
    segmenter: Segmenter | None,
    cfg: CorruptConfig,
    *,
    record_id: str | None = None,
    seed: int | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Corrupt one record's image with the paper's mask fallbacks (table in the module docstring).

    Args:
        image: uint8 HxW or HxWx3.
        mask: bool HxW dataset lesion mask, or None.
        prompt: segmentation prompt (e.g. from `prompt_from_qa`), or None.
        segmenter: used only when there is no mask and a prompt; None = no segmentation.
        cfg: the stage config.
        record_id: derives the seed as `derive_seed(cfg.seed, record_id)` when `seed` is None.
        seed: explicit seed (wins over record_id); default `cfg.seed`.

    Returns:
        (corrupted uint8 image of the input's shape, info) with info keys `path`, `kind`,
        `sigma` (noise only), `seed`, `mask_pixels`, `mask_fraction`, `prompt`, `empty_mask`,
        and `quality` (a dict of CorruptionQuality) when `cfg.quality`.
    """
    image = validate_image(image)
    h, w = image.shape[:2]
    if h * w > cfg.max_pixels:
        raise ValueError(f"image has {h}x{w} = {h * w} pixels, over max_pixels {cfg.max_pixels}")
    if seed is None:
        seed = derive_seed(cfg.seed, record_id) if record_id is not None else cfg.seed
    prompt = prompt.strip() if isinstance(prompt, str) and prompt.strip() else None
    info: dict[str, Any] = {"seed": int(seed), "prompt": prompt, "empty_mask": False}

    path, region, found = _choose_region(image, mask, prompt, segmenter, cfg, info)
    kind, params = _kind_and_params(cfg, path, region)
    out = corrupt(image, region, kind, int(seed), **params)

    n = int(np.count_nonzero(region)) if region is not None else h * w
    info.update(
        path=path,
        kind=kind,
        mask_pixels=n,
        mask_fraction=n / (h * w),
    )
    if kind == "noise":
        info["sigma"] = float(params["sigma"])
    if cfg.quality:
        # Evidence numbers need the lesion's own mask: the dataset's (or the segmenter's).
        lesion = None
        if path == "dataset_mask":
            lesion = validate_mask(mask, image.shape)
        elif path == "segmenter":
            lesion = found.astype(bool)
        info["quality"] = corruption_quality(image, out, region, lesion).model_dump()
    return out, info


def _choose_region(
    image: np.ndarray,
    mask: np.ndarray | None,
    prompt: str | None,
    segmenter: Segmenter | None,
    cfg: CorruptConfig,
    info: dict[str, Any],
) -> tuple[Path_, np.ndarray | None, np.ndarray | None]:
    """The fallback path, its dilated region (None: whole image) and the segmenter's raw mask
    (None unless it ran). Sets ``info["empty_mask"]`` for a mask without a True pixel."""
    if cfg.region == "whole":
        return "whole_config", None, None
    h, w = image.shape[:2]
    if validate_mask(mask, image.shape) is not None:
        region = dilate_mask(mask, cfg.dilate_px) if np.count_nonzero(mask) else None
        info["empty_mask"] = region is None
        if region is not None:
            return "dataset_mask", region, None
    if prompt is None:
        return "no_prompt", None, None
    if segmenter is None:
        return "no_segmenter", None, None
    found = segmenter.segment(image, prompt)
    if found is not None and found.shape != (h, w):
        raise ValueError(f"segmenter returned shape {found.shape} for image {(h, w)}")
    if found is not None and np.count_nonzero(found):
        return "segmenter", dilate_mask(found.astype(bool), cfg.dilate_px), found
    return "not_found", None, found


def _kind_and_params(
    cfg: CorruptConfig, path: Path_, region: np.ndarray | None
) -> tuple[str, dict[str, Any]]:
    """What to apply on ``path``: ``cfg.kind`` on a region, else the whole-image noise fallback."""
    if path in ("dataset_mask", "segmenter", "whole_config"):
        params: dict[str, Any] = dict(cfg.params)
        if cfg.kind == "noise":
            params.update(_noise_params(cfg, whole=region is None))
        return cfg.kind, params
    # The paper's fallbacks: whole-image noise at the whole-image sigma.
    return "noise", _noise_params(cfg, whole=True)


@dataclass
class CorruptItem:
    """One record to corrupt: an image (array or file path), a mask source and a prompt.

    `mask` may be None, a bool/uint8 array, a mask file path, a COCO RLE dict or a box
    [x0, y0, x1, y1] (see `masks.mask_from_source`).
    """

    id: str
    image: np.ndarray | str | Path
    mask: Any = None
    prompt: str | None = None


@dataclass
class CorruptResult:
    """The outcome for one item: the image (None on error), the info dict, the error message."""

    id: str
    image: np.ndarray | None
    info: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


# Segmenters are built once per process (threads share them), by name, so that a GPU model is
# loaded once per worker and nothing unpicklable crosses process boundaries.
_SEGMENTER_CACHE: dict[tuple[str, str], Segmenter] = {}


def _segmenter_for(cfg: CorruptConfig) -> Segmenter | None:
    if cfg.segmenter is None or cfg.region == "whole":
        return None
    key = (cfg.segmenter, repr(sorted(cfg.segmenter_options.items())))
    if key not in _SEGMENTER_CACHE:
        _SEGMENTER_CACHE[key] = get_segmenter(cfg.segmenter, **cfg.segmenter_options)
    return _SEGMENTER_CACHE[key]


def _one(item: CorruptItem, cfg: CorruptConfig) -> CorruptResult:
    try:
        image = item.image
        if isinstance(image, str | Path):
            image = load_image(image)
        image = validate_image(image)
        mask = mask_from_source(item.mask, image.shape, resize=cfg.resize_masks)
        out, info = corrupt_for_record(
            image, mask, item.prompt, _segmenter_for(cfg), cfg, record_id=item.id
        )
        return CorruptResult(id=item.id, image=out, info=info)
    except (OSError, ValueError, TypeError) as err:
        return CorruptResult(id=item.id, image=None, error=f"{type(err).__name__}: {err}")


def _run_chunk(chunk: list[CorruptItem], cfg: CorruptConfig) -> list[CorruptResult]:
    return [_one(it, cfg) for it in chunk]


def _worker_init() -> None:
    # One OpenCV thread per worker process: the pool already fills the cores.
    cv2.setNumThreads(1)


def _chunks(items: Iterable[CorruptItem | dict], size: int) -> Iterator[list[CorruptItem]]:
    chunk: list[CorruptItem] = []
    for it in items:
        chunk.append(it if isinstance(it, CorruptItem) else CorruptItem(**it))
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _executor(cfg: CorruptConfig) -> Executor:
    if cfg.pool == "thread":
        # No initializer: OpenCV's thread count is per process, and this process is the caller's.
        return ThreadPoolExecutor(cfg.num_workers)
    ctx = mp.get_context(cfg.start_method)
    return ProcessPoolExecutor(cfg.num_workers, mp_context=ctx, initializer=_worker_init)


def iter_corrupt(
    items: Iterable[CorruptItem | dict],
    cfg: CorruptConfig,
    executor: Executor | None = None,
) -> Iterator[CorruptResult]:
    """Corrupt `items` (CorruptItem or dicts of its fields), yielding results in input order.

    Runs in the calling thread when `cfg.num_workers` is 0, else on a pool of `cfg.pool` kind
    made for this call, or on `executor` when given (left running, so one pool can serve many
    calls). At most 2 * num_workers chunks are in flight, so memory stays bounded.
    """
    if cfg.segmenter is not None and cfg.region == "lesion":
        get_segmenter(cfg.segmenter, **cfg.segmenter_options)  # fail early on a bad name
    if cfg.num_workers == 0 and executor is None:
        for chunk in _chunks(items, cfg.chunk_size):
            yield from _run_chunk(chunk, cfg)
        return
    if executor is not None:
        yield from _ordered(executor, items, cfg, max(1, cfg.num_workers))
        return
    with _executor(cfg) as ex:
        yield from _ordered(ex, items, cfg, cfg.num_workers)


def _ordered(
    ex: Executor, items: Iterable[CorruptItem | dict], cfg: CorruptConfig, workers: int
) -> Iterator[CorruptResult]:
    pending: deque[Future[list[CorruptResult]]] = deque()
    for chunk in _chunks(items, cfg.chunk_size):
        pending.append(ex.submit(_run_chunk, chunk, cfg))
        if len(pending) >= 2 * workers:
            yield from pending.popleft().result()
    while pending:
        yield from pending.popleft().result()


def make_executor(cfg: CorruptConfig) -> Executor:
    """A pool as `iter_corrupt` would make it (cfg.pool, cfg.num_workers >= 1), to reuse."""
    if cfg.num_workers < 1:
        raise ValueError("make_executor needs cfg.num_workers >= 1")
    return _executor(cfg)


def corrupt_many(
    items: Sequence[CorruptItem | dict] | Iterable[CorruptItem | dict],
    cfg: CorruptConfig,
    executor: Executor | None = None,
) -> list[CorruptResult]:
    """All results of :func:`iter_corrupt` as a list, in input order."""
    return list(iter_corrupt(items, cfg, executor))


def corrupt_to_files(
    items: Sequence[CorruptItem | dict], cfg: CorruptConfig, image_dir: str | Path
) -> list[CorruptResult]:
    """Corrupt one shard of `items` and write each success as ``image_dir/<id>.png``.

    Returns the results in input order with ``image`` set to None (the pixels are on disk, so
    a shard's return value stays small when it crosses a process or machine boundary); a
    failed record keeps its `error` and writes nothing. PNG encoding is lossless and
    deterministic, so the file bytes depend only on the record and `cfg`.
    """
    image_dir = Path(image_dir)
    image_dir.mkdir(parents=True, exist_ok=True)
    out = []
    for res in iter_corrupt(items, cfg):
        if res.error is None:
            image = res.image
            bgr = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
            if not cv2.imwrite(str(image_dir / f"{res.id}.png"), bgr):
                res = CorruptResult(id=res.id, image=None, error=f"could not write {res.id}.png")
        out.append(CorruptResult(id=res.id, image=None, info=res.info, error=res.error))
    return out


def merge_corrupted(parts: Iterable[Sequence[CorruptResult]]) -> list[CorruptResult]:
    """Concatenate shard results in shard order: with contiguous shards, input order."""
    return [res for part in parts for res in part]
