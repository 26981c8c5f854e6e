"""Concurrency (issue #7, item 4): writers of the same store at once never clobber each other.

Same key: one result, built once, the others return it. Different keys in one stage folder:
each its own result. Two whole cycles on one store at once (slow): both complete, every stage
holds exactly one finished output with files that match its manifest, no working folders left.

    .venv/bin/python -m pytest tests/core/test_concurrency.py -q            # the fast part
    .venv/bin/python -m pytest tests/core/test_concurrency.py -q -m slow    # two cycles at once
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import yaml

from fire_mpo_core.store import ArtifactStore, digest_files, is_finished, read_manifest
from testing_support import REPO
from testing_support.processes import run_spawned


def _writer(root: str, key_tag: str, writer_tag: str, resumable: bool, q) -> None:
    store = ArtifactStore(root)

    def build(w):
        with (w.path / "data.jsonl").open("a") as f:
            for i in range(20):
                f.write(f'{{"id": "{key_tag}-{i}"}}\n')
                f.flush()
                time.sleep(0.005)  # interleave with the other writers
        (w.path / "who").write_text(writer_tag)
        return {"rows": 20}

    res = store.run_stage(
        run="r", round_=1, stage="sample", config={"k": key_tag}, inputs={}, code="c",
        fn=build, resumable=resumable,
    )  # fmt: skip
    q.put((key_tag, str(res.path), res.cached))


@pytest.mark.parametrize("resumable", [False, True], ids=["tmp", "partial"])
def test_same_and_different_keys_at_once_never_clobber(tmp_path, resumable):
    jobs = [("a", "w1"), ("a", "w2"), ("a", "w3"), ("b", "w4"), ("c", "w5")]
    results = run_spawned(_writer, [(str(tmp_path), k, w, resumable) for k, w in jobs], 120)
    by_key: dict[str, set[str]] = {}
    for key, path, _ in results:
        by_key.setdefault(key, set()).add(path)
    assert {k: len(v) for k, v in by_key.items()} == {"a": 1, "b": 1, "c": 1}
    assert sorted(c for k, _, c in results if k == "a") == [False, True, True]  # built once
    root = ArtifactStore(tmp_path).stage_root("r", 1, "sample")
    finished = [p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert len(finished) == 3
    for d in finished:
        m = read_manifest(d)
        assert m["content_digest"] == digest_files(d)
        rows = (d / "data.jsonl").read_text().splitlines()
        key = m["config"]["k"]
        assert rows == [f'{{"id": "{key}-{i}"}}' for i in range(20)]  # one writer's rows, whole
    assert [p.name for p in root.iterdir() if p.is_dir() and p.name.startswith(".")] == []


@pytest.mark.slow
def test_two_full_cycles_on_one_store_at_once(tmp_path):
    from testing_support.cycle import FAULT_CYCLE as CONFIG

    store = tmp_path / "store"
    config = tmp_path / "cycle.yaml"
    config.write_text(yaml.safe_dump({**CONFIG, "store": str(store)}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    code = (
        "from testing_support.cycle import run_cycle_direct; "
        f"print('RESULT', run_cycle_direct({str(config)!r}, reuse=False))"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code],
            cwd=REPO,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=900)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    results = [next(ln for ln in out.splitlines() if ln.startswith("RESULT")) for out in outs]
    assert results[0] == results[1]  # both runs end at the same evaluation folder
    stage_roots = list((store / CONFIG["run"]).glob("round-*/*"))
    assert len(stage_roots) == 9  # 3 setup-round outputs + 6 of round 1
    for root in stage_roots:
        done = [d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")]
        assert len(done) == 1 and is_finished(done[0]), root
        assert read_manifest(done[0])["content_digest"] == digest_files(done[0])
        assert [d.name for d in root.iterdir() if d.is_dir() and d.name.startswith(".")] == []
