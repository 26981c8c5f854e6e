"""Our preference trainer vs TRL's ``DPOTrainer`` on the same tiny LLaVA, pairs, LoRA and batch.

What is measured (each run in a fresh process, the runs alternated so that every trainer sees the
same background load; medians over ``--repeats`` runs):

* ``ours dpo (artifact)``: ``train_preference`` with the DPO loss, the per-round reference
  artifact (its one-off cost is reported separately and amortised per pair), fused log-probs;
* ``ours dpo (in-loop)``: the same with the reference run in every step, as TRL does;
* ``trl dpo``: ``trl.DPOTrainer`` (sigmoid loss, beta 0.1; reference = the adapter switched off,
  in every step; TRL's response-only fused lm_head);
* ``ours fire_mpo``: the FiRe-MPO step (4 branches: clean/corrupt x chosen/rejected, span KL).

Same for all: the embedded default's tiny LLaVA (hidden 128, 2 layers, vocabulary 1024, 16 image
tokens), the same pairs, LoRA r 16 / alpha 32 / dropout 0.05 on every linear layer of the language
model, batch 8 pairs, max_length 256, float32, AdamW lr 2e-3 with cosine schedule and 10% warmup,
no gradient checkpointing, ``--threads`` torch threads, ``--steps`` optimizer steps. Throughput is
pairs / s over steps 2..N (the first is warm-up), timed step end to step end, so data collation
is in for both. Memory: peak RSS above the RSS after step 1 (activations, gradients; the
optimizer state exists by then), and the process's peak RSS overall.

Run from the repository root (``pip install -e '.[bench]'`` for TRL)::

    .venv/bin/python -m bench.trainer [--quick] [--steps 12] [--repeats 3] [--out res.json]

It prints a JSON result (``--out`` also writes it); ``bench/run_all.py`` renders it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

from bench.common import (
    PeakMemory,
    build_world,
    emit,
    machine_info,
    maxrss_bytes,
    median,
    run_worker,
)

VARIANTS = ("ours-dpo-artifact", "ours-dpo-inloop", "trl-dpo", "ours-fire_mpo-artifact")
LR = 2e-3
BETA = 0.1


def _train_cfg(
    loss: str,
    reference: str,
    steps: int,
    batch: int,
    max_length: int = 256,
    gradient_checkpointing: bool = False,
):
    from fire_mpo_core.training.config import TrainConfig

    return TrainConfig(
        loss={"name": loss, "beta": BETA, "nll_weight": 0.0},
        lora={"r": 16, "alpha": 32, "dropout": 0.05, "scope": "language_model"},
        lr=LR,
        warmup_ratio=0.1,
        max_steps=steps,
        batch_size=batch,
        max_length=max_length,
        dtype="float32",
        use_fused=True,
        use_reference_artifact=reference == "artifact",
        gradient_checkpointing=gradient_checkpointing,
        save_every=None,
        logging_every=steps,
        resume=False,
    )


class _StepClock:
    """Step-end timestamps; resets the memory high-water mark after step 1."""

    def __init__(self) -> None:
        self.ends: list[float] = []
        self.cpu: list[float] = []  # process CPU time (user + system) at each step end
        self.memory = PeakMemory()

    def tick(self) -> None:
        self.ends.append(time.perf_counter())
        self.cpu.append(sum(resource.getrusage(resource.RUSAGE_SELF)[:2]))
        if len(self.ends) == 1:
            self.memory.reset()

    def result(self, batch: int) -> dict:
        gaps = [b - a for a, b in zip(self.ends, self.ends[1:])]
        cpu = [b - a for a, b in zip(self.cpu, self.cpu[1:])]
        return {
            "step_s": gaps,
            "step_cpu_s": cpu,
            "pairs_per_s": batch * len(gaps) / sum(gaps) if gaps else 0.0,
            "step_peak_extra_bytes": self.memory.extra_bytes(),
            "peak_rss_bytes": maxrss_bytes(),
            "peak_reset": self.memory.reset_ok,
        }


def _ours(
    world: dict,
    loss: str,
    reference: str,
    steps: int,
    batch: int,
    max_length: int = 256,
    gradient_checkpointing: bool = False,
) -> dict:
    from fire_mpo_core.policy import PolicyRef
    from fire_mpo_core.training.config import ReferenceConfig
    from fire_mpo_core.training.job import TrainJob
    from fire_mpo_core.training.preference import train_preference
    from fire_mpo_core.training.reference import compute_reference_logprobs

    cfg = _train_cfg(loss, reference, steps, batch, max_length, gradient_checkpointing)
    policy = PolicyRef(base=world["base"])
    pairs = Path(world["pairs"])
    with tempfile.TemporaryDirectory() as tmp:
        ref_path, ref_s = None, 0.0
        if reference == "artifact":
            t0 = time.perf_counter()
            info = compute_reference_logprobs(
                policy, pairs, world["data"], None, ReferenceConfig.for_training(cfg), tmp + "/r"
            )
            ref_s = time.perf_counter() - t0
            ref_path = info["path"]
        clock = _StepClock()
        job = TrainJob(
            policy=policy,
            pairs_path=pairs,
            image_root=world["data"],
            reference_path=ref_path,
            cfg=cfg,
            out_dir=Path(tmp) / "train",
        )
        out = train_preference(job, on_step=lambda s, n, m: clock.tick())
    res = clock.result(batch)
    res.update(
        {
            "reference_artifact_s": ref_s,
            "reference_artifact_s_per_pair": ref_s / world["n_pairs"],
            "image_encodes_per_pair_step": out.image_encodes_per_pair_step,
            "trainable_parameters": out.trainable_parameters,
            "final_loss": out.final_metrics.get("loss"),
        }
    )
    return res


def _trl_dataset(world: dict):
    """The pairs as TRL's vision preference rows: image, prompt (our chat template, rendered),
    chosen / rejected (response + EOS, as our encoder appends it)."""
    from datasets import Dataset

    from fire_mpo_core.data.io import open_image
    from fire_mpo_core.models import load_processor
    from fire_mpo_core.models.encoding import build_prompts
    from fire_mpo_core.training.batching import load_pairs

    processor = load_processor(world["base"])
    eos = processor.tokenizer.eos_token
    pairs = load_pairs(world["pairs"])
    prompts = build_prompts(processor, [p.question for p in pairs])
    rows = {
        "image": [open_image(Path(world["data"]), p.image) for p in pairs],
        "prompt": prompts,
        "chosen": [p.chosen + eos for p in pairs],
        "rejected": [p.rejected + eos for p in pairs],
    }
    return Dataset.from_dict(rows), processor


def _trl(
    world: dict, steps: int, batch: int, max_length: int = 256, gradient_checkpointing: bool = False
) -> dict:
    import torch
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from fire_mpo_core.models import load_model
    from fire_mpo_core.training.config import LoRAConfig
    from fire_mpo_core.training.lora import lora_target_modules

    dataset, processor = _trl_dataset(world)
    model = load_model(world["base"], dtype="float32", device="cpu")
    lora = LoRAConfig(r=16, alpha=32, dropout=0.05, scope="language_model")
    peft_config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora_target_modules(model, lora),  # the same layers as ours
        bias="none",
    )
    clock = _StepClock()

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            clock.tick()

    with tempfile.TemporaryDirectory() as tmp:
        args = DPOConfig(
            output_dir=tmp,
            per_device_train_batch_size=batch,
            gradient_accumulation_steps=1,
            max_steps=steps,
            learning_rate=LR,
            lr_scheduler_type="cosine",
            warmup_steps=round(0.1 * steps),  # as ours: round(warmup_ratio * total)
            weight_decay=0.0,
            max_grad_norm=1.0,
            beta=BETA,
            loss_type=["sigmoid"],
            max_length=max_length,
            gradient_checkpointing=gradient_checkpointing,
            bf16=False,
            fp16=False,
            use_cpu=True,
            seed=0,
            logging_steps=steps,
            save_strategy="no",
            report_to="none",
            dataloader_num_workers=0,
            disable_tqdm=True,
        )
        trainer = DPOTrainer(
            model=model,
            args=args,
            train_dataset=dataset,
            processing_class=processor,
            peft_config=peft_config,
            callbacks=[Clock()],
        )
        torch.manual_seed(0)
        out = trainer.train()
    res = clock.result(batch)
    res["final_loss"] = out.training_loss
    res["trainable_parameters"] = sum(
        p.numel() for p in trainer.model.parameters() if p.requires_grad
    )
    return res


def worker(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    world = build_world(Path(args.world), n_pairs=args.pairs)
    t0 = time.perf_counter()
    if args.worker == "trl-dpo":
        res = _trl(world, args.steps, args.batch)
    else:
        _, loss, reference = args.worker.split("-")
        res = _ours(world, loss, reference, args.steps, args.batch)
    res.update(
        {
            "variant": args.worker,
            "wall_s": time.perf_counter() - t0,
            "cpu_s": sum(resource.getrusage(resource.RUSAGE_SELF)[:2]),
            "load_1min": os.getloadavg()[0],
        }
    )
    return res


def driver(args: argparse.Namespace) -> dict:
    world_dir = Path(args.world)
    build_world(world_dir, n_pairs=args.pairs)  # once, before the timed processes
    common = ["--world", str(world_dir), "--pairs", str(args.pairs), "--steps", str(args.steps)]
    common += ["--batch", str(args.batch), "--threads", str(args.threads)]
    runs: dict[str, list[dict]] = {v: [] for v in args.variants}
    errors: dict[str, str] = {}
    for _ in range(args.repeats):
        for v in args.variants:
            if v in errors:
                continue
            try:
                r = run_worker("bench.trainer", ["--worker", v, *common])
            except RuntimeError as e:  # e.g. TRL cannot run on this stack: say why
                errors[v] = str(e)[-1500:]
                continue
            runs[v].append(r)
            print(f"  {v}: {r['pairs_per_s']:.1f} pairs/s", file=sys.stderr, flush=True)
    summary = {}
    for v, rs in runs.items():
        if not rs:
            continue
        summary[v] = {
            "pairs_per_s": median([r["pairs_per_s"] for r in rs]),
            "pairs_per_s_runs": [r["pairs_per_s"] for r in rs],
            "step_s": median([median(r["step_s"]) for r in rs]),
            "step_peak_extra_bytes": median([r["step_peak_extra_bytes"] for r in rs]),
            "peak_rss_bytes": median([r["peak_rss_bytes"] for r in rs]),
            "final_loss": rs[-1].get("final_loss"),
            "trainable_parameters": rs[-1].get("trainable_parameters"),
            "image_encodes_per_pair_step": rs[-1].get("image_encodes_per_pair_step"),
            "reference_artifact_s_per_pair": median(
                [r.get("reference_artifact_s_per_pair", 0.0) for r in rs]
            ),
            "load_1min": [r["load_1min"] for r in rs],
        }
    return {
        "bench": "trainer",
        "steps": args.steps,
        "batch": args.batch,
        "pairs": args.pairs,
        "threads": args.threads,
        "repeats": args.repeats,
        "variants": summary,
        "errors": errors,
        "machine": machine_info(),
    }


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", default=str(Path(tempfile.gettempdir()) / "fire-mpo-bench-world"))
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps per run")
    ap.add_argument("--batch", type=int, default=8, help="pairs per step")
    ap.add_argument("--repeats", type=int, default=3, help="runs per variant (alternated)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--quick", action="store_true", help="4 steps, 1 run per variant")
    ap.add_argument("--out", type=Path, help="also write the JSON result here")
    ap.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    if args.quick:
        args.steps, args.repeats = 4, 1
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.worker:
        emit(worker(args))
        return
    result = driver(args)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    emit(result)


if __name__ == "__main__":
    main()
