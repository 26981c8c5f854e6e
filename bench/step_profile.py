"""Where a FiRe-MPO training step spends its time, and what two of its optimisations buy.

On the bench world (``bench/common.py``: the embedded default's tiny LLaVA, pairs with v'),
with the LoRA of the default config and the fused FiRe-MPO loss, in one process:

1. **Profile**: ``--profile-steps`` optimizer steps under ``torch.profiler``, with named ranges
   for batch building (tokenise + image processing), vision encoding (vision tower + projector,
   through forward hooks), the language model's forward (hooks), the rest of the forward (the
   chunked lm_head log-probs, KL and loss), backward and the optimizer; shares of the step's
   profiled CPU time.
2. **Counters**: per step, image encodes per pair (vision-tower images / pairs; the goal is 2: v
   and v', each once, for all four branches and the reference), and the reference forwards
   (language-model calls after the policy's one) with the rows they cover, with the per-round
   reference artifact vs in-loop (the reference on every row in every step).
3. **Reference artifact vs in-loop**: step time of both, alternated, medians.
4. **Length grouping**: one epoch in a random order vs a length-grouped order
   (``length_grouped_permutation``), alternated; padded share of the computed positions and
   pairs/s.

Run from the repository root::

    .venv/bin/python -m bench.step_profile [--quick] [--repeats 3] [--out res.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bench.common import build_world, emit, machine_info, median

RANGES = ("batch", "vision", "language_model", "forward", "backward", "optimizer")


class _Instrument:
    """Forward hooks that open profiler ranges around the vision side and the language model,
    and count vision images and language-model calls (with their rows)."""

    def __init__(self, hf) -> None:
        from torch.autograd.profiler import record_function

        self.record_function = record_function
        self.images = 0
        self.lm_rows: list[int] = []
        self._open: list = []
        inner = hf.model
        self.handles = []
        for name, module in (
            ("vision", inner.vision_tower),
            ("vision", inner.multi_modal_projector),
            ("language_model", inner.language_model),
        ):
            self.handles.append(module.register_forward_pre_hook(self._pre(name), with_kwargs=True))
            self.handles.append(module.register_forward_hook(self._post))
        self.handles.append(
            inner.vision_tower.register_forward_pre_hook(self._count_images, with_kwargs=True)
        )
        self.handles.append(
            inner.language_model.register_forward_pre_hook(self._count_lm, with_kwargs=True)
        )

    def _pre(self, name):
        def hook(module, args, kwargs):
            rf = self.record_function(name)
            rf.__enter__()
            self._open.append(rf)

        return hook

    def _post(self, module, args, output):
        self._open.pop().__exit__(None, None, None)

    def _count_images(self, module, args, kwargs):
        pixels = args[0] if args else kwargs["pixel_values"]
        self.images += int(pixels.shape[0])

    def _count_lm(self, module, args, kwargs):
        x = kwargs.get("inputs_embeds")
        if x is None:
            x = kwargs.get("input_ids", args[0] if args else None)
        self.lm_rows.append(int(x.shape[0]))

    def reset(self) -> None:
        self.images, self.lm_rows = 0, []


def _setup(world: dict, use_artifact: bool, tmp: str):
    import torch

    from fire_mpo_core.models import load_model, load_processor
    from fire_mpo_core.policy import PolicyRef
    from fire_mpo_core.training.batching import ImageCache, hf_model, load_pairs
    from fire_mpo_core.training.config import ReferenceConfig, TrainConfig
    from fire_mpo_core.training.lora import attach_lora
    from fire_mpo_core.training.reference import ReferenceTable, compute_reference_logprobs

    cfg = TrainConfig(loss={"name": "fire_mpo"}, use_fused=True, save_every=None, max_steps=1)
    policy = PolicyRef(base=world["base"])
    pairs_path = Path(world["pairs"])
    pairs = load_pairs(pairs_path)
    table = None
    if use_artifact:
        info = compute_reference_logprobs(
            policy, pairs, world["data"], pairs_path.parent, ReferenceConfig.for_training(cfg), tmp
        )
        table = ReferenceTable.load(info["path"])
    torch.manual_seed(0)
    model = attach_lora(load_model(world["base"], dtype="float32"), policy, cfg.lora)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    return {
        "cfg": cfg,
        "model": model,
        "hf": hf_model(model),
        "processor": load_processor(world["base"]),
        "pairs": pairs,
        "images": ImageCache(Path(world["data"]), pairs_path.parent),
        "table": table,
        "optimizer": torch.optim.AdamW(params, lr=cfg.lr),
    }


def _step(s: dict, chunk, use_artifact: bool, rf=None) -> dict:
    """One optimizer step on ``chunk`` (pairs); returns padding and row counts."""
    import contextlib

    from fire_mpo_core.training.batching import build_branch_batch
    from fire_mpo_core.training.scoring import score_batch

    rng = rf or (lambda name: contextlib.nullcontext())
    cfg = s["cfg"]
    with rng("batch"):
        batch = build_branch_batch(s["processor"], chunk, s["images"], cfg.max_length)
    ref = s["table"].lookup(batch.pair_ids) if use_artifact else None
    with rng("forward"):
        out, _ = score_batch(
            s["model"],
            batch,
            cfg.loss,
            use_fused=True,
            chunk_size=cfg.effective_chunk_size,
            reference=ref,
        )
    with rng("backward"):
        out.loss.mean().backward()
    with rng("optimizer"):
        s["optimizer"].step()
        s["optimizer"].zero_grad(set_to_none=True)
    mask = batch.encoded["attention_mask"]
    width = int(mask.sum(-1).max())
    return {"rows": batch.num_rows, "real": int(mask.sum()), "computed": batch.num_rows * width}


def _profile(s: dict, steps: int, use_artifact: bool) -> dict:
    from torch.profiler import ProfilerActivity, profile, record_function

    inst = _Instrument(s["hf"])
    chunks = [s["pairs"][i * 8 : (i + 1) * 8] for i in range(steps + 1)]
    _step(s, chunks[0], use_artifact)  # warm-up, outside the profile
    inst.reset()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for c in chunks[1:]:
            with record_function("step"):
                _step(s, c, use_artifact, record_function)
    wall = time.perf_counter() - t0
    totals = {k: 0.0 for k in (*RANGES, "step")}
    for e in prof.key_averages():
        if e.key in totals:
            totals[e.key] = e.cpu_time_total / 1e6  # us -> s
    pairs = 8 * steps
    calls = len(inst.lm_rows) // steps
    per_step = inst.lm_rows[:calls]
    for h in inst.handles:
        h.remove()
    forward_rest = totals["forward"] - totals["vision"] - totals["language_model"]
    step_total = totals["step"]
    shares = {
        "batch building": totals["batch"],
        "vision encoding": totals["vision"],
        "language model forward": totals["language_model"],
        "lm_head log-probs + KL + loss (forward)": forward_rest,
        "backward (language model + loss)": totals["backward"],
        "optimizer": totals["optimizer"],
    }
    shares["other"] = step_total - sum(shares.values())
    return {
        "wall_s_per_step": wall / steps,
        "profiled_s_per_step": step_total / steps,
        "shares": {k: v / step_total for k, v in shares.items()},
        "image_encodes_per_pair_step": inst.images / pairs,
        "lm_forwards_per_step": calls,
        "lm_rows_per_forward": per_step,
        "reference_forwards_per_step": calls - 1,
    }


def _timed_steps(s: dict, chunks, use_artifact: bool) -> tuple[float, dict]:
    t0 = time.perf_counter()
    pad = {"real": 0, "computed": 0}
    for c in chunks:
        st = _step(s, c, use_artifact)
        pad["real"] += st["real"]
        pad["computed"] += st["computed"]
    return time.perf_counter() - t0, pad


def run(args: argparse.Namespace) -> dict:
    import torch

    from fire_mpo_core.training.batching import length_grouped_permutation, pair_length

    torch.set_num_threads(args.threads)
    world = build_world(Path(args.world), n_pairs=args.pairs)
    with tempfile.TemporaryDirectory() as tmp:
        s = _setup(world, True, tmp)
        profiles = {
            "artifact": _profile(s, args.profile_steps, True),
            "in-loop": _profile(s, args.profile_steps, False),
        }
        pairs = s["pairs"]
        n = len(pairs) // 8 * 8
        # Reference artifact vs in-loop: same batches, alternated.
        chunks = [pairs[i : i + 8] for i in range(0, min(n, 8 * args.ref_steps), 8)]
        ref_times: dict[str, list[float]] = {"artifact": [], "in-loop": []}
        for _ in range(args.repeats):
            for mode in ("artifact", "in-loop"):
                dt, _ = _timed_steps(s, chunks, mode == "artifact")
                ref_times[mode].append(dt / len(chunks))
        # Length grouping: one epoch each, random vs grouped order, alternated.
        lengths = [pair_length(p) for p in pairs[:n]]
        group: dict[str, dict] = {"random": {"s": []}, "grouped": {"s": []}}
        for rep in range(args.repeats):
            for mode in ("random", "grouped"):
                g = torch.Generator().manual_seed(rep)
                if mode == "grouped":
                    order = length_grouped_permutation(lengths, 8, g)
                else:
                    order = torch.randperm(n, generator=g).tolist()
                epoch = [[pairs[i] for i in order[j : j + 8]] for j in range(0, n, 8)]
                dt, pad = _timed_steps(s, epoch, True)
                group[mode]["s"].append(dt)
                group[mode]["padding"] = 1 - pad["real"] / pad["computed"]
        for mode in group:
            group[mode]["pairs_per_s"] = n / median(group[mode]["s"])
    return {
        "bench": "step_profile",
        "profile_steps": args.profile_steps,
        "threads": args.threads,
        "pairs": n,
        "profiles": profiles,
        "reference_step_s": {k: median(v) for k, v in ref_times.items()},
        "length_grouping": group,
        "repeats": args.repeats,
        "machine": machine_info(),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", default=str(Path(tempfile.gettempdir()) / "fire-mpo-bench-world"))
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--profile-steps", type=int, default=4)
    ap.add_argument("--ref-steps", type=int, default=4, help="steps per artifact/in-loop run")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="2 profiled steps, 1 repeat")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if args.quick:
        args.profile_steps, args.repeats, args.ref_steps = 2, 1, 2
    result = run(args)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    emit(result)


if __name__ == "__main__":
    main()
