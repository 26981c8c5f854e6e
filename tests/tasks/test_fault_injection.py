"""Crash safety: every stage is SIGKILLed at named fault points, then rerun (issue #7, item 1).

For each stage a child process runs the real task body (the `run` function of its Prefect task,
with the dashboard calls turned into no-ops: they talk to the Prefect API, which is not under
test) against a store that holds the finished upstream outputs. The child kills itself at the
k-th fault point it passes (``fire_mpo_core.faults``: ``store.read`` / ``store.write`` per
record, ``io.open_image`` per image, ``train.step`` per optimizer step, ``store.before_manifest``,
``store.before_rename`` between manifest and rename, ``store.after_rename``). Then:

* no folder that is not finished is ever read as finished (every non-dot folder of the stage
  has a manifest whose content digest matches its files);
* a rerun without the fault completes;
* its output has the same key and the same bytes as an uninterrupted run (``train``: the same
  adapter bytes; its metrics and TensorBoard files hold timings), and a kill after a
  checkpoint makes ``train`` resume from that checkpoint's step.

Children are forked from one helper process that imported torch, transformers and Prefect once
(importing them takes 10-20 s on a loaded 2-core machine; a fork takes milliseconds).

    .venv/bin/python -m pytest tests/tasks/test_fault_injection.py -q          # 2 kills a stage
    .venv/bin/python -m pytest tests/tasks/test_fault_injection.py -q -m slow  # 20 kills a stage
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fire_mpo_core.store import MANIFEST, digest_files, is_finished, read_manifest
from testing_support import REPO
from testing_support.cycle import FAULT_CYCLE, TRAIN_STEPS, dashboard_silenced, run_one_stage

RUN = FAULT_CYCLE["run"]
CONFIG = FAULT_CYCLE
# Stage and round of every stage output of a one-round cycle, in build order.
STAGES = [
    ("prepare", 0),
    ("sft", 0),
    ("evaluate", 0),
    ("sample", 1),
    ("judge", 1),
    ("corrupt", 1),
    ("reference", 1),
    ("train", 1),
    ("evaluate", 1),
]
# Files whose bytes legitimately differ between two runs of the same stage (timings; and the
# training log's window means: after a resume the first window averages fewer steps, and
# health.json's training numbers are read from that log), and files compared without their
# timing lines.
VOLATILE = {"train": ("tensorboard/", "metrics.jsonl", "health.json")}
TIMING_LINES = {"report.md": re.compile(rb"^.*(per_second|seconds).*$", re.M)}
FAST_KILLS = 2  # per stage in the default suite; the slow suite runs KILLS_PER_STAGE
KILLS_PER_STAGE = 20


# --------------------------------------------------------------------------- the fork server


def _serve() -> None:
    """Helper process: import everything once, then fork one child per job read from stdin.

    A job is a JSON line ``{"config", "stage", "round", "fault", "trace", "log"}``; the answer is
    ``{"status": s}`` with s = the child's exit code, or minus the signal that ended it.
    """
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    import flows.full_cycle  # noqa: F401  (the heavy imports, done once)
    import tasks  # noqa: F401
    from fire_mpo_core import faults

    torch.set_num_threads(1)
    # The dashboard (Prefect API) is an external service here: silenced for every child.
    with dashboard_silenced():
        out = sys.stdout
        for line in sys.stdin:
            job = json.loads(line)
            pid = os.fork()
            if pid == 0:  # the child: run the stage, exit without running the server's cleanup
                code = 1
                try:
                    with open(job["log"], "a") as log:
                        os.dup2(log.fileno(), 1)
                        os.dup2(log.fileno(), 2)
                    faults.configure(job["fault"] or "", job["trace"] or "")
                    run_one_stage(job["config"], job["stage"], job["round"])
                    code = 0
                except BaseException:
                    import traceback

                    traceback.print_exc()
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(code)
            _, status = os.waitpid(pid, 0)
            rc = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
            out.write(json.dumps({"status": rc}) + "\n")
            out.flush()


class ForkServer:
    def __init__(self, workdir: Path):
        self.workdir = workdir
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        env.pop("FIRE_MPO_FAULT", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", "from tests.tasks.test_fault_injection import _serve; _serve()"],
            cwd=REPO,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.jobs = 0

    def run(
        self,
        config: Path,
        stage: str,
        round_: int,
        fault: str | None = None,
        trace: Path | None = None,
    ) -> tuple[int, str]:
        """(status, log text) of one child building (stage, round_)."""
        self.jobs += 1
        log = self.workdir / f"job-{self.jobs}.log"
        job = {
            "config": str(config),
            "stage": stage,
            "round": round_,
            "fault": fault,
            "trace": str(trace) if trace else None,
            "log": str(log),
        }
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"fork server died (exit {self.proc.poll()})")
        text = log.read_text() if log.exists() else ""
        return json.loads(line)["status"], text

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# --------------------------------------------------------------------------- fixtures


def _write_config(path: Path, store: Path) -> Path:
    path.write_text(yaml.safe_dump({**CONFIG, "store": str(store)}))
    return path


def _stage_dir(store: Path, stage: str, round_: int) -> Path:
    (out,) = [p for p in (store / RUN / f"round-{round_}" / stage).iterdir() if is_finished(p)]
    return out


@pytest.fixture(scope="module")
def harness(tmp_path_factory):
    """The fork server and a store holding an uninterrupted run of every stage."""
    work = tmp_path_factory.mktemp("faults")
    server = ForkServer(work)
    # Every run uses the same store path: outputs may name their inputs' absolute paths
    # (adapter_config.json, report.md), so only runs at one path can be compared byte for byte.
    config = _write_config(work / "cycle.yaml", work / "store")
    try:
        for stage, round_ in STAGES:
            status, log = server.run(config, stage, round_)
            assert status == 0, f"baseline {stage} failed:\n{log[-3000:]}"
        os.replace(work / "store", work / "baseline")
        yield server, work, work / "baseline"
    finally:
        server.close()


def _files(folder: Path, stage: str) -> dict[str, bytes]:
    skip = VOLATILE.get(stage, ())
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and rel != MANIFEST and not rel.startswith(skip):
            data = p.read_bytes()
            out[rel] = TIMING_LINES[rel].sub(b"", data) if rel in TIMING_LINES else data
    return out


def _fresh_store(work: Path, baseline: Path, stage: str, round_: int) -> Path:
    """`work/store`: a copy of the baseline store without (stage, round_)'s outputs."""
    store = work / "store"
    shutil.rmtree(store, ignore_errors=True)
    shutil.copytree(baseline, store, ignore=shutil.ignore_patterns("_prefect"))
    shutil.rmtree(store / RUN / f"round-{round_}" / stage)
    return store


def _assert_nothing_half_done_reads_as_finished(store: Path) -> None:
    for stage_root in (store / RUN).glob("round-*/*"):
        for d in stage_root.iterdir():
            if d.name.startswith(".") or not d.is_dir():
                continue  # working folders (.tmp-, .partial-, .old-) and lock files
            assert is_finished(d), f"{d} has no manifest but is not a working folder"
            m = read_manifest(d)
            assert m["content_digest"] == digest_files(d), f"{d}: files differ from its manifest"


def kill_points(trace: list[str], count: int) -> list[int]:
    """`count` kill indices (1-based fault-point hits) over a stage's trace: the hit between
    manifest and rename first, then the ones just before and after it (from 3 kills), the rest
    at the midpoints of equal slices of the whole run."""
    named = ["store.before_rename", "store.before_manifest", "store.after_rename"]
    must = [trace.index(n) + 1 for n in named[: 1 if count < 3 else 3] if n in trace]
    rest = max(0, count - len(must))
    picks = set(must) | {
        min(len(trace), 1 + int((j + 0.5) * len(trace) / rest)) for j in range(rest)
    }
    # Collisions on short traces: fill from the indices not taken yet, from the middle out.
    free = [i for i in range(1, len(trace) + 1) if i not in picks]
    while len(picks) < min(count, len(trace)) and free:
        picks.add(free.pop(len(free) // 2))
    return sorted(picks)


def _expected_resume(trace: list[str], k: int) -> int | None:
    """The step `train` must resume from after a kill at hit k (save_every=1, TRAIN_STEPS)."""
    steps = trace[:k].count("train.step")
    if 0 < steps < TRAIN_STEPS:
        return steps
    if steps == TRAIN_STEPS and trace[k - 1] == "train.step":  # before the final cleanup
        return TRAIN_STEPS - 1
    return None


def _crash_and_rerun(harness, stage: str, round_: int, n_kills: int) -> dict[str, int]:
    server, work, baseline = harness
    tag = f"{stage}-r{round_}"
    want = _stage_dir(baseline, stage, round_)
    want_files = _files(want, stage)

    store = _fresh_store(work, baseline, stage, round_)
    config = work / "cycle.yaml"
    trace_file = work / f"{tag}.trace"
    trace_file.unlink(missing_ok=True)
    status, log = server.run(config, stage, round_, trace=trace_file)
    assert status == 0, log[-3000:]
    trace = trace_file.read_text().splitlines()
    assert "store.before_rename" in trace, "the stage never reached its rename"
    picks = kill_points(trace, n_kills)
    survived = 0
    for k in picks:
        store = _fresh_store(work, baseline, stage, round_)
        status, log = server.run(config, stage, round_, fault=f"*:{k}")
        assert status == -9, f"kill at hit {k} ({trace[k - 1]}) did not kill: {log[-2000:]}"
        _assert_nothing_half_done_reads_as_finished(store)
        status, log = server.run(config, stage, round_)
        assert status == 0, f"rerun after kill at {k} ({trace[k - 1]}) failed:\n{log[-3000:]}"
        got = _stage_dir(store, stage, round_)
        assert got.name == want.name  # the same content key
        got_files = _files(got, stage)
        assert sorted(got_files) == sorted(want_files), f"kill at {k} ({trace[k - 1]})"
        diff = [f for f in want_files if got_files[f] != want_files[f]]
        assert not diff, f"kill at {k} ({trace[k - 1]}): bytes differ in {diff}"
        assert read_manifest(got)["counts"].get("rejects") == read_manifest(want)["counts"].get(
            "rejects"
        )  # nothing lost: every record is either in data or in rejects, as uninterrupted
        if stage == "train":
            resumed = read_manifest(got)["counts"]["resumed_from_step"]
            if trace[k - 1] != "store.after_rename":  # after the rename the rerun is a cache hit
                assert resumed == _expected_resume(trace, k), f"kill at {k} ({trace[k - 1]})"
        _assert_nothing_half_done_reads_as_finished(store)
        survived += 1
    return {"kill_points": survived, "trace_len": len(trace)}


def test_kill_points_are_spread_and_include_the_rename_window():
    trace = ["store.read"] * 30 + ["store.write"] * 10
    trace += ["store.before_manifest", "store.before_rename", "store.after_rename"]
    assert kill_points(trace, 2) == [22, 42]  # mid-run, and between manifest and rename
    picks = kill_points(trace, 6)
    assert len(picks) == 6 and {41, 42, 43} <= set(picks)
    assert kill_points(trace[:5], 20) == [1, 2, 3, 4, 5]  # a short trace: every point once
    assert _expected_resume(["train.step"] * 2 + ["store.write"], 2) == 2
    assert _expected_resume(["train.step"] * TRAIN_STEPS + ["store.write"], TRAIN_STEPS) == 3
    assert _expected_resume(["train.step"] * TRAIN_STEPS + ["store.write"], 5) is None


@pytest.mark.parametrize(("stage", "round_"), STAGES, ids=[f"{s}-r{k}" for s, k in STAGES])
def test_stage_survives_kills(harness, stage, round_):
    counts = _crash_and_rerun(harness, stage, round_, FAST_KILLS)
    assert counts["kill_points"] == FAST_KILLS


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "round_"), STAGES, ids=[f"{s}-r{k}" for s, k in STAGES])
def test_stage_survives_twenty_kills(harness, stage, round_):
    counts = _crash_and_rerun(harness, stage, round_, KILLS_PER_STAGE)
    print(f"\n{stage}-r{round_}: {counts['kill_points']} kill points of {counts['trace_len']}")
    assert counts["kill_points"] == min(KILLS_PER_STAGE, counts["trace_len"])
