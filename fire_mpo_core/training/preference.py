"""FiRe-MPO preference training: a LoRA adapter on the policy, trained on minimal-edit pairs.

One optimizer step (docs/design.md section 1):

1. B pairs become one padded batch of up to 4B rows, the branches (v, y+), (v, y-), (v', y+),
   (v', y-) (:mod:`fire_mpo_core.training.batching`); each distinct image is encoded once.
2. One policy forward over all rows gives the final hidden states; token log-probs l_theta(t)
   come from full logits (naive path) or chunk by chunk from the hidden states and the lm_head
   weight (``use_fused``, :mod:`fire_mpo_core.losses.fused`).
3. Reference terms: sum_{t in y} l_ref(t) and sum_{t in M(y)} l_ref(t) per branch come from the
   per-round artifact (:mod:`fire_mpo_core.training.reference`); the frozen reference (this very
   model inside ``with reference_weights(model):``, the adapter off or round k-1's adapter
   loaded frozen beside the trainable one with ``job.reference_adapter``; no second copy of the
   base) runs in-step only on the (v, y+) rows, for the KL positions. Without the artifact it
   runs on every row.
4. The loss of ``cfg.loss`` (per pair, then the mean), backward, gradient accumulation over
   ``grad_accum`` forwards, clipping, AdamW, cosine schedule with warmup.

Usage::

    from fire_mpo_core.training.preference import TrainJob, train_preference
    job = TrainJob(policy=policy, pairs_path=pairs_path, image_root=image_root,
                   reference_path=reference_path, cfg=TrainConfig(), out_dir=out_dir)
    result = train_preference(job, on_step=lambda s, n, m: print(s, n))
    write_policy(stage_dir, result.policy)   # the caller writes policy.json

The recipe is :func:`setup` (pairs, model + adapter, reference table, optimizer, resume),
:func:`train_step` (one optimizer step over ``grad_accum`` micro-batches), and
:func:`log_and_checkpoint` / :func:`save`; the loop in :func:`train_preference` fits on a
screen. Scoring a batch is :mod:`fire_mpo_core.training.scoring`, the adapter
:mod:`fire_mpo_core.training.lora`, the batch order :mod:`fire_mpo_core.training.data_order`.

Outputs under ``out_dir``: ``adapter/`` (peft ``save_pretrained``, safetensors),
``metrics.jsonl`` and ``tensorboard/`` every ``logging_every`` steps, ``checkpoints/step-N/``
every ``save_every`` steps while training (removed after a successful finish), ``merged/`` when
``merge_adapter``. A run stopped at any point and started again with the same arguments resumes
from its newest checkpoint and ends with the same adapter, bit for bit, as one that never stopped.

Data parallel: started by ``accelerate launch`` in N processes (``TrainConfig.num_processes``;
:mod:`fire_mpo_core.training.launch` does the launching), every rank draws the same global
micro-batch of ``batch_size`` pairs, scores its contiguous share, and the LoRA gradients are
summed across ranks once per optimizer step (:mod:`fire_mpo_core.training.distributed`), so the
update is the one a single process makes on the whole batch, up to float summation order. Rank
0 alone writes metrics, checkpoints, the adapter and the merged model; dropout is seeded per
(step, rank), so a resumed N-process run also matches its uninterrupted self bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from torch import Tensor, nn
from torch.nn import functional as F
from transformers import get_cosine_schedule_with_warmup

from fire_mpo_core.data.records import PreferencePair
from fire_mpo_core.losses.base import LossOutput, PreferenceLoss
from fire_mpo_core.losses.objectives import build_loss
from fire_mpo_core.models import load_model, load_processor
from fire_mpo_core.policy import PolicyRef, make_adapter_relocatable
from fire_mpo_core.training import sharding
from fire_mpo_core.training.batching import (
    ImageCache,
    build_branch_batch,
    load_pairs,
    pair_length,
    supports_shared_images,
)
from fire_mpo_core.training.checkpoint import (
    CHECKPOINTS,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from fire_mpo_core.training.config import ReferenceConfig, TrainConfig
from fire_mpo_core.training.data_order import DataOrder, total_steps
from fire_mpo_core.training.distributed import (
    DistInfo,
    barrier,
    gather_sums,
    rank_share,
    step_seed,
    sum_gradients,
)
from fire_mpo_core.training.job import TrainJob, TrainResult
from fire_mpo_core.training.lora import (
    adapted_modules,
    attach_lora,
    attach_reference,
    drop_reference,
    vision_adapted,
)
from fire_mpo_core.training.reference import (
    ReferenceTable,
    compute_reference_logprobs,
)
from fire_mpo_core.training.scoring import score_batch

__all__ = ["TrainJob", "TrainResult", "train_preference"]

ADAPTER_DIR = "adapter"
MERGED_DIR = "merged"
METRICS_FILE = "metrics.jsonl"
StepCallback = Callable[[int, int, dict[str, float]], None]


def train_preference(job: TrainJob, on_step: StepCallback | None = None) -> TrainResult:
    """Train a LoRA adapter on the job's pairs with ``job.cfg.loss``; see the module docstring.
    ``on_step(step, total_steps, step_metrics)`` is called after every optimizer step."""
    run = setup(job)
    try:
        for step in range(run.start, run.total):
            metrics = train_step(run, step)
            log_and_checkpoint(run, step + 1, metrics)
            if on_step is not None:
                on_step(step + 1, run.total, metrics)
    finally:
        run.writer.close()
    return save(run)


# --------------------------------------------------------------------------- setup


@dataclass
class _Run:
    """What one training run holds between setup, its steps and save."""

    job: TrainJob
    accelerator: Accelerator
    world: DistInfo
    processor: Any
    model: nn.Module
    params: list[nn.Parameter]
    optimizer: torch.optim.Optimizer
    scheduler: Any
    pairs: list[PreferencePair]
    rejects: list[dict[str, str]]
    order: DataOrder
    total: int
    digest: str
    loss_fn: PreferenceLoss
    table: ReferenceTable | None
    images: ImageCache
    sharded: bool
    shared_images: bool
    vision_adapted: bool
    t_start: float
    start: int = 0
    resumed_from: int | None = None
    writer: Any = None
    window: list[dict[str, float]] = field(default_factory=list)
    final_metrics: dict[str, float] = field(default_factory=dict)
    train_seconds: float = 0.0
    pairs_done: int = 0
    encodes_done: int = 0

    @property
    def cfg(self) -> TrainConfig:
        return self.job.cfg


def setup(job: TrainJob) -> _Run:
    """Pairs, model + adapter (sharded when configured), reference table, optimizer and
    schedule, then the newest checkpoint's state and the metric writers."""
    t_start = time.perf_counter()
    job = job.resolved()
    cfg = job.cfg
    job.out_dir.mkdir(parents=True, exist_ok=True)
    rejects: list[dict[str, str]] = []
    pairs = load_pairs(
        job.pairs_path,
        on_reject=lambda i, r: rejects.append({"id": i, "reason": r}),
        image_root=job.image_root,
        corrupt_root=job.corrupt_root,
        visual_gate=cfg.loss.visual_gate,
    )
    if not pairs:
        raise ValueError(f"no trainable pairs in {job.pairs_path} ({len(rejects)} rejected)")
    accelerator, world = _accelerator(cfg.dtype), DistInfo.current()
    _check_world(accelerator, world)
    processor, model, sharded = _policy_model(job, accelerator, world)
    loss_fn = build_loss(cfg.loss)
    table = _load_reference(job, pairs) if cfg.use_reference_artifact else None
    params = [p for p in model.parameters() if p.requires_grad]
    lengths = [pair_length(p) for p in pairs]
    order = DataOrder(
        len(pairs),
        cfg.batch_size,
        cfg.seed,
        lengths if cfg.group_by_length else None,
        longest_first=lengths,
    )
    total = total_steps(cfg, order)
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_cosine_schedule_with_warmup(optimizer, round(cfg.warmup_ratio * total), total)
    if not world.active:
        model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    # Several processes: no prepare(). DDP would only sync gradients of forwards through its
    # own forward (we call submodules), and accelerate's scheduler wrapper steps N times a step.
    run = _Run(
        job=job,
        accelerator=accelerator,
        world=world,
        processor=processor,
        model=model,
        params=params,
        optimizer=optimizer,
        scheduler=scheduler,
        pairs=pairs,
        rejects=rejects,
        order=order,
        total=total,
        digest=_digest(cfg, job.policy, pairs, job.reference_adapter),
        loss_fn=loss_fn,
        table=table,
        images=ImageCache(job.image_root, job.corrupt_root),
        sharded=sharded,
        shared_images=supports_shared_images(model),
        vision_adapted=vision_adapted(model),
        t_start=t_start,
    )
    _resume(run)
    run.writer = _open_writers(run)
    return run


def _check_world(accelerator: Accelerator, world: DistInfo) -> None:
    if accelerator.distributed_type.name in ("FSDP", "DEEPSPEED"):
        raise NotImplementedError(
            f"accelerate distributed_type {accelerator.distributed_type.name} is not supported: "
            "the trainer calls the vision tower, the decoder and the lm_head itself; launch with "
            "a MULTI_GPU config (configs/accelerate/ddp_gpu.yaml) and set train.strategy: fsdp "
            "to shard the model (configs/accelerate/fsdp_gpu.yaml)"
        )
    if world.size != accelerator.num_processes:
        raise RuntimeError(
            f"accelerate sees {accelerator.num_processes} processes but the torch process group "
            f"has {world.size}"
        )


def _policy_model(
    job: TrainJob, accelerator: Accelerator, world: DistInfo
) -> tuple[Any, nn.Module, bool]:
    """(processor, the base with its trainable adapter, sharded?)."""
    cfg, policy = job.cfg, job.policy
    processor = load_processor(policy.base, trust_remote_code=policy.trust_remote_code)
    base = load_model(
        policy.base,
        dtype=cfg.dtype,
        device=str(accelerator.device),
        trust_remote_code=policy.trust_remote_code,
    )
    if cfg.gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(cfg.seed)  # the LoRA init is the first random draw
    model = attach_lora(base, policy, cfg.lora)
    sharded = cfg.strategy == "fsdp" and world.active
    if job.reference_adapter is not None:  # loop.reference: previous_round
        if sharded:
            raise ValueError(
                "reference_adapter (loop.reference: previous_round) is not supported with "
                "train.strategy 'fsdp'; use 'ddp'"
            )
        attach_reference(model, job.reference_adapter)
    model.train()
    if sharded:  # FSDP2 units over the frozen base and the adapter (training/sharding.py)
        sharding.shard_model(model)
    return processor, model, sharded


def _resume(run: _Run) -> None:
    """Continue from the newest checkpoint of the same config, policy and pairs."""
    cfg, out_dir = run.cfg, run.job.out_dir
    ckpt = latest_checkpoint(out_dir) if cfg.resume else None
    if not cfg.resume:
        shutil.rmtree(out_dir / CHECKPOINTS, ignore_errors=True)
    if ckpt is None:
        return
    state = load_checkpoint(
        ckpt,
        run.accelerator.unwrap_model(run.model),
        run.optimizer,
        run.scheduler,
        load_model_and_optimizer=not run.sharded,
    )
    if run.sharded:  # each rank its own shard of the adapter and the optimizer state
        sharding.load_rank_state(ckpt, run.world.rank, run.model, run.optimizer)
    if state["digest"] != run.digest:
        raise ValueError(
            f"checkpoint {ckpt} belongs to another config, policy or pair set; remove "
            f"{out_dir / CHECKPOINTS} or set resume=False"
        )
    run.start = run.resumed_from = int(state["step"])


def _open_writers(run: _Run) -> Any:
    """metrics.jsonl (cut back to the resumed step) and TensorBoard, on rank 0 only."""
    if not run.world.is_main:
        return _NullWriter()
    metrics_path = run.job.out_dir / METRICS_FILE
    kept = []
    if run.resumed_from is not None and metrics_path.is_file():
        lines = metrics_path.read_text().splitlines()
        kept = [ln for ln in lines if ln.strip() and json.loads(ln)["step"] <= run.start]
    metrics_path.write_text("".join(ln + "\n" for ln in kept))

    from torch.utils.tensorboard import SummaryWriter  # tensorboard: optional at import

    return SummaryWriter(
        str(run.job.out_dir / "tensorboard"),
        purge_step=run.start + 1 if run.resumed_from is not None else None,
    )


# --------------------------------------------------------------------------- step


def train_step(run: _Run, step: int) -> dict[str, float]:
    """One optimizer step over ``grad_accum`` micro-batches; returns the step's metrics."""
    cfg, world = run.cfg, run.world
    t0 = time.perf_counter()
    ks = range(step * cfg.grad_accum, (step + 1) * cfg.grad_accum)
    global_micro = [run.order.micro_batch(k) for k in ks]
    n_step = sum(len(m) for m in global_micro)  # global pairs of the step, all ranks
    micro = global_micro
    if world.active:
        micro = [rank_share(m, world.rank, world.size) for m in global_micro]
        torch.manual_seed(step_seed(cfg.seed, step, world.rank))
    run.optimizer.zero_grad(set_to_none=True)
    meter = _Meter()
    encodes = 0
    for j, idx in enumerate(micro):
        weight = 1.0
        if not idx:  # a global micro-batch smaller than the world leaves a rank idle
            if not run.sharded:
                continue
            # Sharded: every rank runs every forward (the units gather together).
            idx, weight = global_micro[j][:1], 0.0
        encodes += _micro_step(run, idx, weight, n_step, meter)
    if world.active:
        if not run.sharded:  # FSDP2 reduce-scattered the gradients in the backward
            sum_gradients(run.params, world)  # every rank holds the global-batch gradient
        meter.merge(world)
        encodes = int(gather_sums({"e": float(encodes)}, world)["e"])
    grad_norm = run.accelerator.clip_grad_norm_(run.params, cfg.max_grad_norm or float("inf"))
    if hasattr(grad_norm, "full_tensor"):  # a DTensor under sharding
        grad_norm = grad_norm.full_tensor()
    run.optimizer.step()
    run.scheduler.step()
    seconds = time.perf_counter() - t0
    run.train_seconds += seconds
    run.pairs_done += n_step
    run.encodes_done += encodes
    return {
        **meter.means(),
        "grad_norm": float(grad_norm),
        "lr": run.scheduler.get_last_lr()[0],
        "pairs_per_s": n_step / seconds,
        "steps_per_s": 1.0 / seconds,
        "images/encodes_per_pair": encodes / n_step,
        "epoch": (step + 1) * cfg.grad_accum / run.order.per_epoch,
    }


def _micro_step(run: _Run, idx: list[int], weight: float, n_step: int, meter: _Meter) -> int:
    """Forward + backward of one micro-batch. Its loss is summed over pairs and divided by the
    step's pairs ``n_step`` (every pair weighs the same); ``weight`` 0 marks a sharded rank's
    filler batch. Returns the image encodes it took (0 for a filler)."""
    cfg, device = run.cfg, run.accelerator.device
    chunk = [run.pairs[i] for i in idx]
    batch = build_branch_batch(
        run.processor,
        chunk,
        run.images,
        cfg.max_length,
        use_corrupted=bool(run.loss_fn.corrupt_branches),
    ).to(device)
    ref = None
    if run.table is not None:
        ref = {k: v.to(device) for k, v in run.table.lookup(batch.pair_ids).items()}
    out, stats = score_batch(
        run.model,
        batch,
        cfg.loss,
        use_fused=cfg.use_fused,
        chunk_size=cfg.effective_chunk_size,
        reference=ref,
        shared_images=run.shared_images,
        vision_adapted=run.vision_adapted,
        autocast=run.accelerator.autocast,
    )
    if run.sharded:
        weight *= sharding.loss_scale(run.world.size)
    run.accelerator.backward(out.loss.sum() * weight / n_step)
    if not weight:
        return 0
    meter.add_output(run.loss_fn, out)
    return stats["image_encodes"]


def log_and_checkpoint(run: _Run, done: int, metrics: dict[str, float]) -> None:
    """Every ``logging_every`` steps the window's means to metrics.jsonl / TensorBoard; every
    ``save_every`` steps a checkpoint (rank 0; per-rank shards under sharding)."""
    cfg, world = run.cfg, run.world
    run.window.append(metrics)
    if done % cfg.logging_every == 0 or done == run.total:
        path = run.job.out_dir / METRICS_FILE
        run.final_metrics = _log(path, run.writer, done, run.window, write=world.is_main)
        run.window = []
    if not (cfg.save_every and done % cfg.save_every == 0 and done < run.total):
        return
    shards = full = None
    if run.sharded:  # every rank: its shard to a side folder, the full adapter gathered
        shards = run.job.out_dir / CHECKPOINTS / f".shards-step-{done}"
        sharding.save_rank_state(shards, world.rank, run.model, run.optimizer)
        full = sharding.full_adapter_state(run.model)
        barrier(world)
    if world.is_main:  # adapter and optimizer are identical on every rank (DDP)
        save_checkpoint(
            run.job.out_dir,
            done,
            run.accelerator.unwrap_model(run.model),
            run.optimizer,
            run.scheduler,
            {
                "step": done,
                "micro_batches_done": done * cfg.grad_accum,
                "digest": run.digest,
                "num_processes": world.size,
                "strategy": cfg.strategy,
            },
            keep=cfg.keep_checkpoints,
            adapter_state=None if full is None else _peft_state(run.model, full),
            optimizer_state=None if not run.sharded else {"sharded": True},
            extra_dir=shards,
        )
    barrier(world)  # no rank runs ahead of a checkpoint that may not exist yet


# --------------------------------------------------------------------------- save


def save(run: _Run) -> TrainResult:
    """The adapter (relocatable), the merged model when asked, and the run's numbers."""
    cfg, world, out_dir = run.cfg, run.world, run.job.out_dir
    peft_model = run.accelerator.unwrap_model(run.model)
    drop_reference(peft_model)  # only the trained adapter is saved or merged
    adapter_dir = out_dir / ADAPTER_DIR
    merged_dir = out_dir / MERGED_DIR if cfg.merge_adapter else None
    adapters = len(adapted_modules(peft_model))
    full = sharding.full_adapter_state(peft_model) if run.sharded else None  # every rank
    if world.is_main:
        if full is None:
            peft_model.save_pretrained(str(adapter_dir))
        else:
            peft_model.save_pretrained(str(adapter_dir), state_dict=full)
        make_adapter_relocatable(adapter_dir)  # no absolute store path inside the store
        if merged_dir is not None:
            merged = peft_model.merge_and_unload()
            merged.save_pretrained(str(merged_dir))
            run.processor.save_pretrained(str(merged_dir))
        shutil.rmtree(out_dir / CHECKPOINTS, ignore_errors=True)
    barrier(world)  # the adapter exists before any rank reports success
    steps_run, secs = run.total - run.start, run.train_seconds
    policy = run.job.policy
    return TrainResult(
        policy=PolicyRef(
            base=policy.base,
            adapter=str(adapter_dir.resolve()),
            trust_remote_code=policy.trust_remote_code,
        ),
        merged=str(merged_dir.resolve()) if merged_dir else None,
        steps=run.total,
        pairs=len(run.pairs),
        pairs_with_corrupted=sum(p.corrupted_image is not None for p in run.pairs),
        rejects=run.rejects,
        resumed_from_step=run.resumed_from,
        final_metrics=run.final_metrics,
        seconds=round(time.perf_counter() - run.t_start, 3),
        steps_per_s=steps_run / secs if secs else 0.0,
        pairs_per_s=run.pairs_done / secs if secs else 0.0,
        image_encodes_per_pair_step=run.encodes_done / run.pairs_done if run.pairs_done else 0.0,
        trainable_parameters=sum(p.numel() for p in run.params),
        adapted_modules=adapters,
        num_processes=world.size,
        strategy=cfg.strategy if world.active else "single",
    )


# --------------------------------------------------------------------------- helpers


class _Meter:
    """Pair-weighted means over the micro-batches of a step (visual terms over active pairs)."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}
        self.weights: dict[str, float] = {}

    def add(self, key: str, values: Tensor, weight_mask: Tensor | None = None) -> None:
        values = values.detach().float()
        if weight_mask is not None:
            values = values[weight_mask]
        self.sums[key] = self.sums.get(key, 0.0) + float(values.sum())
        self.weights[key] = self.weights.get(key, 0.0) + values.numel()

    def add_output(self, loss_fn: PreferenceLoss, out: LossOutput) -> None:
        self.add("loss", out.loss)
        self.add("rewards/chosen", out.chosen_rewards)
        self.add("rewards/rejected", out.rejected_rewards)
        self.add("rewards/margin", out.margins)
        self.add("rewards/accuracy", (out.margins > 0).float())
        self.add("kl/forward", out.kl_forward)
        self.add("kl/reverse", out.kl_reverse)
        self.add("nll", out.nll)
        self.add("visual/active_fraction", out.visual_active.float())
        self.add("visual/margin", out.visual_margin, out.visual_active)
        self.add("loss/visual", -F.logsigmoid(out.visual_margin), out.visual_active)
        for key, values in loss_fn.logged_terms(out).items():
            self.add(key, values)

    def merge(self, world: DistInfo) -> None:
        """Replace this rank's sums and weights by those of all ranks (every rank calls it)."""
        merged = gather_sums(
            {
                **{f"s:{k}": v for k, v in self.sums.items()},
                **{f"w:{k}": v for k, v in self.weights.items()},
            },
            world,
        )
        self.sums = {k[2:]: v for k, v in merged.items() if k.startswith("s:")}
        self.weights = {k[2:]: v for k, v in merged.items() if k.startswith("w:")}

    def means(self) -> dict[str, float]:
        return {k: (self.sums[k] / w if w else 0.0) for k, w in self.weights.items()}


# --------------------------------------------------------------------------- training


def _accelerator(dtype: str) -> Accelerator:
    mixed = "bf16" if dtype == "bfloat16" else "no"
    try:
        return Accelerator(mixed_precision=mixed)
    except ValueError:
        # AcceleratorState is a process-wide singleton fixed by the first Accelerator; a worker
        # that trains float32 then bf16 (ablations) must reset it to change precision.
        AcceleratorState._reset_state()
        return Accelerator(mixed_precision=mixed)


def _digest(
    cfg: TrainConfig,
    policy: PolicyRef,
    pairs: Sequence[PreferencePair],
    reference_adapter: Path | None = None,
) -> str:
    """What a checkpoint's continuation depends on; bookkeeping fields are left out."""
    bookkeeping = {"save_every", "keep_checkpoints", "resume", "logging_every", "merge_adapter"}
    payload = {
        "cfg": cfg.model_dump(mode="json", exclude=bookkeeping),
        "policy": policy.model_dump(mode="json"),
        "pairs": [p.id for p in pairs],
    }
    if reference_adapter is not None:  # only then: a base-reference run's digest is unchanged
        payload["reference_adapter"] = str(reference_adapter)
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _load_reference(job: TrainJob, pairs: list[PreferencePair]) -> ReferenceTable:
    """The per-round reference table: the job's artifact, or one computed here (rank 0)."""
    cfg, reference_path = job.cfg, job.reference_path
    if reference_path is None:
        world = DistInfo.current()
        if world.is_main:  # one rank computes the artifact, the others wait and read it
            compute_reference_logprobs(
                job.policy,
                pairs,
                job.image_root,
                job.corrupt_root,
                ReferenceConfig.for_training(cfg),
                job.out_dir / "reference",
                reference_adapter=job.reference_adapter,
            )
        barrier(world)
        reference_path = job.out_dir / "reference"
    table = ReferenceTable.load(reference_path)
    if table.max_length != cfg.max_length:
        raise ValueError(
            f"reference artifact max_length={table.max_length} differs from the trainer's "
            f"max_length={cfg.max_length}; recompute it with ReferenceConfig.for_training(cfg)"
        )
    return table


def _peft_state(model: nn.Module, full: dict[str, Tensor]) -> dict[str, Tensor]:
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model, state_dict=full)


class _NullWriter:
    """The TensorBoard writer of ranks > 0: they log nothing."""

    def add_scalar(self, *args: Any, **kwargs: Any) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


def _log(
    path: Path, writer, step: int, window: list[dict[str, float]], write: bool = True
) -> dict[str, float]:
    """Mean of the window's per-step metrics, written to metrics.jsonl and TensorBoard when
    ``write`` (rank 0); returned either way."""
    keys = sorted({k for m in window for k in m})
    line = {"step": step}
    for k in keys:
        vals = [m[k] for m in window if k in m]
        line[k] = sum(vals) / len(vals)
    line["epoch"] = window[-1]["epoch"]
    line["lr"] = window[-1]["lr"]
    if not write:
        return line
    with path.open("a") as f:
        f.write(json.dumps(line, sort_keys=True) + "\n")
    for k, v in line.items():
        if k != "step":
            writer.add_scalar(k, v, step)
    writer.flush()
    return line
