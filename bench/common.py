"""Shared helpers of the benchmark suite: machine facts, peak-memory probes, the bench world.

Not run on its own; the bench modules import it::

    from bench.common import build_world, machine_info, PeakMemory
    world = build_world(Path("/tmp/bench-world"), n_pairs=64)   # SynthLesion + tiny LLaVA + pairs
    probe = PeakMemory(); probe.reset(); ...; probe.extra_bytes()

The world is the embedded default's model size (tiny LLaVA, hidden 128, 2 layers, vocabulary 1024,
64 px images at patch 16) on a small generated SynthLesion, with preference pairs from
``testing_support/pairs.py`` (chosen = the record's answer, rejected = another answer of the same
question type, whole-answer spans, lesion-noise v'). It is built once per folder and reused.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python bench/x.py` from anywhere: the repo's packages first
    sys.path.insert(0, str(ROOT))

WORLD_VERSION = 2  # bump when build_world changes what it builds
RESULT_PREFIX = "BENCH_RESULT "  # a worker's JSON result is the stdout line with this prefix


# --------------------------------------------------------------------------- machine


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict[str, str]:
    """Versions of the libraries the numbers depend on (missing ones are left out)."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    names = ("torch", "transformers", "peft", "accelerate", "trl", "prefect", "datasets")
    for name in (*names, "opencv-python-headless"):
        with contextlib.suppress(md.PackageNotFoundError):
            out[name] = md.version(name)
    return out


def machine_info() -> dict[str, Any]:
    """CPU, core count, memory, GPU presence and the 1-minute load now."""
    mem = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # pragma: no cover - broken CUDA install
        gpu = None
    return {
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "memory_gib": round(mem / 1024**3, 1),
        "gpu": gpu,
        "platform": platform.platform(),
        "load_1min": os.getloadavg()[0],
    }


# --------------------------------------------------------------------------- memory


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


class PeakMemory:
    """Peak RSS of this process above the RSS at :meth:`reset` (CPU memory: activations,
    gradients, optimizer state all live in RSS). The kernel's high-water mark is reset through
    ``/proc/self/clear_refs`` (Linux >= 4.0); without it the peak includes everything before."""

    def __init__(self) -> None:
        self.baseline = rss_bytes()
        self.reset_ok = False

    def reset(self) -> None:
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.reset_ok = True
        except OSError:
            self.reset_ok = False
        self.baseline = rss_bytes()

    def extra_bytes(self) -> int:
        return max(0, maxrss_bytes() - self.baseline)


# --------------------------------------------------------------------------- results


def emit(result: dict[str, Any]) -> None:
    """Print a worker's result as one prefixed JSON line (what the driver parses)."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def parse_result(stdout: str) -> dict[str, Any]:
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX) :])
    raise ValueError("no BENCH_RESULT line in the worker's output")


def run_worker(
    module: str, args: list[str], timeout: float = 1800, env_extra: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run ``python -m <module> <args>`` in a fresh process from the repo root; its result."""
    import subprocess

    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    env.update(env_extra or {})
    env.setdefault("OMP_NUM_THREADS", "1")
    done = subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"{module} {' '.join(args)} failed:\n{done.stderr[-4000:]}")
    return parse_result(done.stdout)


def median(xs: list[float]) -> float:
    import statistics

    return statistics.median(xs) if xs else float("nan")


# --------------------------------------------------------------------------- the bench world


def build_world(root: Path, n_pairs: int = 64, image_size: int = 64) -> dict[str, Any]:
    """SynthLesion, a tiny LLaVA at the embedded default's size, ``n_pairs`` pairs with v'.

    Cached: a folder with ``world.json`` is reused as is. Returns paths (strings) ``data``,
    ``base``, ``pairs`` (the pairs' data.jsonl; its folder is the corrupt root) and ``n_pairs``.
    """
    root = Path(root)
    info_path = root / "world.json"
    if info_path.is_file():
        info = json.loads(info_path.read_text())
        if info.get("key") == [WORLD_VERSION, n_pairs, image_size]:
            return info
    from testing_support.world import build_world as build_tiny_world

    world = build_tiny_world(
        root,
        data={
            "image_size": image_size,
            "n_train_images": max(8, n_pairs // 2),
            "n_test_images": 16,  # 64 test records: the evaluation throughput
            "questions_per_image": 4,
        },
        # The embedded default's model (configs/default.yaml): hidden 128, 2 layers, patch 16.
        models={"base": {"hidden_size": 128, "patch_size": 16}},
        pairs=n_pairs,
    )
    data, base, pairs = world["data"], world["base"], world["pairs_path"]
    n = sum(1 for _ in pairs.open())
    info = {
        "data": str(data),
        "base": str(base),
        "pairs": str(pairs),
        "n_pairs": n,
        "key": [WORLD_VERSION, n_pairs, image_size],
    }
    info_path.write_text(json.dumps(info))
    return info
