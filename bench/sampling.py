"""Batched vs one-at-a-time on-policy sampling with the `hf` engine on the tiny model.

Builds the embedded default's tiny LLaVA (random weights: every answer runs the full token
budget, the worst case for batching) on a small SynthLesion, then samples the same 64 prompts
at batch 1 and batch 16, greedy and at temperature 0.7, and prints prompts/s and the ratio.
Goal: batch 16 >= 4x one at a time.

Run from the repository root (about a minute on 2 cores)::

    .venv/bin/python bench/sampling.py [--prompts 64] [--tokens 24] [--threads 1]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from fire_mpo_core.config import DataConfig, ModelConfig
from fire_mpo_core.data.io import load_records
from fire_mpo_core.data.synthlesion import generate_synthlesion
from fire_mpo_core.models import build_tiny_model
from fire_mpo_core.policy import PolicyRef
from fire_mpo_core.sampling import SampleConfig, items_from_records, make_engine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        generate_synthlesion(DataConfig(n_train_images=32, n_val_images=0, n_test_images=1), root)
        records = load_records(root, splits=("train",))[: args.prompts]
        texts = [t for r in records for t in (r.question, r.answer)]
        default = ModelConfig(hidden_size=128, patch_size=16)
        build_tiny_model(default, texts, 64, root / "model")
        items = items_from_records(records, root)
        for im in items:  # decode images up front: time the engine, not PNG reads
            im.load_image()
        rows = []
        for temperature in (0.0, 0.7):
            times = {}
            for bs in (1, 16):
                cfg = SampleConfig(
                    temperature=temperature, batch_size=bs, max_new_tokens=args.tokens
                )
                engine = make_engine(cfg, PolicyRef(base=str(root / "model")))
                list(engine.sample(items[:2]))  # warm-up
                t0 = time.perf_counter()
                n = sum(1 for _ in engine.sample(items))
                times[bs] = time.perf_counter() - t0
                assert n == len(items)
            rows.append((temperature, len(items) / times[1], len(items) / times[16]))
    print(f"\n{args.prompts} prompts, {args.tokens} new tokens max, {args.threads} thread(s)\n")
    print("| temperature | batch 1 (prompts/s) | batch 16 (prompts/s) | ratio |")
    print("|---|---|---|---|")
    for t, one, batch in rows:
        print(f"| {t} | {one:.1f} | {batch:.1f} | {batch / one:.1f}x |")


if __name__ == "__main__":
    main()
