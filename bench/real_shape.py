"""Trainers at a real shape: Qwen2.5-VL architecture, the real vocabulary (151,936), long answers.

The tiny-LLaVA comparison (``bench.trainer``) runs a 1,024-token vocabulary, where the lm_head is
a rounding error. Here the lm_head dominates, as it does in a real model: a Qwen2.5-VL model built
offline from a config (random weights, no download) with a decoder wide enough for the head to
matter (``--hidden``, default 512, ``--layers`` 2), its embedding and lm_head resized to
``--vocab`` rows (151,936, Qwen2.5-VL's; the locally trained tokenizer only uses the first ~1k
ids, which changes no shape), report-like answers of ``--tokens`` response tokens (64-256), and
``--batch`` pairs per step (all with a corrupted image v'), LoRA r 16 / alpha 32 on the language
model's linear layers, float32, AdamW.

Variants (each run a fresh process, alternated, medians over ``--repeats``):

* ``ours-dpo-artifact``: DPO, fused log-probs, reference sums from the per-round artifact;
* ``ours-dpo-inloop``: the same with the reference run in every step;
* ``trl-dpo``: ``trl.DPOTrainer`` (sigmoid, reference = adapter off, in every step; its chunked
  lm_head, which on CPU scores every position, prompt and image tokens included);
* ``ours-fire_mpo-artifact`` / ``ours-fire_mpo-inloop``: the FiRe-MPO step (4 branches, span
  KL), fused;
* ``ours-fire_mpo-artifact-gc``: the same with gradient checkpointing on the decoder;
* ``paper-fire_mpo``: the paper's recipe emulated: 4 policy + 4 reference forwards per step (one
  per branch, each image encoded in each forward), full [B, T, V] logits of every position,
  the reference in the step, the loss by the naive public contract
  (``fire_mpo_core.losses.preference_loss_from_logits``).

Memory: "step peak" is the peak RSS above the RSS after step 1 (activations, logits and gradient
buffers; the optimizer state exists by then), "process peak" the whole process's peak RSS
(model included). Throughput: pairs / s over steps 2..N, step end to step end.

    .venv/bin/python -m bench.real_shape [--quick] [--hidden 512] [--tokens 64] [--batch 4]
        [--steps 3] [--repeats 1] [--out res.json]
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

from bench.common import emit, machine_info, median, run_worker
from bench.trainer import BETA, LR, _StepClock

VARIANTS = (
    "ours-dpo-artifact",
    "ours-dpo-inloop",
    "trl-dpo",
    "ours-fire_mpo-artifact",
    "ours-fire_mpo-inloop",
    "ours-fire_mpo-artifact-gc",
    "paper-fire_mpo",
)
QWEN_VOCAB = 151_936
WORLD_VERSION = 1

FINDINGS = ("nodule", "mass", "cyst", "opacity", "effusion", "lesion", "calcification")
PLACES = ("left upper", "right upper", "left lower", "right lower", "central", "peripheral")
SIZES = ("small", "large", "round", "irregular")
FILLER = (
    "The heart size is within normal limits.",
    "No acute bony abnormality is seen.",
    "The visualized soft tissues are unremarkable.",
    "Comparison is made with the prior study.",
    "The mediastinal contours are stable.",
    "There is no pneumothorax.",
)


# --------------------------------------------------------------------------- the world


def _report_pair(i: int, n_tokens: int, tokenizer) -> tuple[str, str, list, list]:
    """A structurally locked report pair (same sentences, one word changed in some of the
    finding sentences) of about ``n_tokens`` response tokens; spans mark the changed words."""
    chosen, rejected = [], []
    c_spans, r_spans = [], []
    c_len = r_len = 0
    k = 0
    while True:
        if k % 3 == 0:
            f = FINDINGS[(i + k) % len(FINDINGS)]
            wrong = FINDINGS[(i + k + 3) % len(FINDINGS)]
            size, place = SIZES[(i + k) % len(SIZES)], PLACES[(i * 7 + k) % len(PLACES)]
            head = f"There is a {size} "
            tail = f" in the {place} region."
            c_spans.append((c_len + len(head), c_len + len(head) + len(f)))
            r_spans.append((r_len + len(head), r_len + len(head) + len(wrong)))
            c_s, r_s = head + f + tail, head + wrong + tail
        else:
            c_s = r_s = FILLER[(i + k) % len(FILLER)]
        chosen.append(c_s)
        rejected.append(r_s)
        c_len += len(c_s) + 1
        r_len += len(r_s) + 1
        k += 1
        text = " ".join(chosen)
        if len(tokenizer(text, add_special_tokens=False)["input_ids"]) >= n_tokens:
            return text, " ".join(rejected), c_spans, r_spans


def build_world(root: Path, hidden: int, layers: int, vocab: int, tokens: int, n_pairs: int):
    """SynthLesion scans, a Qwen2.5-VL model with ``vocab`` lm_head rows, report pairs with v'.

    Cached by its arguments under ``root``. Returns paths ``data``, ``base``, ``pairs`` and
    ``n_pairs``, plus the model's parameter counts.
    """
    root = Path(root)
    key = [WORLD_VERSION, hidden, layers, vocab, tokens, n_pairs]
    info_path = root / "world.json"
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        if info.get("key") == key:
            return info
    import numpy as np
    import torch
    from PIL import Image

    from fire_mpo_core.config import DataConfig, ModelConfig
    from fire_mpo_core.corruption import corrupt
    from fire_mpo_core.data.records import PreferencePair
    from fire_mpo_core.data.synthlesion import generate_synthlesion, load_records
    from fire_mpo_core.models.tiny import create_tiny_model
    from fire_mpo_core.store import write_jsonl

    data = root / "data"
    generate_synthlesion(
        DataConfig(
            image_size=64,
            n_train_images=max(4, n_pairs),
            n_val_images=0,
            n_test_images=1,
            questions_per_image=1,
            report_fraction=0.0,
        ),
        data,
    )
    records = [r for r in load_records(data) if r.split == "train"]
    texts = [t for r in records for t in (r.question, r.answer)]
    texts += list(FINDINGS) + list(PLACES) + list(SIZES) + list(FILLER)
    cfg = ModelConfig(
        arch="qwen2_5_vl",
        hidden_size=hidden,
        num_layers=layers,
        num_heads=max(1, hidden // 64),
        vision_hidden_size=64,
        vision_layers=2,
        patch_size=8,
    )
    model, processor = create_tiny_model(cfg, texts, 64)
    torch.manual_seed(0)
    model.resize_token_embeddings(vocab, mean_resizing=False)
    base = root / "base"
    model.save_pretrained(base)
    processor.save_pretrained(base)
    params = sum(p.numel() for p in model.parameters())
    head = model.get_output_embeddings().weight.numel()
    del model

    pairs_dir = root / "pairs"
    (pairs_dir / "corrupted").mkdir(parents=True, exist_ok=True)
    pairs = []
    for i in range(n_pairs):
        r = records[i % len(records)]
        chosen, rejected, cs, rs = _report_pair(i, tokens, processor.tokenizer)
        image = np.asarray(Image.open(data / r.image).convert("L"))
        rel = f"corrupted/{i:04d}.png"
        Image.fromarray(corrupt(image, None, "noise", i)).save(pairs_dir / rel)
        pairs.append(
            PreferencePair(
                id=f"real-{i:04d}",
                record_id=r.id,
                image=r.image,
                question="Describe the findings of this scan.",
                answer_type="report",
                chosen=chosen,
                rejected=rejected,
                chosen_spans=cs,
                rejected_spans=rs,
                verdict="correct",
                corrupted_image=rel,
                reverses_on_removal=True,
            )
        )
    write_jsonl(pairs_dir / "data.jsonl", pairs)
    info = {
        "data": str(data),
        "base": str(base),
        "pairs": str(pairs_dir / "data.jsonl"),
        "n_pairs": n_pairs,
        "parameters": params,
        "lm_head_parameters": head,
        "key": key,
    }
    info_path.write_text(json.dumps(info))
    return info


# --------------------------------------------------------------------------- the paper's recipe


def _paper(world: dict, steps: int, batch: int, max_length: int) -> dict:
    """The paper's recipe emulated: per step, 4 policy forwards (one per branch, full logits of
    every position, kept for backward) and 4 reference forwards (adapter off, no grad), the
    loss from the logits (the naive public contract)."""
    import torch
    from transformers import get_cosine_schedule_with_warmup

    from fire_mpo_core.losses import LossConfig, preference_loss_from_logits
    from fire_mpo_core.losses.base import BRANCHES
    from fire_mpo_core.models import IGNORE_INDEX, load_model, load_processor
    from fire_mpo_core.models.families import family_of
    from fire_mpo_core.policy import PolicyRef
    from fire_mpo_core.training.batching import (
        TEXT_KEYS,
        ImageCache,
        build_branch_batch,
        load_pairs,
    )
    from fire_mpo_core.training.config import LoRAConfig
    from fire_mpo_core.training.lora import attach_lora

    pairs_path = Path(world["pairs"])
    pairs = load_pairs(pairs_path)
    processor = load_processor(world["base"])
    base = load_model(world["base"], dtype="float32", device="cpu")
    torch.manual_seed(0)
    lora = LoRAConfig(r=16, alpha=32, dropout=0.05, scope="language_model")
    model = attach_lora(base, PolicyRef(base=world["base"]), lora)
    model.train()
    hf = model.get_base_model()
    family = family_of(hf)
    loss_cfg = LossConfig(name="fire_mpo", beta=BETA)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.0)
    sched = get_cosine_schedule_with_warmup(opt, round(0.1 * steps), steps)
    images = ImageCache(Path(world["data"]), pairs_path.parent)
    clock = _StepClock()
    last = None

    def branch_logits(batch, rows):
        enc = batch.encoded
        width = int(enc["attention_mask"][rows].sum(-1).max())
        inputs = {k: enc[k][rows, :width] for k in TEXT_KEYS if k in enc}
        inputs.update(family.select_image_inputs(enc, rows.tolist(), hf.config))
        logits = model(**inputs, use_cache=False).logits  # [b, W, V], every position
        labels = enc["labels"][rows, 1:width]
        spans = enc["span_mask"][rows, 1:width] & (labels != IGNORE_INDEX)
        return logits[:, :-1], labels, spans

    for step in range(steps):
        idx = [(step * batch + j) % len(pairs) for j in range(batch)]
        b = build_branch_batch(processor, [pairs[i] for i in idx], images, max_length)
        opt.zero_grad(set_to_none=True)
        pol, ref, labs, spans = {}, {}, {}, {}
        for branch in BRANCHES:
            rows = b.rows[branch]
            pol[branch], labs[branch], spans[branch] = branch_logits(b, rows)
            model.eval()
            with torch.no_grad(), model.disable_adapter():
                ref[branch] = branch_logits(b, rows)[0]
            model.train()
        loss = preference_loss_from_logits(loss_cfg, pol, ref, labs, spans, b.has_corrupted).mean()
        loss.backward()
        del pol, ref
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        last = float(loss)
        clock.tick()
    res = clock.result(batch)
    res["final_loss"] = last
    res["trainable_parameters"] = sum(p.numel() for p in params)
    return res


# --------------------------------------------------------------------------- rendering

MIB = 1024**2

#: (what, numerator, denominator, key, goal, higher is better)
GOALS = (
    ("DPO step peak memory, ours (artifact) / TRL", "ours-dpo-artifact", "trl-dpo",
     "step_peak_extra_bytes", 0.5, False),
    ("DPO step peak memory, ours (reference in the step) / TRL", "ours-dpo-inloop", "trl-dpo",
     "step_peak_extra_bytes", 0.5, False),
    ("DPO pairs/s, ours (artifact) / TRL", "ours-dpo-artifact", "trl-dpo", "pairs_per_s", 1.3,
     True),
    ("DPO pairs/s, ours (reference in the step) / TRL", "ours-dpo-inloop", "trl-dpo",
     "pairs_per_s", 1.3, True),
    ("FiRe-MPO step peak memory, ours (artifact) / paper recipe", "ours-fire_mpo-artifact",
     "paper-fire_mpo", "step_peak_extra_bytes", 0.3, False),
    ("FiRe-MPO step time, ours (artifact) / paper recipe", "ours-fire_mpo-artifact",
     "paper-fire_mpo", "step_s", 0.7, False),
    ("FiRe-MPO step CPU time, ours (artifact) / paper recipe", "ours-fire_mpo-artifact",
     "paper-fire_mpo", "step_cpu_s", 0.7, False),
    ("FiRe-MPO step peak memory, ours (reference in the step) / paper recipe",
     "ours-fire_mpo-inloop", "paper-fire_mpo", "step_peak_extra_bytes", 0.3, False),
    ("FiRe-MPO step time, ours (reference in the step) / paper recipe", "ours-fire_mpo-inloop",
     "paper-fire_mpo", "step_s", 0.7, False),
    ("FiRe-MPO step CPU time, ours (reference in the step) / paper recipe",
     "ours-fire_mpo-inloop", "paper-fire_mpo", "step_cpu_s", 0.7, False),
)  # fmt: skip


def goal_rows(r: dict) -> list[tuple[str, str, str, str]]:
    """(what, measured, goal, verdict) rows of the real-shape goals (ratios of one run)."""
    v = r.get("variants", {})
    rows = []
    for what, a, b, key, goal, higher in GOALS:
        label = f"real shape (V = {r.get('vocab', QWEN_VOCAB):,}): {what}"
        sign = ">=" if higher else "<="
        if a not in v or b not in v or not v[b].get(key) or key not in v[a]:
            rows.append((label, "not measured", f"{sign} {goal:g}x", "not measured"))
            continue
        ratio = v[a][key] / v[b][key]
        met = ratio >= goal if higher else ratio <= goal
        rows.append((label, f"{ratio:.2f}x", f"{sign} {goal:g}x", "met" if met else "**not met**"))
    return rows


def _table(header: list[str], rows: list) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return out + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def render_section(r: dict, title: str) -> list[str]:
    """The markdown section of one real-shape result."""
    lines = [title, ""]
    if "error" in r:
        return [*lines, f"Failed: ```{r['error'][-800:]}```", ""]
    v = r["variants"]
    lines += [
        f"Qwen2.5-VL architecture built offline from a config (random weights): decoder hidden "
        f"{r['hidden']}, {r['layers']} layers, vocabulary {r['vocab']:,} (embedding and lm_head "
        f"resized to it; {r['lm_head_parameters'] / 1e6:.1f}M of the model's "
        f"{r['parameters'] / 1e6:.1f}M parameters are the lm_head), 16 image tokens per 64 px "
        f"scan; report pairs of ~{r['tokens']} response tokens (structurally locked: a few "
        f"finding words differ, marked as spans), every pair with a v', batch {r['batch']} "
        f"pairs, {r['steps']} optimizer steps, max_length {r['max_length']}; LoRA r 16 / alpha "
        f"32 / dropout 0.05 on the language model's linear layers, lm_head frozen, float32, "
        f"AdamW {LR:g}, {r['threads']} torch thread. Each run a fresh process, variants "
        f"alternated, medians of {r['repeats']} run(s); pairs/s over steps 2..N. Step peak = "
        "peak RSS above the RSS after step 1; process peak = the whole process's peak RSS; "
        "step (CPU) = the process's user + system time per step (1 thread: the step's compute, "
        "less sensitive than wall time to the other jobs on this shared machine).",
        "",
    ]
    rows = []
    for name in VARIANTS:
        if name not in v:
            continue
        x = v[name]
        rows.append(
            (
                name,
                f"{x['pairs_per_s']:.3f}",
                ", ".join(f"{p:.3f}" for p in x["pairs_per_s_runs"]),
                f"{x['step_s']:.2f} s",
                f"{x['step_cpu_s']:.2f} s" if "step_cpu_s" in x else "-",
                f"{x['step_peak_extra_bytes'] / MIB:,.0f} MiB",
                f"{x['peak_rss_bytes'] / MIB:,.0f} MiB",
                f"{x['final_loss']:.4f}" if x.get("final_loss") is not None else "-",
            )
        )
    lines += _table(
        [
            "variant",
            "pairs/s",
            "runs",
            "step (wall)",
            "step (CPU)",
            "step peak",
            "process peak",
            "final loss",
        ],
        rows,
    )
    ratios = []
    for a, b, what in (
        ("ours-dpo-artifact", "trl-dpo", "ours DPO (artifact) / TRL DPO"),
        ("ours-dpo-inloop", "trl-dpo", "ours DPO (in the step) / TRL DPO"),
        ("ours-fire_mpo-artifact", "paper-fire_mpo", "ours FiRe-MPO (artifact) / paper recipe"),
        ("ours-fire_mpo-inloop", "paper-fire_mpo", "ours FiRe-MPO (in the step) / paper recipe"),
        ("ours-fire_mpo-artifact-gc", "ours-fire_mpo-artifact", "gradient checkpointing / without"),
    ):
        if a in v and b in v:
            ratios.append(
                (
                    what,
                    f"{v[a]['pairs_per_s'] / v[b]['pairs_per_s']:.2f}x",
                    f"{v[a]['step_s'] / v[b]['step_s']:.2f}x",
                    f"{v[a]['step_cpu_s'] / v[b]['step_cpu_s']:.2f}x"
                    if "step_cpu_s" in v[a] and "step_cpu_s" in v[b]
                    else "-",
                    f"{v[a]['step_peak_extra_bytes'] / max(1, v[b]['step_peak_extra_bytes']):.3f}x",
                    f"{v[a]['peak_rss_bytes'] / v[b]['peak_rss_bytes']:.2f}x",
                )
            )
    if ratios:
        lines += ["", "Ratios (same run):", ""]
        lines += _table(
            [
                "ratio",
                "pairs/s",
                "step time (wall)",
                "step time (CPU)",
                "step peak memory",
                "process peak",
            ],
            ratios,
        )
    for name, err in r.get("errors", {}).items():
        lines += ["", f"{name} failed: ```{err[-600:]}```"]
    art = v.get("ours-fire_mpo-artifact", {}).get("reference_artifact_s_per_pair")
    lines += [
        "",
        *(
            [
                f"The reference artifact costs {art:.2f} s per pair once per round (before "
                "training, not in the pairs/s above).",
                "",
            ]
            if art
            else []
        ),
        "What differs: TRL's `DPOTrainer` (1.16) scores with its own chunked lm_head, which on a "
        "device without Triton (CPU here) projects every position of the sequence, prompt and "
        "image tokens included, onto the vocabulary, in the policy and again in the reference "
        "forward, and computes entropy and token accuracy each step; on a GPU with Triton it "
        "scores only the response positions, so its GPU gap to ours is smaller than this CPU "
        "one (not run on GPU). Ours scores response positions only, from hidden states, in "
        "256-row chunks; with the lm_head frozen, the backward is a scaling of Jacobian rows "
        "computed in the forward. The paper recipe keeps 4 policy [B, T, V] logits (and their "
        "log-softmax) for the backward and computes 4 more in the reference forwards; its "
        "vision tower runs in each of the 8 forwards.",
        "",
    ]
    return lines


# --------------------------------------------------------------------------- processes


def worker(args: argparse.Namespace) -> dict:
    import torch

    from bench.trainer import _ours, _trl

    torch.set_num_threads(args.threads)
    world = json.loads((Path(args.world) / "world.json").read_text())
    t0 = time.perf_counter()
    v = args.worker
    if v == "trl-dpo":
        res = _trl(world, args.steps, args.batch, args.max_length)
    elif v == "paper-fire_mpo":
        res = _paper(world, args.steps, args.batch, args.max_length)
    else:
        _, loss, reference, *rest = v.split("-")
        res = _ours(world, loss, reference, args.steps, args.batch, args.max_length, rest == ["gc"])
    res.update(
        {
            "variant": v,
            "wall_s": time.perf_counter() - t0,
            "cpu_s": sum(resource.getrusage(resource.RUSAGE_SELF)[:2]),
            "load_1min": os.getloadavg()[0],
        }
    )
    return res


def driver(args: argparse.Namespace) -> dict:
    world_dir = Path(args.world)
    n_pairs = args.batch * args.steps
    world = build_world(world_dir, args.hidden, args.layers, args.vocab, args.tokens, n_pairs)
    common = ["--world", str(world_dir), "--steps", str(args.steps), "--batch", str(args.batch)]
    common += ["--threads", str(args.threads), "--max-length", str(args.max_length)]
    runs: dict[str, list[dict]] = {v: [] for v in args.variants}
    errors: dict[str, str] = {}
    for _ in range(args.repeats):
        for v in args.variants:
            if v in errors:
                continue
            try:
                r = run_worker("bench.real_shape", ["--worker", v, *common], timeout=3600)
            except RuntimeError as e:
                errors[v] = str(e)[-1500:]
                print(f"  {v}: FAILED", file=sys.stderr, flush=True)
                continue
            runs[v].append(r)
            print(
                f"  {v}: {r['pairs_per_s']:.3f} pairs/s, step peak "
                f"{r['step_peak_extra_bytes'] / 2**20:.0f} MiB, process peak "
                f"{r['peak_rss_bytes'] / 2**20:.0f} MiB",
                file=sys.stderr,
                flush=True,
            )
    summary = {}
    for v, rs in runs.items():
        if not rs:
            continue
        summary[v] = {
            "pairs_per_s": median([r["pairs_per_s"] for r in rs]),
            "pairs_per_s_runs": [r["pairs_per_s"] for r in rs],
            "step_s": median([median(r["step_s"]) for r in rs]),
            "step_cpu_s": median([median(r["step_cpu_s"]) for r in rs]),
            "step_peak_extra_bytes": median([r["step_peak_extra_bytes"] for r in rs]),
            "peak_rss_bytes": median([r["peak_rss_bytes"] for r in rs]),
            "final_loss": rs[-1].get("final_loss"),
            "trainable_parameters": rs[-1].get("trainable_parameters"),
            "reference_artifact_s_per_pair": median(
                [r.get("reference_artifact_s_per_pair", 0.0) for r in rs]
            ),
            "load_1min": [r["load_1min"] for r in rs],
        }
    return {
        "bench": "real_shape",
        "hidden": args.hidden,
        "layers": args.layers,
        "vocab": args.vocab,
        "tokens": args.tokens,
        "batch": args.batch,
        "steps": args.steps,
        "threads": args.threads,
        "repeats": args.repeats,
        "max_length": args.max_length,
        "parameters": world["parameters"],
        "lm_head_parameters": world["lm_head_parameters"],
        "variants": summary,
        "errors": errors,
        "machine": machine_info(),
    }


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", default=None, help="world folder (default: by the sizes)")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=QWEN_VOCAB)
    ap.add_argument("--tokens", type=int, default=64, help="response tokens per answer")
    ap.add_argument("--batch", type=int, default=4, help="pairs per step")
    ap.add_argument("--steps", type=int, default=3, help="optimizer steps per run")
    ap.add_argument("--repeats", type=int, default=1, help="runs per variant (alternated)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-length", type=int, default=None, help="default: tokens + 128")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--quick", action="store_true", help="hidden 256, 32 tokens, 2 pairs, 2 steps")
    ap.add_argument("--out", type=Path, help="also write the JSON result here")
    ap.add_argument("--markdown", type=Path, help="also write the rendered section here")
    ap.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.variants = [v for v in args.variants.split(",") if v]
    if args.quick:
        args.hidden, args.tokens, args.batch, args.steps, args.repeats = 256, 32, 2, 2, 1
    if args.max_length is None:
        args.max_length = args.tokens + 128
    if args.world is None:
        n = args.batch * args.steps
        tag = f"h{args.hidden}-l{args.layers}-v{args.vocab}-t{args.tokens}-n{n}"
        args.world = str(Path(tempfile.gettempdir()) / f"fire-mpo-real-{tag}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.worker:
        emit(worker(args))
        return
    result = driver(args)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    if args.markdown:
        cmd = "python -m bench.real_shape " + " ".join(argv if argv is not None else sys.argv[1:])
        title = f"### Real shape, full size (`{cmd}`)"
        lines = render_section(result, title)
        lines += _table(["what", "measured", "goal", "verdict"], goal_rows(result))
        args.markdown.write_text("\n".join(lines) + "\n")
    emit(result)


if __name__ == "__main__":
    main()
