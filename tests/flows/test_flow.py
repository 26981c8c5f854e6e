"""The `fire-mpo` flow end to end on a small embedded default, under one Prefect test server."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from fire_mpo_core.policy import adapter_base
from fire_mpo_core.store import input_dirs, read_manifest
from flows.full_cycle import fire_mpo, main
from testing_support.flow_runs import (
    ALL_RUNS,
    CACHED_RUN,
    NEVER_CACHED,
    ROUND_STAGES,
    SMALL,
    task_states,
)


@pytest.fixture()
def small_config(tmp_path: Path) -> Path:
    p = tmp_path / "small.yaml"
    p.write_text(yaml.safe_dump({**SMALL, "store": str(tmp_path / "store")}))
    return p


def _task_states(flow_run_id) -> dict[str, str]:
    return task_states(flow_run_id)


def _artifact(key: str) -> str:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        art = client.read_latest_artifacts()
    (found,) = [a for a in art if a.key == key]
    return found.data


def _run_artifacts(flow_run_id, expect=(), settle_s: float = 30.0) -> dict[str, list[dict]]:
    """Table artifacts created by one flow run (or its task runs), by key. Polls until every
    key of ``expect`` is there (or ``settle_s``): on a loaded machine the API may list an
    artifact a moment after the run that created it returned."""
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    deadline = time.monotonic() + settle_s
    while True:
        with get_client(sync_client=True) as client:
            arts = client.read_artifacts(
                artifact_filter=ArtifactFilter(
                    flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])
                )
            )
        out = {}
        for a in arts:
            if a.type == "table":
                out[a.key] = json.loads(a.data) if isinstance(a.data, str) else a.data
        if set(expect) <= set(out) or time.monotonic() > deadline:
            return out
        time.sleep(0.5)


def test_flow_runs_then_is_entirely_cached(prefect_harness, small_config):
    state = fire_mpo(config=str(small_config), return_state=True)
    assert state.is_completed()
    metrics_path = Path(state.result())
    metrics = json.loads(metrics_path.read_text())
    assert 0.0 <= metrics["closed_accuracy"] <= 1.0 and metrics["n_closed"] > 0
    assert metrics_path.parent.parent.name == "evaluate"
    assert metrics_path.parent.parent.parent.name == "round-1"
    history = (metrics_path.parent / "history.jsonl").read_text().splitlines()
    assert [json.loads(h)["round"] for h in history] == [0, 1]
    first = _task_states(state.state_details.flow_run_id)
    assert sorted(first) == ALL_RUNS
    assert set(first.values()) == {"Completed"}
    # Round 1 sampled from the SFT policy and trained on the corrupted pairs.
    train_dir = input_dirs(metrics_path.parent)["policy"]
    train_inputs = read_manifest(train_dir)["inputs"]
    assert set(train_inputs) == {"prepare", "corrupt", "reference", "policy"}
    assert (train_dir / "adapter" / "adapter_model.safetensors").is_file()
    # The dashboard report: a markdown artifact under the run's stable key.
    report = _artifact("t-report")
    assert "| 0 | SFT base |" in report and "| 1 | round 1 |" in report
    assert "data:image/png;base64," in report and "y+ (chosen):" in report

    again = fire_mpo(config=str(small_config), return_state=True)
    assert Path(again.result()) == metrics_path
    # Every stage Cached; the dashboard report (never cached: it is re-published) Completed.
    assert _task_states(again.state_details.flow_run_id) == CACHED_RUN
    # The cached run still shows every stage's table, once each with its "seconds" row.
    stage_keys = {f"t-r0-{s}" for s in ("prepare", "sft", "evaluate")}
    stage_keys |= {f"t-r1-{s}" for s in ROUND_STAGES}
    tables = _run_artifacts(again.state_details.flow_run_id, expect=stage_keys)
    assert stage_keys <= set(tables)
    sft_rows = tables["t-r0-sft"]
    assert [r["metric"] for r in sft_rows].count("seconds") == 1
    assert {"metric": "cache_hit", "value": True} in sft_rows

    # Deleting one stage's output reruns it, and only it: its content is rebuilt identically, so
    # the downstream keys are unchanged and stay cached.
    judge_dir = input_dirs(train_dir)["corrupt"]
    judge_dir = input_dirs(judge_dir)["judge"]
    shutil.rmtree(judge_dir)
    third = fire_mpo(config=str(small_config), return_state=True)
    states = _task_states(third.state_details.flow_run_id)
    assert {k for k, v in states.items() if v != "Cached"} == {"judge-r1", *NEVER_CACHED}
    assert (judge_dir / "manifest.json").is_file()

    # Editing one stage's config reruns that stage and those after it only.
    cfg = yaml.safe_load(small_config.read_text())
    cfg["train"]["lr"] = 1e-3
    small_config.write_text(yaml.safe_dump(cfg))
    fourth = fire_mpo(config=str(small_config), return_state=True)
    states = _task_states(fourth.state_details.flow_run_id)
    assert {k for k, v in states.items() if v != "Cached"} == {
        "train-r1",
        "evaluate-r1",
        *NEVER_CACHED,
    }

    # Refreshing a deterministic stage rebuilds the same results: its TensorBoard events and
    # timings differ, but they are not in its content digest, so nothing downstream reruns.
    train_r1 = input_dirs(Path(fourth.result()).parent)["policy"]
    before = read_manifest(train_r1)
    assert list(train_r1.glob("tensorboard/**/events.out.tfevents.*"))
    fire_mpo(config=str(small_config), stages=["train"], refresh=True)
    after = read_manifest(train_r1)
    assert after["finished_at"] > before["finished_at"]  # recomputed...
    assert after["content_digest"] == before["content_digest"]  # ... to the same results
    fifth = fire_mpo(config=str(small_config), return_state=True)
    assert _task_states(fifth.state_details.flow_run_id) == CACHED_RUN

    # A store moved elsewhere is found again whole: nothing is recomputed, and no path inside
    # it points back at the old location (manifests, the adapter's base, the report).
    old_store = Path(yaml.safe_load(small_config.read_text())["store"])
    finished = {m: m.stat().st_mtime_ns for m in old_store.rglob("manifest.json")}
    moved = old_store.with_name("moved-store")
    shutil.move(old_store, moved)
    sixth = fire_mpo(config=str(small_config), store=str(moved), return_state=True)
    assert sixth.is_completed()
    for m, mtime in finished.items():
        assert (moved / m.relative_to(old_store)).stat().st_mtime_ns == mtime  # not rebuilt
    new_metrics = Path(sixth.result())
    assert new_metrics.is_relative_to(moved)
    new_train = input_dirs(new_metrics.parent)["policy"]
    assert new_train.is_relative_to(moved) and new_train.is_dir()
    adapter = new_train / "adapter"
    assert not Path(
        json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    ).is_absolute()
    assert Path(adapter_base(adapter)).is_relative_to(moved.resolve())
    assert Path(adapter_base(adapter), "config.json").is_file()
    for f in moved.rglob("*"):
        if f.is_file() and f.suffix in (".json", ".jsonl", ".md") and "_prefect" not in f.parts:
            assert str(old_store) not in f.read_text(errors="ignore"), f


def test_stages_subset_and_missing_inputs(prefect_harness, small_config, tmp_path):
    out = tmp_path / "only-eval"
    with pytest.raises(RuntimeError, match="needs"):
        fire_mpo(config=str(small_config), stages=["evaluate"], store=str(out))


def test_cli_rejects_bad_config_and_stage_names(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sft:\n  lr: -1\n")
    assert main(["--config", str(bad)]) == 2
    assert "sft.lr" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--config", str(bad), "--stages", "prepare,polish"])


def test_prepare_is_byte_identical_across_stores(prefect_harness, small_config, tmp_path):
    digests = []
    for name in ("A", "B"):
        store = tmp_path / name
        fire_mpo(config=str(small_config), stages=["prepare"], store=str(store))
        (out,) = (store / "t" / "round-0" / "prepare").glob("[!.]*")
        digests.append(read_manifest(out)["content_digest"])
        assert (out / "model" / "model.safetensors").is_file()
    assert digests[0] == digests[1]


def test_flow_parameters_are_validated(prefect_harness, small_config):
    from prefect.exceptions import ParameterTypeError

    with pytest.raises(ParameterTypeError, match="rounds"):
        fire_mpo(config=str(small_config), rounds=-1)
    with pytest.raises(ParameterTypeError, match="stages"):
        fire_mpo(config=str(small_config), stages=["polish"])


def test_a_stage_that_fails_once_is_retried_and_the_run_completes(prefect_harness, tmp_path):
    """`sample` through an endpoint that fails one request: with max_reject_fraction 0 the
    stage fails (too many rejects), Prefect retries it, the retry asks only for the missing
    record (the partial folder is resumed) and the run completes."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    from testing_support.fake_openai import FakeOpenAI, ok, server_error

    with FakeOpenAI(lifetime_s=300) as fake:
        fake.script(server_error(500, message="upstream hiccup"))
        fake.set_default(ok("yes"))
        cfg = {
            **SMALL,
            "store": str(tmp_path / "store"),
            "max_reject_fraction": 0.0,
            "sample": {
                "engine": "openai",
                "max_records": 6,
                "openai": {
                    "base_urls": [fake.base_url],
                    "model": "m",
                    "api_key_env": None,
                    "max_retries": 0,
                },
            },
        }
        path = tmp_path / "retry.yaml"
        path.write_text(yaml.safe_dump(cfg))
        state = fire_mpo(config=str(path), stages=["prepare", "sft", "sample"], return_state=True)
        n_requests = len(fake.requests)
    assert state.is_completed()
    assert _task_states(state.state_details.flow_run_id)["sample-r1"] == "Completed"
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[state.state_details.flow_run_id])
            )
        )
    (sample,) = [r for r in runs if r.name == "sample-r1"]
    assert sample.run_count == 2  # failed once, retried once
    assert n_requests == 6 + 1  # six records, plus the one that failed; nothing redone
    (out,) = (tmp_path / "store" / "t" / "round-1" / "sample").glob("[!.]*")
    assert len((out / "data.jsonl").read_text().splitlines()) == 6
