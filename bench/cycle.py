"""The pipeline: the full cycle through Prefect vs the same stages called directly, the cached
rerun, and the wall time of one round vs dataset size.

* **Prefect vs direct** (issue #5): the flow ``fire-mpo`` (``flows.full_cycle.fire_mpo``, on
  Prefect's temporary local API, as ``make run`` does) vs :class:`DirectRunner`, which walks the
  same DAG (``flows.full_cycle.run_cycle``) and calls each stage's body through the artifact store
  (``ArtifactStore.run_stage``, the same content keys), with no Prefect at all: no API, no task
  runs, no result persistence, no dashboard artifacts (the bodies' progress / markdown artifacts
  are replaced by no-ops in the direct process only). Each run is a fresh process on a fresh
  store, the two alternated, ``--repeats`` times; the process's whole wall time is compared
  (interpreter start and imports included, as a user sees it).
* **Prefect, served**: the same flow against a Prefect server that is already running (started
  once by this benchmark, as ``make serve`` does for deployments): the per-run cost of the
  temporary API's start-up is gone, what is left is Prefect's own orchestration (task runs,
  states, cache records, results, artifacts).
* **Cached rerun**: the same command again on the finished store (every stage ``Cached``), each
  way.
* **Scaling**: one round (sample -> judge -> corrupt -> reference -> train -> evaluate) at 1x,
  2x, 4x the training data (scans and sampled records scale; the test split is fixed, so the
  evaluation is constant by design), direct calls, per-stage seconds from the manifests.

The cycle config is ``configs/default.yaml`` reduced so that the suite fits its 20-minute budget
on 2 cores (``BENCH_OVERRIDES`` below; the architecture and every stage are the default's).

Run from the repository root::

    .venv/bin/python -m bench.cycle [--quick] [--repeats 2] [--out res.json]
    .venv/bin/python -m bench.cycle --size default --modes served,direct --repeats 1 --scaling ""
    .venv/bin/python -m bench.cycle --worker direct --config c.yaml  # one timed cycle
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from bench.common import ROOT, emit, machine_info, median, run_worker

ROUND_STAGES = ("sample", "judge", "corrupt", "reference", "train", "evaluate")

#: The embedded default, smaller: same model and stages, fewer scans, SFT steps and rollouts.
BENCH_OVERRIDES: dict[str, Any] = {
    "rounds": 1,
    "data": {"n_train_images": 40, "n_val_images": 0, "n_test_images": 20},
    "sft": {"max_steps": 60, "vision_warmup": {"steps": 20, "pretrain_scans": 64}},
    "sample": {"max_records": 80},
    "train": {"epochs": 1.0, "save_every": None},
}
QUICK_OVERRIDES: dict[str, Any] = {
    "rounds": 1,
    "data": {"n_train_images": 24, "n_val_images": 0, "n_test_images": 8},
    "sft": {"max_steps": 40, "vision_warmup": {"steps": 20, "pretrain_scans": 64}},
    "sample": {"max_records": 48, "max_new_tokens": 16},
    "train": {"max_steps": 2, "save_every": None},
    "evaluate": {"max_new_tokens": 16},
}


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(base.get(k, {}), v) if isinstance(v, dict) else v
    return out


def write_config(path: Path, store: Path, overrides: dict[str, Any]) -> Path:
    cfg = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    cfg = _merge(cfg, overrides)
    cfg["store"], cfg["run"] = str(store), "bench"
    path.write_text(yaml.safe_dump(cfg))
    return path


# --------------------------------------------------------------------------- direct calls


class DirectRunner:
    """``run_cycle``'s stage callback without Prefect: every stage is selected and runs its
    body through ``ArtifactStore.run_stage`` under the same content key the task uses."""

    def __init__(self, cfg) -> None:
        from flows.full_cycle import TASKS

        self.cfg, self.tasks = cfg, TASKS
        self.seconds: dict[str, float] = {}
        self.cached: dict[str, bool] = {}

    def __call__(self, stage, round_, config, inputs):
        import torch

        from fire_mpo_core.store import ArtifactStore
        from tasks.common import StageCall

        task = self.tasks[stage]
        body = sys.modules[task.fn.__module__].body
        call = StageCall(
            store=self.cfg.store,
            run=self.cfg.run,
            round=round_,
            stage=stage,
            config=config,
            inputs={k: Path(v) for k, v in inputs.items()},
            threads=self.cfg.num_threads,
        )
        if call.threads:
            torch.set_num_threads(call.threads)
        t0 = time.perf_counter()
        res = ArtifactStore(call.store).run_stage(
            run=call.run,
            round_=round_,
            stage=stage,
            config=config,
            inputs=call.inputs,
            code=task.cache_policy.code,
            fn=lambda w: body(call, w),
            resumable=stage == "train",
        )
        self.seconds[f"{stage}-r{round_}"] = time.perf_counter() - t0
        self.cached[f"{stage}-r{round_}"] = res.cached
        return str(res.path)


def _no_dashboard() -> None:
    """The direct path has no Prefect API: every dashboard-artifact function the stage modules
    imported (progress bars, markdown, tables) becomes a no-op, in those modules only."""
    import flows.full_cycle  # noqa: F401  (imports every stage module)

    def noop(*args, **kwargs):
        return None

    for name, module in list(sys.modules.items()):
        if name == "tasks" or name.startswith("tasks."):
            for attr in dir(module):
                if attr.endswith("_artifact") and attr.split("_", 1)[0] in ("create", "update"):
                    setattr(module, attr, noop)


def worker(args: argparse.Namespace) -> dict:
    t_import = time.perf_counter()
    if args.worker in ("prefect", "served"):  # served: PREFECT_API_URL set by the driver
        from flows.full_cycle import fire_mpo

        metrics = fire_mpo(config=args.config)
        seconds = None
    else:
        from flows.full_cycle import load_cycle_config, run_cycle

        _no_dashboard()
        cfg = load_cycle_config(args.config)
        runner = DirectRunner(cfg)
        evaluation = run_cycle(cfg, runner)
        metrics = str(Path(evaluation) / "metrics.json")
        seconds = runner.seconds
    return {
        "mode": args.worker,
        "in_process_s": time.perf_counter() - t_import,
        "metrics": json.loads(Path(metrics).read_text()),
        "stage_seconds": seconds,
    }


#: PREFECT_API_URL of the server the driver started (the "served" mode).
_SERVED: dict[str, str] = {}


def _timed(mode: str, config: Path) -> dict:
    env = {"PREFECT_API_URL": _SERVED["url"]} if mode == "served" else {}
    t0 = time.perf_counter()
    r = run_worker(
        "bench.cycle", ["--worker", mode, "--config", str(config)], timeout=1800, env_extra=env
    )
    r["process_s"] = time.perf_counter() - t0
    print(f"  {mode}: {r['process_s']:.1f} s", file=sys.stderr, flush=True)
    return r


def _round_seconds(store: Path) -> dict[str, float]:
    """Stage -> seconds of round 1 from the manifests (the stage's own timing)."""
    out = {}
    for m in (store / "bench" / "round-1").glob("*/*/manifest.json"):
        man = json.loads(m.read_text())
        out[man["stage"]] = float(man["seconds"])
    return out


def _round_counts(store: Path) -> dict[str, dict]:
    out = {}
    for m in (store / "bench" / "round-1").glob("*/*/manifest.json"):
        man = json.loads(m.read_text())
        out[man["stage"]] = man.get("counts", {})
    return out


def _scale_row(factor: int, over: dict, stages: dict, counts: dict, process_s: float) -> dict:
    return {
        "factor": factor,
        "train_images": over["data"]["n_train_images"],
        "sampled_records": over["sample"]["max_records"],
        "pairs": counts.get("judge", {}).get("pairs"),
        "round_s": sum(stages.values()),
        "stage_s": stages,
        "process_s": process_s,
    }


def _start_server(base: Path) -> subprocess.Popen:
    """`prefect server start` on a free 127.0.0.1 port (its home in `base`); waits for health."""
    import socket
    import urllib.request

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    prefect = Path(sys.executable).with_name("prefect")
    proc = subprocess.Popen(
        [str(prefect), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 180
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5):
                break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("the benchmark's Prefect server did not start") from None
            time.sleep(1)
    _SERVED["url"] = url
    return proc


def driver(args: argparse.Namespace) -> dict:
    overrides = {"quick": QUICK_OVERRIDES, "bench": BENCH_OVERRIDES, "default": {}}[args.size]
    base = Path(tempfile.mkdtemp(prefix="fire-mpo-bench-cycle-"))
    # Prefect's home (database, logs, results) inside the temporary folder, not the checkout's.
    os.environ["PREFECT_HOME"] = str(base / "prefect-home")
    modes = tuple(args.modes)
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    cached: dict[str, list[dict]] = {m: [] for m in modes}
    server = _start_server(base) if "served" in modes else None
    try:
        for rep in range(args.repeats):
            for mode in modes if rep % 2 == 0 else modes[::-1]:
                store = base / f"{mode}-{rep}"
                config = write_config(base / f"{mode}-{rep}.yaml", store, overrides)
                runs[mode].append(_timed(mode, config))
                if rep == 0:  # the cached rerun, on the store just finished
                    cached[mode].append(_timed(mode, config))
                runs[mode][-1]["round_stage_s"] = _round_seconds(store)
                runs[mode][-1]["round_counts"] = _round_counts(store)
                shutil.rmtree(store, ignore_errors=True)
        scaling = []
        for factor in args.scaling:
            if factor == 1:  # the direct cycle above is the 1x point: same config
                r = runs["direct"][0]
                stages = r["round_stage_s"]
                scaling.append(_scale_row(1, overrides, stages, r["round_counts"], r["process_s"]))
                continue
            over = copy.deepcopy(overrides)
            over["data"]["n_train_images"] = overrides["data"]["n_train_images"] * factor
            over["sample"]["max_records"] = overrides["sample"]["max_records"] * factor
            store = base / f"scale-{factor}"
            config = write_config(base / f"scale-{factor}.yaml", store, over)
            r = _timed("direct", config)
            scaling.append(
                _scale_row(
                    factor, over, _round_seconds(store), _round_counts(store), r["process_s"]
                )
            )
            shutil.rmtree(store, ignore_errors=True)
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.kill()
        shutil.rmtree(base, ignore_errors=True)

    def summary(rs: list[dict]) -> dict:
        return {
            "process_s": median([r["process_s"] for r in rs]),
            "process_s_runs": [r["process_s"] for r in rs],
            "round_stage_s": rs[-1].get("round_stage_s"),
            "closed_accuracy": rs[-1]["metrics"].get("closed_accuracy"),
        }

    return {
        "bench": "cycle",
        "overrides": overrides,
        "repeats": args.repeats,
        "full": {m: summary(rs) for m, rs in runs.items()},
        "cached": {m: summary(rs) for m, rs in cached.items() if rs},
        "scaling": scaling,
        "machine": machine_info(),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=2, help="Prefect/direct pairs of runs")
    ap.add_argument("--scaling", default="1,2,4", help="data-size factors ('' to skip)")
    ap.add_argument("--quick", action="store_true", help="a toy config, 1 repeat, sizes 1,2")
    ap.add_argument(
        "--size",
        choices=["bench", "default", "quick"],
        default="bench",
        help="cycle size: bench (reduced, fits make bench), default (configs/default.yaml)",
    )
    ap.add_argument(
        "--modes", default="prefect,served,direct", help="comma-separated: prefect,served,direct"
    )
    ap.add_argument("--out", type=Path)
    ap.add_argument("--worker", choices=["prefect", "served", "direct"], help=argparse.SUPPRESS)
    ap.add_argument("--config", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        emit(worker(args))
        return
    if args.quick:
        args.repeats, args.scaling, args.size = 1, "1,2", "quick"
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if "direct" not in args.modes:
        ap.error("--modes must include direct (the baseline)")
    args.scaling = [int(x) for x in args.scaling.split(",") if x.strip()]
    result = driver(args)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    emit(result)


if __name__ == "__main__":
    main()
