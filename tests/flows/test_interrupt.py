"""Ctrl-C and killed runs, as a terminal user meets them (`python -m flows.full_cycle`).

A terminal's Ctrl-C is SIGINT to the whole foreground process group: the tests send exactly
that (`os.killpg`) to a cycle started in its own group. The states and the `compute` slot are
read from Prefect's database (the SQLite file in PREFECT_HOME), which is what the next run's
temporary API serves.
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from flows.cli import check_store, preflight
from tasks.runs import process_is_gone
from testing_support import REPO

TINY = {
    "run": "t",
    "rounds": 1,
    "num_threads": 1,
    "data": {
        "n_train_images": 8,
        "n_val_images": 0,
        "n_test_images": 4,
        "questions_per_image": 2,
        "report_fraction": 0.25,
    },
    "model": {"hidden_size": 32, "num_heads": 2, "vocab_size": 300, "patch_size": 16},
    # Long enough to be interrupted in the middle (~15 s on 2 shared cores).
    "sft": {"max_steps": 600, "batch_size": 4, "lr": 3e-3, "include_reports": False},
}


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
    )
    return env


def _start(cfg: Path, env: dict[str, str], log: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "flows.full_cycle", "--config", str(cfg), *extra],
        cwd=REPO,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )


def _wait_for(pred, timeout: float, what: str) -> float:
    t0 = time.monotonic()
    while not pred():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.2)
    return time.monotonic()


def _sft_working(store: Path, old: frozenset[Path] = frozenset()) -> bool:
    """SFT's body has started: a new working folder (so the run holds the compute slot)."""
    return bool(set(store.glob("t/round-0/sft/.tmp-*")) - old)


def _db(home: Path, sql: str) -> list[tuple]:
    con = sqlite3.connect(home / "prefect.db")
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by init) counts as gone
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def _flow_begun(log: Path) -> bool:
    return "Beginning flow run" in log.read_text(errors="replace")


@pytest.mark.slow
def test_ctrl_c_cancels_and_a_killed_run_is_reclaimed(tmp_path):
    home, store = tmp_path / "prefect", tmp_path / "store"
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({**TINY, "store": str(store)}))
    env = _env(home)
    # The `compute` limit as `make serve` registers it, in the same Prefect database.
    subprocess.run(
        [
            sys.executable,
            "-c",
            "from prefect.client.orchestration import get_client\n"
            "with get_client(sync_client=True) as c:\n"
            "    c.create_concurrency_limit(tag='compute', concurrency_limit=1)",
        ],
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
    )

    # 1. One Ctrl-C during SFT: the stage stops, the run is Cancelled, the slot is freed.
    log1 = tmp_path / "run1.log"
    first = _start(cfg, env, log1)
    _wait_for(lambda: _sft_working(store), 240, "run 1 to start SFT")
    time.sleep(2)
    t_int = time.monotonic()
    os.killpg(first.pid, signal.SIGINT)
    assert first.wait(timeout=60) == 130, log1.read_text()[-3000:]
    stop_s = time.monotonic() - t_int
    assert "Cancelled (Ctrl-C)" in log1.read_text()
    assert _db(home, "select state_type from flow_run") == [("CANCELLED",)]
    assert _db(home, "select active_slots from concurrency_limit_v2") == [(0,)]

    # 2. A run killed hard mid-SFT (SIGKILL, as the hung run needed) holds the slot as
    # it dies and leaves its flow run "Running".
    assert not _sft_working(store)  # the cancelled stage removed its working folder
    log2 = tmp_path / "run2.log"
    second = _start(cfg, env, log2)
    begun = _wait_for(lambda: _flow_begun(log2), 240, "run 2 to begin")
    to_sft_2 = _wait_for(lambda: _sft_working(store), 120, "run 2 to start SFT") - begun
    time.sleep(2)
    # The command's own process group (flows/cli.py runs it in a session of its own): the
    # flow process and its temporary API, as the forced second Ctrl-C kills them.
    child = int(subprocess.check_output(["pgrep", "-P", str(second.pid)]).split()[0])
    os.killpg(child, signal.SIGKILL)
    second.wait(timeout=30)
    states = dict(
        _db(home, "select name, state_type from flow_run where state_type != 'CANCELLED'")
    )
    assert list(states.values()) == ["RUNNING"]  # what a kill leaves
    assert _db(home, "select active_slots from concurrency_limit_v2") == [(1,)]

    # 3. The next run marks the dead one Crashed, frees its slot and starts SFT within seconds.
    left = frozenset(store.glob("t/round-0/sft/.tmp-*"))  # the killed run's working folder
    log3 = tmp_path / "run3.log"
    third = _start(cfg, env, log3, "--stages", "prepare,sft")
    begun = _wait_for(lambda: _flow_begun(log3), 240, "run 3 to begin")
    to_sft_3 = _wait_for(lambda: _sft_working(store, left), 60, "run 3 to start SFT") - begun
    assert third.wait(timeout=300) == 0, log3.read_text()[-3000:]
    text = log3.read_text()
    assert re.search(r"left Running by a killed process: Crashed, .*'sft-r0'.* freeing", text), text
    rows = _db(home, "select name, state_type from flow_run")
    assert sorted(s for _, s in rows) == ["CANCELLED", "COMPLETED", "CRASHED"]
    assert _db(home, "select active_slots from concurrency_limit_v2") == [(0,)]
    assert any((store / "t/round-0/sft").glob("*/manifest.json"))
    # Seconds from "Beginning flow run" to the SFT body, with a slot to reclaim (run 3) and
    # after a clean Ctrl-C (run 2); stop time after one Ctrl-C.
    print(f"\nstop after Ctrl-C {stop_s:.1f}s; to SFT: {to_sft_2:.1f}s, {to_sft_3:.1f}s")
    assert to_sft_2 < 20 and to_sft_3 < 20


def test_bad_store_and_config_are_one_line_before_prefect(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"store": str(tmp_path / "store")}))
    assert "not a directory" in check_store(a_file)
    assert "not a directory" in preflight(str(cfg), store=str(a_file))
    assert check_store(tmp_path / "new" / "deeper") is None  # creatable is fine
    assert not (tmp_path / "new").exists()  # ... and the check creates nothing
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"sft": {"lr": -1}}))
    assert "sft.lr" in preflight(str(bad))
    assert "no such file" in preflight(str(tmp_path / "missing.yaml"))

    # The command line: one line on stderr, nothing on stdout, exit 2, in a few seconds.
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "ph")}
    for args, expect in (
        (["--config", str(cfg), "--store", str(a_file)], "is not a directory"),
        (["--config", str(bad)], "sft.lr: Input should be greater than 0"),
        (["--config", str(cfg), "--stages", "polish"], "stages.0"),
    ):
        t0 = time.monotonic()
        r = subprocess.run(
            [sys.executable, "-m", "flows.full_cycle", *args],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
        )
        took = time.monotonic() - t0
        assert r.returncode == 2 and r.stdout == "", r
        assert expect in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) <= 2, r.stderr  # "invalid config X:" + field
        assert took < 8, f"{args}: {took:.1f}s"  # ~2 s; the bound leaves room for a busy box
        print(f"{args[-1]}: {took:.1f}s")
    assert not (tmp_path / "ph").exists()  # Prefect never started


def test_second_ctrl_c_forces(tmp_path):
    """The supervisor passes the first SIGINT on; a child that ignores it dies on the second."""
    code = (
        "import signal, time\n"
        "signal.signal(signal.SIGINT, lambda *a: print('child got SIGINT', flush=True))\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    sup = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from flows.cli import supervise; import sys; sys.exit(supervise(['-c', {code!r}]))",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    assert sup.stdout.readline().strip() == "ready"
    os.killpg(sup.pid, signal.SIGINT)  # the terminal's Ctrl-C: the child is not in this group
    assert sup.stdout.readline().strip() == "child got SIGINT"
    assert sup.poll() is None  # passed on once, the child chose to carry on
    os.killpg(sup.pid, signal.SIGINT)
    assert sup.wait(timeout=10) == 130
    err = sup.stderr.read()
    assert "Ctrl-C again to force" in err and "Forced" in err

    # `kill -9` of the supervisor itself: the child is told (SIGTERM), not left running.
    sup = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from flows.cli import supervise; supervise(['-c', "
            "'import time; print(\"ready\", flush=True); time.sleep(60)'])",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert sup.stdout.readline().strip() == "ready"
    child = int(subprocess.check_output(["pgrep", "-P", str(sup.pid)]).split()[0])
    sup.kill()
    sup.wait()
    _wait_for(lambda: not _alive(child), 10, "the orphaned child to stop")


def test_process_is_gone_only_for_a_dead_pid_of_this_host():
    import socket

    host = socket.gethostname()
    assert not process_is_gone(f"{host}:{os.getpid()}")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert process_is_gone(f"{host}:{dead.pid}")
    assert not process_is_gone(f"another-host:{dead.pid}")  # cannot tell: left alone
    assert not process_is_gone(None) and not process_is_gone("worker-123")


def test_a_wait_for_the_slot_names_its_holder(prefect_harness):
    """While a task holds the only slot of its tag, the message a waiter logs names it."""
    from prefect import flow, task
    from prefect.client.orchestration import get_client

    from tasks.runs import explain_wait

    with get_client(sync_client=True) as client:
        client.create_concurrency_limit(tag="slot-test", concurrency_limit=1)

    @task(name="holder", task_run_name="holder-r0", tags=["slot-test"])
    def holder() -> str | None:
        return explain_wait("slot-test")

    @flow(name="slot-test-flow", flow_run_name="the-holding-run")
    def run() -> str | None:
        return holder()

    assert explain_wait("slot-test") is None  # free
    note = run()
    assert note is not None and "waiting for a 'slot-test' slot (1 of 1 in use)" in note
    # (the task run's name may carry Prefect's suffix when the session has run others)
    assert re.search(r"task run 'holder-\w+' of flow run 'the-holding-run' \(.*Running", note)
    assert explain_wait("slot-test") is None  # released when the task finished
