"""Artifact store: content keys, atomic finish, unfinished folders redone, concurrent writers."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from fire_mpo_core.data.records import Rollout
from fire_mpo_core.store import (
    MANIFEST,
    ArtifactStore,
    digest_files,
    is_finished,
    read_jsonl,
    read_manifest,
    stage_key,
)
from testing_support.processes import run_spawned


def _write_one(text: str):
    def fn(w):
        (w.path / "data.jsonl").write_text(text)
        return {"records": 1}

    return fn


def test_run_stage_writes_manifest_and_caches(tmp_path):
    store = ArtifactStore(tmp_path)
    res = store.run_stage(
        run="r",
        round_=0,
        stage="prepare",
        config={"a": 1},
        inputs={},
        code="c1",
        fn=_write_one("x\n"),
    )
    assert not res.cached and res.path.parent == tmp_path / "r" / "round-0" / "prepare"
    m = read_manifest(res.path)
    assert m["key"] == res.key and m["counts"] == {"records": 1, "rejects": 0}
    assert m["content_digest"] == digest_files(res.path)
    assert (res.path / "rejects.jsonl").read_text() == ""
    calls = []
    again = store.run_stage(
        run="r",
        round_=0,
        stage="prepare",
        config={"a": 1},
        inputs={},
        code="c1",
        fn=lambda w: calls.append(1),
    )
    assert again.cached and again.path == res.path and calls == []


def test_key_depends_on_config_code_and_input_content(tmp_path):
    store = ArtifactStore(tmp_path)
    up = store.run_stage(
        run="r", round_=0, stage="prepare", config={}, inputs={}, code="c", fn=_write_one("a\n")
    ).path
    base = stage_key("sft", {"lr": 1}, {"prepare": up}, "c")
    assert stage_key("sft", {"lr": 1}, {"prepare": up}, "c") == base
    assert stage_key("sft", {"lr": 2}, {"prepare": up}, "c") != base
    assert stage_key("sft", {"lr": 1}, {"prepare": up}, "d") != base
    # A different upstream content (same config) changes the downstream key.
    up2 = store.run_stage(
        run="r2", round_=0, stage="prepare", config={}, inputs={}, code="c", fn=_write_one("b\n")
    ).path
    assert stage_key("sft", {"lr": 1}, {"prepare": up2}, "c") != base


def test_failure_leaves_nothing_and_rejects_are_kept(tmp_path):
    store = ArtifactStore(tmp_path)

    def boom(w):
        (w.path / "data.jsonl").write_text("partial")
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        store.run_stage(run="r", round_=1, stage="judge", config={}, inputs={}, code="c", fn=boom)
    root = store.stage_root("r", 1, "judge")
    assert [p for p in root.iterdir() if not p.name.endswith(".lock")] == []

    def with_rejects(w):
        w.reject("rec-7", "missing image")
        return {}

    res = store.run_stage(
        run="r", round_=1, stage="judge", config={}, inputs={}, code="c", fn=with_rejects
    )
    lines = [json.loads(x) for x in (res.path / "rejects.jsonl").read_text().splitlines()]
    assert lines == [{"id": "rec-7", "reason": "missing image"}]
    assert read_manifest(res.path)["counts"]["rejects"] == 1


def test_folder_without_manifest_is_redone(tmp_path):
    store = ArtifactStore(tmp_path)
    res = store.run_stage(
        run="r", round_=0, stage="prepare", config={}, inputs={}, code="c", fn=_write_one("good\n")
    )
    (res.path / MANIFEST).unlink()
    (res.path / "data.jsonl").write_text("half-writ")
    assert not is_finished(res.path)
    again = store.run_stage(
        run="r", round_=0, stage="prepare", config={}, inputs={}, code="c", fn=_write_one("good\n")
    )
    assert not again.cached and (again.path / "data.jsonl").read_text() == "good\n"


def test_unfinished_input_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a finished stage output"):
        stage_key("sft", {}, {"prepare": tmp_path / "nothing"}, "c")


def _concurrent_writer(root: str, tag: str, q) -> None:
    store = ArtifactStore(root)

    def slow(w):
        (w.path / "data.jsonl").write_text("same\n")
        (w.path / f"writer-{tag}").write_text(tag)
        time.sleep(0.5)
        return {}

    res = store.run_stage(
        run="r", round_=0, stage="prepare", config={}, inputs={}, code="c", fn=slow
    )
    q.put((str(res.path), res.cached))


def test_two_processes_same_key_produce_one_result(tmp_path):
    results = run_spawned(_concurrent_writer, [(str(tmp_path), t) for t in "ab"], 60)
    assert len({path for path, _ in results}) == 1
    assert sorted(cached for _, cached in results) == [False, True]
    final = Path(results[0][0])
    assert len(list(final.glob("writer-*"))) == 1  # one writer's files, never a mix
    leftovers = [p for p in final.parent.iterdir() if p.name.startswith(".tmp-")]
    assert leftovers == []


def test_read_jsonl_rejects_bad_lines(tmp_path):
    p = tmp_path / "data.jsonl"
    good = {
        "id": "a#0",
        "record_id": "a",
        "sample_index": 0,
        "question": "q",
        "response": "r",
        "engine": "hf",
        "model_key": "m",
        "seed": 0,
    }
    p.write_bytes(
        (json.dumps(good) + "\n").encode()
        + b"{not json\n"
        + (json.dumps({**good, "id": "b#0", "sample_index": -1}) + "\n").encode()
        + b"\xff\xfe\n"
    )
    rejects = []
    out = list(read_jsonl(p, Rollout, lambda i, r: rejects.append((i, r))))
    assert [r.id for r in out] == ["a#0"]
    assert [i for i, _ in rejects] == ["data.jsonl:2", "b#0", "data.jsonl:4"]
    assert "sample_index" in rejects[1][1]


def test_resumable_stage_keeps_partial_work_across_a_crash(tmp_path):
    store = ArtifactStore(tmp_path)
    attempts = []

    def flaky(w):
        out = w.path / "data.jsonl"
        done = out.read_text().splitlines() if out.exists() else []
        attempts.append(len(done))
        with out.open("a") as f:
            for i in range(len(done), 4):
                f.write(f"row-{i}\n")
                if i == 1 and len(attempts) == 1:
                    f.flush()
                    raise RuntimeError("crash after two rows")
        return {"rows": 4}

    with pytest.raises(RuntimeError):
        store.run_stage(
            run="r",
            round_=1,
            stage="sample",
            config={},
            inputs={},
            code="c",
            fn=flaky,
            resumable=True,
        )
    res = store.run_stage(
        run="r", round_=1, stage="sample", config={}, inputs={}, code="c", fn=flaky, resumable=True
    )
    assert attempts == [0, 2]  # the second attempt found the two rows written before the crash
    assert (res.path / "data.jsonl").read_text().splitlines() == [f"row-{i}" for i in range(4)]
    assert not list(res.path.parent.glob(".partial-*"))


def test_digest_covers_results_not_logs_or_timings(tmp_path):
    """Two runs of one computation differ in event files, logs and timings, never in results."""

    def out(name: str, loss: float, secs: float, host: str) -> Path:
        d = tmp_path / name
        (d / "adapter").mkdir(parents=True)
        (d / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
        (d / "tensorboard").mkdir()
        (d / "tensorboard" / f"events.out.tfevents.{secs}.{host}").write_bytes(host.encode())
        (d / "train.log").write_text(f"took {secs}s on {host}\n")
        (d / "metrics.jsonl").write_text(
            json.dumps({"step": 1, "loss": loss, "pairs_per_s": 1 / secs}) + "\n"
        )
        (d / "metrics.json").write_text(
            json.dumps({"accuracy": loss, "samples_per_second": secs, "seconds": secs}, indent=2)
        )
        (d / "report.md").write_text(f"| accuracy | {loss} |\n| seconds | {secs} |\n")
        return d

    a = digest_files(out("a", 0.5, 1.0, "hostA"))
    assert a == digest_files(out("b", 0.5, 7.5, "hostB"))
    assert a != digest_files(out("c", 0.25, 1.0, "hostA"))  # a result differs
