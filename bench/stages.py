"""Throughput of the pipeline's stages, each on its own core function, one torch / OpenCV thread.

* **Sampling**: the ``hf`` engine on the bench world's tiny LLaVA (random weights: every answer
  runs the whole token budget, the worst case for batching), batch 16 vs one prompt at a time,
  greedy and temperature 0.7, alternated; prompts/s. Goal: batch 16 >= 4x.
* **Judge**: the rules judge (``judge_rollouts``) on rollouts made from the test records, half
  of them the reference answer (a counterfactual is built), half a wrong answer of the same
  question type (the span is corrected); records/s.
* **Corruption**: ``corrupt(image, mask, kind, seed)`` per kind on 256x256 SynthLesion-like
  scans (``bench/corruption.py``'s generator), best of ``--repeats``; images/s. Goal: lesion
  noise >= 300/s.
* **Evaluation**: ``evaluate_policy`` (the evaluate stage's core, its default config with the
  grounding passes) on the world's test split; samples/s.

``bench/sampling.py`` and ``bench/corruption.py`` remain the longer, stand-alone versions.

Run from the repository root::

    .venv/bin/python -m bench.stages [--quick] [--out res.json]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from bench.common import build_world, emit, machine_info, median


def _sampling(world: dict, prompts: int, tokens: int, repeats: int) -> dict:
    from fire_mpo_core.data.io import load_records
    from fire_mpo_core.policy import PolicyRef
    from fire_mpo_core.sampling import SampleConfig, items_from_records, make_engine

    records = load_records(Path(world["data"]), splits=("train",))[:prompts]
    items = items_from_records(records, Path(world["data"]))
    for it in items:  # decode images up front: time the engine, not PNG reads
        it.load_image()
    out = {}
    for temperature in (0.0, 0.7):
        rates: dict[int, list[float]] = {1: [], 16: []}
        engines = {
            bs: make_engine(
                SampleConfig(temperature=temperature, batch_size=bs, max_new_tokens=tokens),
                PolicyRef(base=world["base"]),
            )
            for bs in (1, 16)
        }
        for engine in engines.values():
            list(engine.sample(items[:2]))  # warm-up
        for _ in range(repeats):
            for bs, engine in engines.items():
                t0 = time.perf_counter()
                n = sum(1 for _ in engine.sample(items))
                rates[bs].append(n / (time.perf_counter() - t0))
        out[str(temperature)] = {"batch_1": median(rates[1]), "batch_16": median(rates[16])}
    return {"prompts": len(items), "max_new_tokens": tokens, "temperatures": out}


def _judge(world: dict, repeats: int) -> dict:
    from fire_mpo_core.data.io import load_records
    from fire_mpo_core.judge import JudgeConfig, build_judge, judge_rollouts
    from testing_support.stage_inputs import rollout, wrong_answers

    records = load_records(Path(world["data"]))
    rollouts = []
    for i, (r, wrong) in enumerate(zip(records, wrong_answers(records))):
        response = r.answer if i % 2 == 0 or not wrong else wrong[i % len(wrong)]
        rollouts.append(rollout(r.id, response, question=r.question, model_key="bench"))
    judge = build_judge(JudgeConfig(), records)
    times, pairs = [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        got, _ = judge_rollouts(judge, records, rollouts)
        times.append(time.perf_counter() - t0)
        pairs = len(got)
    return {"rollouts": len(rollouts), "pairs": pairs, "records_per_s": len(rollouts) / min(times)}


def _corruption(n: int, repeats: int) -> dict:
    import cv2

    from bench.corruption import make_scans
    from fire_mpo_core.corruption import CORRUPTIONS, corrupt

    cv2.setNumThreads(1)
    scans = make_scans(n, 256)
    out = {}
    for kind in CORRUPTIONS:
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            for i, (img, mask, _) in enumerate(scans):
                corrupt(img, mask, kind, i)
            best = min(best, time.perf_counter() - t0)
        out[kind] = n / best
    return {"images": n, "size": 256, "images_per_s": out}


def _evaluation(world: dict, max_samples: int) -> dict:
    from fire_mpo_core.config import EvaluateConfig
    from fire_mpo_core.evaluation.vqa import evaluate_policy
    from fire_mpo_core.policy import PolicyRef

    cfg = EvaluateConfig(split="test", max_samples=max_samples)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        metrics = evaluate_policy(
            PolicyRef(base=world["base"]), Path(world["data"]), cfg, Path(tmp)
        )
        dt = time.perf_counter() - t0
    n = int(metrics.get("n_closed", 0)) + int(metrics.get("n_open", 0))
    n = n or max_samples
    return {
        "samples": n,
        "seconds": dt,
        "samples_per_s": n / dt,
        "max_new_tokens": cfg.max_new_tokens,
        "grounding": cfg.grounding,
    }


def run(args: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(1)
    world = build_world(Path(args.world), n_pairs=args.pairs)
    return {
        "bench": "stages",
        "sampling": _sampling(world, args.prompts, args.tokens, args.repeats),
        "judge": _judge(world, args.repeats),
        "corruption": _corruption(args.images, args.repeats),
        "evaluation": _evaluation(world, args.eval_samples),
        "machine": machine_info(),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", default=str(Path(tempfile.gettempdir()) / "fire-mpo-bench-world"))
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--eval-samples", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if args.quick:
        args.prompts, args.tokens, args.images, args.eval_samples, args.repeats = 32, 8, 50, 16, 1
    result = run(args)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    emit(result)


if __name__ == "__main__":
    main()
