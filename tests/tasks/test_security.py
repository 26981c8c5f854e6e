"""Security (issue #7, item 5): API keys never reach logs, artifacts, manifests or the dashboard;
nothing from a store or dataset is unpickled; remote code is off unless configured.

The key test plants a recognisable key in the environment, runs the real `sample` (openai
engine) and `judge` (llm judge) stage bodies against fake servers that echo the key back in
their error messages, then greps every file of the store, the captured logs and output, and the
arguments of every dashboard call for it.

    .venv/bin/python -m pytest tests/tasks/test_security.py -q
"""

from __future__ import annotations

import ast
import json
import logging
from pathlib import Path

import pytest

import tasks.common
from fire_mpo_core.config import CycleConfig, ModelConfig, load_config
from fire_mpo_core.store import ArtifactStore
from tasks import judge as judge_task
from tasks import sample as sample_task
from tasks.common import StageCall, publish_summary
from testing_support import REPO
from testing_support.fake_openai import FakeOpenAI, ok, server_error
from testing_support.stage_inputs import GOOD_REPLY, RESPONSE, dataset, finished, png
from testing_support.stage_inputs import record_line as _line

PLANTED = "sk-PLANTED-7f3a9c1e5b2d4f60a8c1"
KEY_ENV = "FIRE_MPO_PLANTED_KEY"


def _run(store, stage, body, config, inputs):
    call = StageCall(store=store.root, run="r", round=1, stage=stage, config=config, inputs=inputs)
    res = store.run_stage(
        run="r", round_=1, stage=stage, config=config, inputs=inputs, code="t",
        fn=lambda w: body(call, w),
    )  # fmt: skip
    publish_summary(call, res)  # the stage's dashboard table, as the Prefect task publishes it
    return res


def test_planted_key_appears_in_no_artifact_log_or_dashboard(tmp_path, monkeypatch, caplog, capfd):
    monkeypatch.setenv(KEY_ENV, PLANTED)
    dashboard: list[str] = []

    def record(*args, **kwargs):  # the Prefect API is external: keep what would be sent
        dashboard.append(json.dumps([args, kwargs], default=str))

    for name in ("create_progress_artifact", "update_progress_artifact", "create_table_artifact"):
        monkeypatch.setattr(tasks.common, name, record)
    caplog.set_level(logging.DEBUG)
    store = ArtifactStore(tmp_path / "store")
    prep = dataset(store, [_line("rec-0")], {"images/rec-0.png": png()})
    policy = finished(store, "policy", lambda p: (p / "policy.json").write_text("{}"))
    with FakeOpenAI(lifetime_s=60) as fake:
        endpoint = {"base_urls": [fake.base_url], "model": "m", "api_key_env": KEY_ENV,
                    "max_retries": 1, "backoff_base_s": 0.01, "backoff_max_s": 0.05}  # fmt: skip
        # One record's endpoint error echoes the key (a proxy quoting the bad credential).
        fake.script(server_error(401, message=f"invalid key {PLANTED}"))
        fake.set_default(ok(RESPONSE))
        sample = _run(
            store, "sample", sample_task.body,
            {"sample": {"engine": "openai", "openai": endpoint}},
            {"prepare": prep, "policy": policy},
        )  # fmt: skip
        fake.script(server_error(500, message=f"upstream said {PLANTED}"))
        fake.set_default(ok(GOOD_REPLY))
        judge = _run(
            store, "judge", judge_task.body,
            {"judge": {"name": "llm", "llm": {"endpoint": {**endpoint, "max_retries": 0}}}},
            {"prepare": prep, "sample": sample.path},
        )  # fmt: skip
        # The key did go to the server, as the bearer token, and only there.
        assert fake.requests[0].headers["authorization"] == f"Bearer {PLANTED}"
    # The echoing errors were hit and became rejects (redacted), the rest went through.
    rejects = (sample.path / "rejects.jsonl").read_text() + (
        judge.path / "rejects.jsonl"
    ).read_text()
    assert "[REDACTED]" in rejects
    assert judge.manifest["counts"]["rollouts"] >= 1
    leaks = [p for p in store.root.rglob("*") if p.is_file() and PLANTED.encode() in p.read_bytes()]
    assert leaks == []
    out, err = capfd.readouterr()
    assert PLANTED not in out + err
    assert PLANTED not in caplog.text
    assert dashboard and not any(PLANTED in d for d in dashboard)


def test_config_errors_and_reprs_never_show_a_key(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text(f"sample:\n  engine: openai\n  openai:\n    api_key_env: {PLANTED}\n")
    with pytest.raises(ValueError) as e:
        load_config(bad)
    assert "api_key_env" in str(e.value) and PLANTED not in str(e.value)


# --------------------------------------------------------------------------- no pickle

_PICKLE_CALLS = {
    ("pickle", "load"), ("pickle", "loads"), ("pickle", "Unpickler"), ("dill", "load"),
    ("joblib", "load"), ("cloudpickle", "load"), ("cloudpickle", "loads"), ("pd", "read_pickle"),
    ("pandas", "read_pickle"),
}  # fmt: skip


def _unsafe_loads(path: Path) -> list[str]:
    """Calls in a source file that could unpickle data: pickle & co., torch.load without
    weights_only=True, numpy.load with allow_pickle=True."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        owner = node.func.value
        name = owner.id if isinstance(owner, ast.Name) else getattr(owner, "attr", "")
        call = (name, node.func.attr)
        kw = {k.arg: k.value for k in node.keywords}
        rel = path.relative_to(REPO) if path.is_relative_to(REPO) else path.name
        where = f"{rel}:{node.lineno}"
        if call in _PICKLE_CALLS:
            found.append(f"{where} {name}.{node.func.attr}")
        elif call == ("torch", "load"):
            wo = kw.get("weights_only")
            if not (isinstance(wo, ast.Constant) and wo.value is True):
                found.append(f"{where} torch.load without weights_only=True")
        elif call in (("np", "load"), ("numpy", "load")):
            ap = kw.get("allow_pickle")
            if isinstance(ap, ast.Constant) and ap.value is True:
                found.append(f"{where} numpy.load(allow_pickle=True)")
    return found


def test_no_code_path_unpickles_store_or_dataset_files():
    files = [p for d in ("fire_mpo_core", "tasks", "flows", "deployments") for p in
             (REPO / d).rglob("*.py")]  # fmt: skip
    assert len(files) > 20
    assert [hit for f in files for hit in _unsafe_loads(f)] == []


def test_the_scanner_finds_unsafe_loads(tmp_path):
    bad = tmp_path / "probe.py"
    bad.write_text(
        "import pickle, torch, numpy as np\n"
        "pickle.load(open('x', 'rb'))\n"
        "torch.load('x')\n"
        "torch.load('x', weights_only=False)\n"
        "torch.load('x', weights_only=True)\n"
        "np.load('x', allow_pickle=True)\n"
    )
    hits = _unsafe_loads(bad)
    assert [h.split(" ", 1)[0].rsplit(":", 1)[1] for h in hits] == ["2", "3", "4", "6"]


def test_checkpoints_and_reference_tables_load_without_pickle():
    # The two binary formats the store holds: safetensors and weights_only torch files.
    src = (REPO / "fire_mpo_core" / "training" / "checkpoint.py").read_text()
    assert "weights_only=True" in src and "safetensors" in src


# --------------------------------------------------------------------------- remote code


def test_trust_remote_code_is_off_unless_configured():
    assert ModelConfig().trust_remote_code is False
    assert CycleConfig().model.trust_remote_code is False
    assert ModelConfig.model_fields["trust_remote_code"].description


def test_trust_remote_code_when_on_is_named_in_the_log(tmp_path, caplog):
    from fire_mpo_core.models import build_tiny_model, load_model, load_processor

    build_tiny_model(
        ModelConfig(hidden_size=32, num_heads=2, vocab_size=280), ["a b"], 64, tmp_path
    )
    with caplog.at_level(logging.WARNING, logger="fire_mpo_core.models.loading"):
        load_model(tmp_path)
        load_processor(tmp_path)
    assert "trust_remote_code" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="fire_mpo_core.models.loading"):
        load_model(tmp_path, trust_remote_code=True)
        load_processor(tmp_path, trust_remote_code=True)
    assert caplog.text.count("trust_remote_code is ON") == 2 and str(tmp_path) in caplog.text


def test_api_key_from_a_prefect_secret_block(prefect_harness, monkeypatch):
    """`api_key_secret` names a Prefect Secret block; the stage layer resolves it, the core
    never sees Prefect, and the key only travels as the bearer token."""
    from prefect.blocks.system import Secret

    import fire_mpo_core.openai_client as oc

    Secret(value=PLANTED).save("fire-mpo-test-key", overwrite=True)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    cfg = oc.OpenAIEndpointConfig(
        base_urls=["http://127.0.0.1:9/v1"], model="m", api_key_env=None,
        api_key_secret="fire-mpo-test-key", max_retries=0,
    )  # fmt: skip
    assert PLANTED not in repr(cfg) and "fire-mpo-test-key" not in repr(cfg)
    with FakeOpenAI(lifetime_s=30) as fake:
        fake.set_default(ok(RESPONSE))
        client = oc.ChatClient(cfg.model_copy(update={"base_urls": [fake.base_url]}))
        client.complete([{"role": "user", "content": "hi"}])
        assert fake.requests[0].headers["authorization"] == f"Bearer {PLANTED}"
    # Without the task layer's resolver, the config is a clear error, not a silent empty key.
    monkeypatch.setattr(oc, "_secret_resolver", None)
    with pytest.raises(ValueError, match="needs a secret store"):
        oc.ChatClient(cfg)
