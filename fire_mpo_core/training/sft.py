"""Supervised warm start: next-token cross-entropy on (image, question) -> answer.

The embedded default's tiny LVLM starts from random weights; SFT on SynthLesion train makes it a
competent but imperfect base policy (roughly 60-80 % closed accuracy), leaving room for alignment
to show. Deterministic for a seed on CPU.

Run it through the pipeline (`python -m flows.full_cycle --stages prepare,sft`) or directly::

    from fire_mpo_core.training.sft import run_sft
    metrics = run_sft(model_dir, records, image_root, SFTConfig(), out_dir)
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import get_cosine_schedule_with_warmup

from fire_mpo_core.data.io import open_image
from fire_mpo_core.data.records import VQARecord
from fire_mpo_core.models import encode_batch, load_model, load_processor, model_inputs
from fire_mpo_core.training.config import SFTConfig
from fire_mpo_core.training.vision_warmup import vision_parameters, warm_up_vision


def token_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL over response tokens.

    Args:
        logits: [B, T, V]; position t predicts token t + 1 (HF convention).
        labels: [B, T], -100 where no loss is taken.
    """
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    return torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1), ignore_index=-100
    )


def run_sft(
    model_dir: str | Path,
    records: list[VQARecord],
    image_root: Path,
    cfg: SFTConfig,
    out_dir: Path,
    dtype: str = "float32",
    on_reject: Callable[[str, str], None] | None = None,
    warm_vision: bool = False,
) -> dict[str, Any]:
    """Fine-tune all weights of the model at `model_dir` on `records`; save to `out_dir`.

    A record whose image cannot be read goes to ``on_reject(id, reason)`` (without it: raises).
    ``warm_vision`` first runs the dense vision warm start (:mod:`.vision_warmup`,
    ``cfg.vision_warmup``) on the same records; ``cfg.train_vision: false`` then freezes the
    vision tower + projector for the SFT steps.

    Writes `out_dir/` (model + processor via `save_pretrained`) and `out_dir/train_log.jsonl`
    (one line per step: step, loss, lr). Returns summary metrics.
    """
    # Setup. The draw order (torch seed, data RNG, model load, warm start, optimizer) is part of
    # the result: a seed gives bit-identical weights.
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    processor = load_processor(model_dir)
    model = load_model(model_dir, dtype=dtype)
    model.train()
    out_dir.mkdir(parents=True, exist_ok=True)
    examples, images = _load_examples(records, image_root, cfg, on_reject)
    steps_per_epoch = math.ceil(len(examples) / cfg.batch_size)
    total = cfg.max_steps or max(1, round(cfg.epochs * steps_per_epoch))
    warm = None
    if warm_vision:
        warm = warm_up_vision(
            model,
            processor,
            examples,
            image_root,
            cfg.vision_warmup,
            log_path=out_dir / "vision_warmup_log.jsonl",
        )
    trainable, opt, sched = _optimizer(model, cfg, total)

    # The loop.
    order: list[int] = []
    losses: list[float] = []
    t0 = time.perf_counter()
    with (out_dir / "train_log.jsonl").open("w") as log:
        for step in range(total):
            idx, order = _next_indices(order, len(examples), cfg.batch_size, rng)
            batch = [examples[i] for i in idx]
            losses.append(_step(model, processor, batch, images, cfg, trainable, opt, sched))
            log.write(
                json.dumps(
                    {"step": step + 1, "loss": round(losses[-1], 6), "lr": sched.get_last_lr()[0]}
                )
                + "\n"
            )
            log.flush()

    # Save.
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    tail = losses[-max(1, len(losses) // 10) :]
    return {
        "steps": total,
        "examples": len(examples),
        "first_loss": round(losses[0], 4),
        "final_loss": round(sum(tail) / len(tail), 4),
        "seconds": round(time.perf_counter() - t0, 1),
        **({f"vision_warmup_{k}": v for k, v in warm.items()} if warm else {}),
    }


def _load_examples(
    records: list[VQARecord],
    image_root: Path,
    cfg: SFTConfig,
    on_reject: Callable[[str, str], None] | None,
) -> tuple[list[VQARecord], dict[str, Image.Image]]:
    """The training records and their opened images, each image read once. An unreadable image
    costs its records (rejects naming the file), not the stage."""
    examples = [r for r in records if cfg.include_reports or r.answer_type != "report"]
    images, bad = {}, {}
    for r in examples:
        if r.image in images or r.image in bad:
            continue
        try:
            images[r.image] = open_image(image_root, r.image)
        except ValueError as e:
            if on_reject is None:
                raise
            bad[r.image] = str(e)
    for r in examples:
        if r.image in bad:
            on_reject(r.id, bad[r.image])
    examples = [r for r in examples if r.image in images]
    if not examples:
        raise ValueError("SFT got no training records")
    return examples, images


def _optimizer(model, cfg: SFTConfig, total: int):
    """(trainable parameters, AdamW, cosine schedule); ``cfg.train_vision: false`` freezes the
    vision tower + projector first."""
    if not cfg.train_vision:
        for p in vision_parameters(model):
            p.requires_grad_(False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = get_cosine_schedule_with_warmup(opt, round(cfg.warmup_ratio * total), total)
    return trainable, opt, sched


def _next_indices(
    order: list[int], n: int, batch_size: int, rng: random.Random
) -> tuple[list[int], list[int]]:
    """The next batch of example indices and the rest of the order; a fresh shuffled epoch is
    appended when fewer than a batch remain."""
    if len(order) < batch_size:
        epoch_order = list(range(n))
        rng.shuffle(epoch_order)
        order = order + epoch_order
    return order[:batch_size], order[batch_size:]


def _step(model, processor, batch, images, cfg: SFTConfig, trainable, opt, sched) -> float:
    """One optimizer step on ``batch``; returns its loss."""
    enc = encode_batch(
        processor,
        [images[r.image] for r in batch],
        [r.question for r in batch],
        responses=[r.answer for r in batch],
        max_length=cfg.max_length,
    )
    logits = model(**model_inputs(enc)).logits
    loss = token_nll(logits, enc["labels"])
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
    opt.step()
    sched.step()
    return loss.item()
