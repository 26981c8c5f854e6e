"""Throughput of lesion-mask image corruption (the corrupt stage's core), in images per second.

What is measured, on SynthLesion-like 256x256 grey scans (an elliptical body with correlated
texture on dark air and one bright or dark disc lesion of radius 8-30 px, generated here with a
fixed seed, so every run sees the same images):

* every kind of ``corrupt(image, mask, kind, seed)`` in a single-threaded loop (OpenCV limited
  to one thread), inpaint (Telea, default) included and its Navier-Stokes / biharmonic variants;
* the classical segmenter (prompt -> mask), single-threaded;
* the batch ``corrupt_many`` with lesion noise on the dataset masks (the paper's default path),
  serial (``num_workers=0``) vs 2 threads vs 2 processes (forkserver), the latter both started
  per call (start-up included) and warm (one pool from ``make_executor`` reused), with and
  without the per-image quality numbers;
* the batch reading the scans and masks from PNG files (what the stage does), and the prompt ->
  classical segmenter -> lesion noise path, serial vs 2 threads vs 2 processes.

Each figure is the best of ``--repeats`` runs (the machine is shared; the best run is the least
disturbed one). The goal for lesion noise on 2 cores is >= 300 images/s.

Run from the repository root (about a minute on 2 cores at the defaults)::

    .venv/bin/python bench/corruption.py                   # 600 images, 3 repeats
    .venv/bin/python bench/corruption.py --n 2000 --out /tmp/bench_corruption.md

It prints a markdown section and writes it to ``--out`` (default /tmp/bench_corruption.md).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fire_mpo_core.corruption import (  # noqa: E402
    CORRUPTIONS,
    CorruptConfig,
    CorruptItem,
    corrupt,
    corrupt_many,
    derive_seed,
    get_segmenter,
    make_executor,
)


def make_scans(n: int, size: int, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray, str]]:
    """n (uint8 HxW scan, bool HxW lesion mask, prompt naming its quadrant) triples."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    body = ((yy - size / 2) / (0.45 * size)) ** 2 + ((xx - size / 2) / (0.42 * size)) ** 2 <= 1
    out = []
    for _ in range(n):
        tex = cv2.GaussianBlur(rng.standard_normal((size, size)).astype(np.float32), (0, 0), 3.0)
        img = np.full((size, size), 10.0, np.float32)
        img[body] = 110 + 8 * (tex / tex.std())[body]
        r = rng.uniform(8, 30)
        cy = rng.uniform(0.25, 0.75) * size
        cx = rng.uniform(0.25, 0.75) * size
        mask = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        img[mask] += rng.choice([-1.0, 1.0]) * rng.uniform(40, 80)
        img += rng.normal(0, 3, img.shape).astype(np.float32)
        vertical = "upper" if cy < size / 2 else "lower"
        side = "left" if cx >= size / 2 else "right"  # patient left = image right
        out.append(
            (
                np.clip(np.rint(img), 0, 255).astype(np.uint8),
                mask,
                f"lesion in the {vertical} {side}",
            )
        )
    return out


def best_rate(n: int, fn: Callable[[], object], repeats: int) -> float:
    """Images per second of the fastest of `repeats` calls of fn (which processes n images)."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return n / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=600, help="images per measurement")
    ap.add_argument("--size", type=int, default=256, help="image side in pixels")
    ap.add_argument("--repeats", type=int, default=3, help="runs per figure; the best is kept")
    ap.add_argument("--workers", type=int, default=2, help="workers of the parallel batch")
    ap.add_argument("--out", default="/tmp/bench_corruption.md", help="markdown output file")
    args = ap.parse_args()
    cv2.setNumThreads(1)

    scans = make_scans(args.n, args.size)
    n = len(scans)
    seeds = [derive_seed(0, f"r{i}") for i in range(n)]
    rows: list[tuple[str, str, float]] = []

    # 1. every kind, single thread
    kinds: list[tuple[str, dict]] = [(k, {}) for k in CORRUPTIONS]
    kinds += [("inpaint", {"method": "ns"}), ("inpaint", {"method": "biharmonic"})]
    for kind, params in kinds:
        few = n if params.get("method") != "biharmonic" else min(n, 100)

        def run(kind=kind, params=params, few=few) -> None:
            for (img, mask, _), s in zip(scans[:few], seeds):
                corrupt(img, mask, kind, s, **params)

        label = kind + (f" ({params['method']})" if params else "")
        if kind == "inpaint" and not params:
            label = "inpaint (telea, default)"
        rows.append((f"`corrupt` {label}", "1 thread", best_rate(few, run, args.repeats)))

    seg = get_segmenter("classical")

    def run_seg() -> None:
        for img, _, prompt in scans:
            seg.segment(img, prompt)

    rows.append(("classical segmenter (prompt -> mask)", "1 thread", best_rate(n, run_seg, 1)))

    # 2. the batch: lesion noise on dataset masks
    items = [CorruptItem(id=f"r{i}", image=img, mask=m) for i, (img, m, _) in enumerate(scans)]
    w = args.workers
    proc = CorruptConfig(num_workers=w, pool="process")
    with make_executor(proc) as warm_pool:
        corrupt_many(items[: 4 * w], proc, executor=warm_pool)  # start the workers
        for quality in (False, True):
            q = "with quality numbers" if quality else "no quality numbers"
            cases = [
                ("serial", CorruptConfig(num_workers=0, quality=quality), None),
                (f"{w} threads", CorruptConfig(num_workers=w, quality=quality), None),
                (
                    f"{w} processes, pool started per call",
                    CorruptConfig(num_workers=w, pool="process", quality=quality),
                    None,
                ),
                (
                    f"{w} processes, warm pool",
                    CorruptConfig(num_workers=w, pool="process", quality=quality),
                    warm_pool,
                ),
            ]
            for name, cfg, ex in cases:
                rate = best_rate(
                    n, lambda cfg=cfg, ex=ex: corrupt_many(items, cfg, executor=ex), args.repeats
                )
                rows.append((f"`corrupt_many` lesion noise, {q}", name, rate))

    # 3. from PNG files, as the stage reads them; and the segmenter path
    with tempfile.TemporaryDirectory() as tmp:
        file_items = []
        for i, (img, m, _) in enumerate(scans):
            Image.fromarray(img).save(Path(tmp) / f"scan ({i}).png")
            Image.fromarray(m).convert("1").save(Path(tmp) / f"mask ({i}).png")
            file_items.append(
                CorruptItem(
                    id=f"r{i}",
                    image=Path(tmp) / f"scan ({i}).png",
                    mask=str(Path(tmp) / f"mask ({i}).png"),
                )
            )
        prompt_items = [
            CorruptItem(id=f"r{i}", image=img, prompt=p) for i, (img, _, p) in enumerate(scans)
        ]
        for what, its in (
            ("PNG files in, lesion noise, quality on", file_items),
            ("prompt -> classical segmenter -> lesion noise, quality on", prompt_items),
        ):
            for name, cfg in (
                ("serial", CorruptConfig(num_workers=0)),
                (f"{w} threads", CorruptConfig(num_workers=w)),
                (f"{w} processes, pool started per call", proc),
            ):
                rate = best_rate(n, lambda cfg=cfg, its=its: corrupt_many(its, cfg), args.repeats)
                rows.append((f"`corrupt_many` {what}", name, rate))

    load = os.getloadavg()
    lines = [
        "## Corruption throughput (bench/corruption.py)",
        "",
        f"{n} SynthLesion-like {args.size}x{args.size} grey scans, one disc lesion each "
        f"(radius 8-30 px); best of {args.repeats} runs; {os.cpu_count()} CPUs, "
        f"{platform.processor() or platform.machine()}, Python {platform.python_version()}, "
        f"OpenCV {cv2.__version__}; load average at the end {load[0]:.1f} / {load[1]:.1f} / "
        f"{load[2]:.1f} (1 / 5 / 15 min: other jobs share the machine).",
        "",
        "| what | workers | images/s |",
        "|---|---|---:|",
    ]
    lines += [f"| {what} | {workers} | {rate:,.0f} |" for what, workers, rate in rows]
    lines += [
        "",
        "Goal: lesion noise >= 300 images/s on 2 cores. 'pool started per call' includes "
        "starting the forkserver workers (each imports OpenCV and scikit-image); 'warm pool' "
        "reuses one made by `make_executor`.",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
