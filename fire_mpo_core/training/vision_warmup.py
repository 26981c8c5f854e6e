"""Vision warm start: dense pretraining of a tiny model's vision tower and projector.

Why: a real LVLM starts from a pretrained vision encoder; the embedded default's tiny model starts
from random weights, and text-only SFT never teaches it the lesions (measured: the SFT base said
"yes" to every presence question, also on blank images). This step stands in for the pretrained
encoder. It trains the vision tower + projector, through small linear heads that are thrown away
afterwards, on what SynthLesion knows exactly about every image:

* per image token: the share of its patch covered by a lesion (soft-target BCE) and the lesion's
  polarity (hyper- vs hypodense, BCE on covered tokens only);
* per image token: its own quadrant of the image (cross-entropy), so each token's features say
  where it is and the decoder can answer "is there a lesion in the upper left?" from them;
* per image: the modality (cross-entropy on the mean-pooled tokens), so the global features that
  the modality questions need are kept, and the lesion count 0 / 1 / 2 (cross-entropy on the
  mean- and max-pooled tokens).

Horizontal and vertical flips of the image (with its masks) are used as augmentation: every
target is a per-token map or an image-level class, so a flip is label-preserving. The decoder is
untouched; SFT then teaches it to read the features.

It needs the dataset's masks, so it runs on SynthLesion (``record.lesions``); for a real
checkpoint it is off (``SFTConfig.vision_warmup.enabled: auto``). Run it through the SFT stage, or
directly::

    from fire_mpo_core.training.vision_warmup import warm_up_vision
    stats = warm_up_vision(model, processor, records, image_root, VisionWarmupConfig())
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from fire_mpo_core.corruption.masks import load_mask
from fire_mpo_core.data.io import open_image, resolve_in_root
from fire_mpo_core.data.records import VQARecord
from fire_mpo_core.data.synthlesion import pretrain_scan
from fire_mpo_core.training.config import VisionWarmupConfig

_MODALITIES = ("ct", "mri", "x-ray")


@dataclass
class _Scan:
    """One training image with its dense targets at full resolution."""

    image: np.ndarray  # uint8 HxWx3
    cover: np.ndarray  # float32 HxW in {0, 1}: union lesion mask
    polarity: np.ndarray  # float32 HxW: 1 hyperdense, 0 hypodense, 0.5 outside lesions
    modality: int
    count: int


def _scan(rgb: np.ndarray, lesions: list[tuple[np.ndarray, str]], modality: str) -> _Scan:
    """A scan from its RGB image and (bool mask, intensity) per lesion."""
    cover = np.zeros(rgb.shape[:2], np.float32)
    pol = np.full(rgb.shape[:2], 0.5, np.float32)
    for mask, intensity in lesions:
        cover[mask] = 1.0
        pol[mask] = 1.0 if intensity == "hyperdense" else 0.0
    return _Scan(rgb, cover, pol, _MODALITIES.index(modality), len(lesions))


def _load_scans(records: list[VQARecord], image_root: Path) -> list[_Scan]:
    """One scan per distinct image of a SynthLesion modality (lesion-free scans included)."""
    scans: dict[str, _Scan] = {}
    for r in records:
        if r.image in scans or r.modality not in _MODALITIES:
            continue
        img = np.asarray(open_image(image_root, r.image).convert("RGB"))
        lesions = [
            (load_mask(resolve_in_root(image_root, le.mask)), le.intensity) for le in r.lesions
        ]
        scans[r.image] = _scan(img, lesions, r.modality)
    return list(scans.values())


def _pretrain_pool(seed: int, n: int, size: int) -> list[_Scan]:
    """``n`` generated scans that belong to no split (SynthLesion's ``pretrain`` seed stream)."""
    out = []
    for i in range(n):
        modality, img, lesions = pretrain_scan(seed, i, size)
        rgb = np.repeat(img[..., None], 3, axis=-1)
        out.append(_scan(rgb, [(le.mask, le.intensity) for le in lesions], modality))
    return out


def feature_grid(model, image_inputs: dict[str, Tensor]) -> tuple[list[Tensor], tuple[int, int]]:
    """Projected image features the decoder sees, per image ``[gh * gw, D]`` row-major, and the
    token grid ``(gh, gw)`` (square images of one size: one grid for the batch)."""
    cfg = model.config
    if "image_grid_thw" in image_inputs:  # Qwen2-VL family: 2x2 merged patches
        out = model.model.get_image_features(**image_inputs)
        feats = list(out.pooler_output if hasattr(out, "pooler_output") else out)
        _, h, w = (int(x) for x in image_inputs["image_grid_thw"][0])
        merge = int(cfg.vision_config.spatial_merge_size)
        return feats, (h // merge, w // merge)
    out = model.model.get_image_features(
        pixel_values=image_inputs["pixel_values"],
        vision_feature_layer=cfg.vision_feature_layer,
        vision_feature_select_strategy=cfg.vision_feature_select_strategy,
    )
    feats = list(out.pooler_output)
    side = math.isqrt(feats[0].shape[0])
    if side * side != feats[0].shape[0]:
        raise ValueError(f"{feats[0].shape[0]} image tokens do not form a square grid")
    return feats, (side, side)


def vision_parameters(model) -> list[nn.Parameter]:
    """The vision tower's and the projector's parameters (what the warm start trains)."""
    inner = model.model
    parts = []
    for name in ("vision_tower", "visual", "multi_modal_projector"):
        if hasattr(inner, name):
            parts.append(getattr(inner, name))
    if not parts:
        raise ValueError(f"{type(model).__name__} has no recognisable vision tower")
    return [p for part in parts for p in part.parameters()]


class _Heads(nn.Module):
    """Throw-away readout heads: per token (coverage, polarity logits); per image (modality,
    count logits from mean- and max-pooled tokens)."""

    def __init__(self, dim: int):
        super().__init__()
        self.token = nn.Linear(dim, 2)
        self.quadrant = nn.Linear(dim, 4)
        self.modality = nn.Linear(dim, len(_MODALITIES))
        self.count = nn.Linear(2 * dim, 3)

    def forward(self, feats: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        pooled = torch.cat([feats.mean(1), feats.amax(1)], -1)
        return (
            self.token(feats),
            self.modality(feats.mean(1)),
            self.count(pooled),
            self.quadrant(feats),
        )


def token_quadrants(grid: tuple[int, int]) -> Tensor:
    """[gh * gw] quadrant index of each token (0 upper-left, 1 upper-right, 2 lower-left,
    3 lower-right of the image), so each token's features carry where it is."""
    gh, gw = grid
    rows = (torch.arange(gh) >= gh / 2).long()
    cols = (torch.arange(gw) >= gw / 2).long()
    return (2 * rows[:, None] + cols[None, :]).reshape(-1)


def _targets(scan: _Scan, grid: tuple[int, int], flip: tuple[bool, bool]):
    img, cov, pol = scan.image, scan.cover, scan.polarity
    if flip[0]:
        img, cov, pol = img[:, ::-1], cov[:, ::-1], pol[:, ::-1]
    if flip[1]:
        img, cov, pol = img[::-1], cov[::-1], pol[::-1]
    gh, gw = grid
    # Token coverage = mean mask over the token's patch; polarity = mean over covered pixels.
    tok_cov = cv2.resize(np.ascontiguousarray(cov), (gw, gh), interpolation=cv2.INTER_AREA)
    hyper = cv2.resize(
        np.ascontiguousarray(cov * (pol == 1.0)), (gw, gh), interpolation=cv2.INTER_AREA
    )
    tok_pol = np.where(tok_cov > 0, hyper / np.maximum(tok_cov, 1e-6), 0.5)
    return Image.fromarray(np.ascontiguousarray(img)), tok_cov.reshape(-1), tok_pol.reshape(-1)


def _presence_auc(scores: list[float], labels: list[int]) -> float | None:
    """Rank AUC of per-image max token coverage against lesion presence."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def warm_up_vision(
    model,
    processor,
    records: list[VQARecord],
    image_root: Path,
    cfg: VisionWarmupConfig,
    log_path: Path | None = None,
    holdout: list[VQARecord] | None = None,
) -> dict[str, Any]:
    """Train the vision tower + projector of ``model`` in place on dense SynthLesion targets.

    Args:
        model: a LLaVA- or Qwen2-VL-style ``...ForConditionalGeneration`` (train mode is set).
        processor: its processor (the image processor is used).
        records: train records; one scan per distinct image (their ``lesions`` give the masks).
        image_root: the dataset root the record paths are relative to.
        cfg: steps, batch size, learning rate, pool size, loss weights and seed.
        log_path: optional JSONL of (step, loss parts).
        holdout: optional records (e.g. val) on which presence AUC and modality / count accuracy
            of the heads are reported at the end.

    Returns:
        summary: steps, scans, final loss parts, seconds and (with ``holdout``) readout quality.
    """
    # Setup. The draw order (flip generator, data RNG, head init after the torch seed, the grid
    # probe) is part of the result: a seed gives bit-identical weights.
    scans = _load_scans(records, image_root)
    if not scans:
        raise ValueError("vision warm-up found no scans with a SynthLesion modality")
    if cfg.pretrain_scans:
        size = scans[0].image.shape[0]
        scans += _pretrain_pool(cfg.seed, cfg.pretrain_scans, size)
    gen = torch.Generator().manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    params = vision_parameters(model)
    heads, opt, sched = _heads_and_optimizer(model, params, cfg)
    model.train()
    ip = processor.image_processor
    with torch.no_grad():
        _, grid = feature_grid(
            model, dict(ip(images=[Image.fromarray(scans[0].image)], return_tensors="pt"))
        )
    positions = token_quadrants(grid)  # the same grid every step

    # The loop.
    t0 = time.perf_counter()
    order: list[int] = []
    parts_log: list[dict[str, float]] = []
    log = log_path.open("w") if log_path else None
    try:
        for step in range(cfg.steps):
            idx, order = _next_indices(order, len(scans), cfg.batch_size, rng)
            flips = torch.randint(0, 2, (len(idx), 2), generator=gen).tolist()
            batch = [_targets(scans[i], grid, (fl[0], fl[1])) for i, fl in zip(idx, flips)]
            inputs = dict(ip(images=[b[0] for b in batch], return_tensors="pt"))
            feats, _ = feature_grid(model, inputs)
            loss, terms = _losses(heads, feats, batch, [scans[i] for i in idx], positions, cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([*params, *heads.parameters()], 1.0)
            opt.step()
            sched.step()
            parts = {"step": step + 1, "loss": round(loss.item(), 5)}
            parts.update({k: round(v.item(), 5) for k, v in terms.items()})
            parts_log.append(parts)
            if log:
                log.write(json.dumps(parts) + "\n")
    finally:
        if log:
            log.close()

    # Summary (the heads are thrown away; the vision side was trained in place).
    summary = _summary(cfg, len(scans), time.perf_counter() - t0, parts_log)
    if holdout:
        summary.update(readout_quality(model, processor, heads, holdout, image_root))
    return summary


#: The logged loss terms, in log order.
_LOSS_TERMS = ("coverage", "polarity", "modality", "count", "position")


def _summary(
    cfg: VisionWarmupConfig, n_scans: int, seconds: float, parts_log: list[dict[str, float]]
) -> dict[str, Any]:
    """Steps, scans, seconds and each loss part averaged over the last tenth of the steps."""
    tail = parts_log[-max(1, len(parts_log) // 10) :]
    return {
        "steps": cfg.steps,
        "scans": n_scans,
        "seconds": round(seconds, 1),
        **{
            f"final_{k}": round(sum(p[k] for p in tail) / len(tail), 4)
            for k in ("loss", *_LOSS_TERMS)
        },
    }


def _heads_and_optimizer(model, params: list[nn.Parameter], cfg: VisionWarmupConfig):
    """(fresh heads seeded by ``cfg.seed``, AdamW over vision side + heads, warm-up cosine)."""
    dim = int(model.config.text_config.hidden_size)
    torch.manual_seed(cfg.seed)
    heads = _Heads(dim)
    opt = torch.optim.AdamW([*params, *heads.parameters()], lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt,
        lambda s: (
            min(1.0, (s + 1) / max(1, cfg.steps // 20))
            * 0.5
            * (1 + math.cos(math.pi * s / cfg.steps))
        ),
    )
    return heads, opt, sched


def _next_indices(
    order: list[int], n: int, batch_size: int, rng: random.Random
) -> tuple[list[int], list[int]]:
    """The next batch of scan indices and the rest of the order; a fresh shuffled pass is
    appended when fewer than a batch remain."""
    if len(order) < batch_size:
        perm = list(range(n))
        rng.shuffle(perm)
        order = order + perm
    return order[:batch_size], order[batch_size:]


def _losses(
    heads: _Heads,
    feats: list[Tensor],
    batch: list[tuple[Image.Image, np.ndarray, np.ndarray]],
    scans: list[_Scan],
    positions: Tensor,
    cfg: VisionWarmupConfig,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The weighted total and each term (:data:`_LOSS_TERMS`) of one batch."""
    cov = torch.tensor(np.stack([b[1] for b in batch]), dtype=torch.float32)
    pol = torch.tensor(np.stack([b[2] for b in batch]), dtype=torch.float32)
    tok, mod, cnt, quad = heads(torch.stack(feats).float())
    loss_pos = nn.functional.cross_entropy(quad.reshape(-1, 4), positions.repeat(len(scans)))
    bce = nn.functional.binary_cross_entropy_with_logits
    loss_cov = bce(tok[..., 0], cov)
    w_pol = (cov > 0).float()
    loss_pol = (bce(tok[..., 1], pol, reduction="none") * w_pol).sum() / w_pol.sum().clamp(min=1)
    mod_y = torch.tensor([s.modality for s in scans])
    cnt_y = torch.tensor([min(s.count, 2) for s in scans])
    loss_mod = nn.functional.cross_entropy(mod, mod_y)
    loss_cnt = nn.functional.cross_entropy(cnt, cnt_y)
    loss = (
        loss_cov
        + cfg.polarity_weight * loss_pol
        + cfg.modality_weight * loss_mod
        + cfg.count_weight * loss_cnt
        + cfg.position_weight * loss_pos
    )
    terms = {
        "coverage": loss_cov,
        "polarity": loss_pol,
        "modality": loss_mod,
        "count": loss_cnt,
        "position": loss_pos,
    }
    return loss, terms


@torch.no_grad()
def readout_quality(model, processor, heads: _Heads, records, image_root: Path) -> dict:
    """Presence AUC (max token coverage), modality and count accuracy of the heads."""
    scans = _load_scans(records, image_root)
    was_training = model.training
    model.eval()
    scores, labels, mod_ok, cnt_ok = [], [], [], []
    for start in range(0, len(scans), 64):
        chunk = scans[start : start + 64]
        inputs = dict(
            processor.image_processor(
                images=[Image.fromarray(s.image) for s in chunk], return_tensors="pt"
            )
        )
        feats, _ = feature_grid(model, inputs)
        tok, mod, cnt, _ = heads(torch.stack(feats).float())
        for s, t, m, c in zip(chunk, tok, mod, cnt):
            scores.append(float(torch.sigmoid(t[:, 0]).max()))
            labels.append(int(s.count > 0))
            mod_ok.append(int(m.argmax()) == s.modality)
            cnt_ok.append(int(c.argmax()) == min(s.count, 2))
    model.train(was_training)
    return {
        "holdout_scans": len(scans),
        "holdout_presence_auc": round(_presence_auc(scores, labels) or float("nan"), 4),
        "holdout_modality_accuracy": round(sum(mod_ok) / len(mod_ok), 4),
        "holdout_count_accuracy": round(sum(cnt_ok) / len(cnt_ok), 4),
    }
