"""The `vllm_server` sampling engine without vLLM: config checks, the server command, adapter
checks, and the server lifecycle (start, health, adapter, sampling, death mid-stage, stop of the
whole process group) against the vLLM variant of ``testing_support/fake_openai.py`` run as a
process, a stand-in that speaks the vLLM OpenAI server's protocol. The same engine on a real
vLLM server: test_vllm_server_real.py.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from pydantic import ValidationError
from safetensors.torch import save_file

from fire_mpo_core.policy import PolicyRef
from fire_mpo_core.sampling import SampleConfig, SampleItem, make_engine, sample_to_file
from fire_mpo_core.sampling.vllm_engine import lora_request_args
from fire_mpo_core.sampling.vllm_server import (
    VLLMServerDied,
    VLLMServerEngine,
    VLLMServerError,
    check_adapter,
    resolve_python,
    server_command,
)
from testing_support import REPO
from testing_support.fake_openai import FakeOpenAI, VLLMModels, ok


def _adapter(path: Path, modules: list[str], r: int = 8, extra: dict | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": r, "lora_alpha": 16, "target_modules": "x"})
    )
    tensors = {}
    for m in modules:
        tensors[f"base_model.model.{m}.lora_A.weight"] = torch.zeros(r, 4)
        tensors[f"base_model.model.{m}.lora_B.weight"] = torch.zeros(4, r)
    tensors.update(extra or {})
    save_file(tensors, str(path / "adapter_model.safetensors"))
    return path


LM_MODULES = [
    "model.text_model.layers.0.self_attn.q_proj",
    "model.text_model.layers.0.mlp.down_proj",
]


def _cfg(**server) -> SampleConfig:
    server.setdefault("python", sys.executable)
    server.setdefault("module", "testing_support.fake_openai")
    env = {"PYTHONPATH": str(REPO), **server.pop("env", {})}
    return SampleConfig(
        engine="vllm_server",
        n=2,
        temperature=0.7,
        max_new_tokens=8,
        vllm={"dtype": "float32", "max_lora_rank": 8},
        vllm_server={"startup_timeout_s": 30, "stop_timeout_s": 5, "env": env, **server},
        openai={"max_concurrency": 2, "max_retries": 1, "backoff_base_s": 0.05, "timeout_s": 5},
    )


def _items(n: int) -> list[SampleItem]:
    im = Image.new("RGB", (8, 8), (10, 20, 30))
    return [SampleItem(f"r{i:03d}", im, f"question {i}") for i in range(n)]


def _gone(pgid: int, within_s: float = 10.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


# --------------------------------------------------------------------------- config


def test_config_fails_fast_naming_the_field():
    with pytest.raises(ValidationError, match=r"openai.base_urls"):
        SampleConfig(engine="vllm_server", openai={"base_urls": ["http://h:1/v1"], "model": "m"})
    with pytest.raises(ValidationError, match=r"max_lora_rank"):
        SampleConfig(engine="vllm_server", vllm={"max_lora_rank": 12})
    with pytest.raises(ValidationError, match=r"lora_loading"):
        SampleConfig(
            engine="vllm_server",
            vllm_server={"base_url": "http://h:8000", "lora_loading": "startup"},
        )
    with pytest.raises(ValidationError, match=r"base_url"):
        SampleConfig(engine="vllm_server", vllm_server={"base_url": "gpu1:8000"})
    with pytest.raises(ValidationError, match=r"extra_fied|Extra inputs"):
        SampleConfig(engine="vllm_server", vllm_server={"extra_fied": 1})
    with pytest.raises(ValidationError, match=r"variable names"):
        SampleConfig(engine="vllm_server", vllm_server={"env": {"A B": "1"}})
    # The default is valid, and the offline engine is not held to vLLM's rank list.
    SampleConfig(engine="vllm_server")
    SampleConfig(engine="hf", vllm={"max_lora_rank": 12})


def test_missing_vllm_python_names_the_field_and_make_target(tmp_path):
    with pytest.raises(VLLMServerError, match=r"sample\.vllm_server\.python.*make vllm-cpu"):
        resolve_python(str(tmp_path / "nope" / "python"))
    with pytest.raises(VLLMServerError, match=r"vllm_server.python"):
        make_engine(_cfg(python="no-such-venv/bin/python"), PolicyRef(base="b"))
    assert resolve_python(sys.executable) == Path(sys.executable)


# --------------------------------------------------------------------------- command


def test_server_command_with_adapter_at_startup(tmp_path):
    adapter = str(_adapter(tmp_path / "a", LM_MODULES))
    policy = PolicyRef(base="/m/base", adapter=adapter)
    cfg = _cfg(extra_args=["--enforce-eager"])
    argv, name = server_command(cfg, policy, "/venv/bin/python", 8123)
    assert argv[:5] == [
        "/venv/bin/python",
        "-m",
        "testing_support.fake_openai",
        "--model",
        "/m/base",
    ]
    assert name == lora_request_args(policy)[0]
    joined = " ".join(argv)
    for part in [
        "--host 127.0.0.1",
        "--port 8123",
        "--served-model-name base",
        "--dtype float32",
        "--seed 0",
        "--enable-lora",
        "--max-lora-rank 8",
        f"--lora-modules {name}={adapter}",
        '--limit-mm-per-prompt {"image": 1}',
    ]:
        assert part in joined, part
    assert argv[-1] == "--enforce-eager"
    assert "--enable-tower-connector-lora" not in argv


def test_server_command_runtime_loading_and_no_adapter(tmp_path):
    adapter = str(_adapter(tmp_path / "a", LM_MODULES))
    cfg = _cfg(lora_loading="runtime", enable_tower_connector_lora=True)
    argv, name = server_command(cfg, PolicyRef(base="b", adapter=adapter), "py", 1)
    assert name is None and "--lora-modules" not in argv
    assert "--enable-lora" in argv and "--enable-tower-connector-lora" in argv
    argv, name = server_command(_cfg(), PolicyRef(base="b"), "py", 1)
    assert name is None and "--enable-lora" not in argv


# --------------------------------------------------------------------------- adapter checks


def test_check_adapter(tmp_path):
    ok = check_adapter(_adapter(tmp_path / "ok", LM_MODULES), max_lora_rank=8)
    assert ok == {"rank": 8, "modules": 2, "vision_modules": 0}
    vision = _adapter(tmp_path / "v", [*LM_MODULES, "model.vision_model.encoder.layers.0.fc1"])
    with pytest.raises(VLLMServerError, match=r"outside the language model.*scope"):
        check_adapter(vision, max_lora_rank=8)
    assert check_adapter(vision, max_lora_rank=8, tower_lora=True)["vision_modules"] == 1
    with pytest.raises(VLLMServerError, match=r"max_lora_rank=8"):
        check_adapter(_adapter(tmp_path / "big", LM_MODULES, r=16), max_lora_rank=8)
    saved = {"base_model.model.lm_head.weight": torch.zeros(2, 2)}
    with pytest.raises(VLLMServerError, match=r"modules_to_save"):
        check_adapter(_adapter(tmp_path / "s", LM_MODULES, extra=saved), max_lora_rank=8)
    with pytest.raises(VLLMServerError, match=r"not a peft LoRA adapter"):
        check_adapter(tmp_path / "missing", max_lora_rank=8)


# --------------------------------------------------------------------------- lifecycle


def test_managed_server_samples_the_adapter_and_is_stopped(tmp_path):
    adapter = str(_adapter(tmp_path / "a", LM_MODULES))
    policy = PolicyRef(base="/m/base", adapter=adapter)
    log = tmp_path / "server.log"
    engine = make_engine(_cfg(), policy, model_key="k", log_path=log)
    assert isinstance(engine, VLLMServerEngine)
    with engine:
        rows = list(engine.sample(_items(5)))
        pgid = engine.server.pgid
        assert engine.server.group_alive()
    name = lora_request_args(policy)[0]
    assert [r.id for r in rows] == [f"r{i:03d}#{k}" for i in range(5) for k in range(2)]
    assert {r.response.split("|")[0] for r in rows} == {name}  # every request used the adapter
    assert rows[3].response == f"{name}|question 1|1"
    assert {r.engine for r in rows} == {"vllm_server"} and {r.model_key for r in rows} == {"k"}
    assert engine.info["model"] == name and engine.info["managed"] is True
    assert engine.info["server_start_s"] > 0 and "adapter_load_s" not in engine.info
    assert _gone(pgid), "a process of the server's group is still running"
    assert "--lora-modules" in log.read_text()


def test_round_one_samples_the_base(tmp_path):
    with make_engine(_cfg(), PolicyRef(base="/m/base")) as engine:
        rows = list(engine.sample(_items(2)))
    assert rows[0].response == "base|question 0|0"
    assert "adapter_load_s" not in engine.info


def test_runtime_adapter_loading(tmp_path):
    adapter = str(_adapter(tmp_path / "a", LM_MODULES))
    policy = PolicyRef(base="/m/base", adapter=adapter)
    with make_engine(_cfg(lora_loading="runtime"), policy) as engine:
        rows = list(engine.sample(_items(2)))
    assert rows[0].response.startswith(lora_request_args(policy)[0] + "|")
    assert engine.info["adapter_load_s"] >= 0


def test_server_that_exits_at_start_fails_with_its_log(tmp_path):
    cfg = _cfg(env={"FAKE_VLLM_EXIT_AT_START": "2"})
    engine = make_engine(cfg, PolicyRef(base="b"), log_path=tmp_path / "s.log")
    with pytest.raises(VLLMServerError, match=r"exited with code 2(?s:.*)something is wrong"):
        list(engine.sample(_items(1)))
    assert engine.server is not None and not engine.server.group_alive()


def test_startup_timeout_stops_the_server(tmp_path):
    cfg = _cfg(startup_timeout_s=1.0, env={"FAKE_VLLM_START_DELAY": "30"})
    engine = make_engine(cfg, PolicyRef(base="b"), log_path=tmp_path / "s.log")
    with pytest.raises(VLLMServerError, match=r"not ready after 1 s.*startup_timeout_s"):
        list(engine.sample(_items(1)))
    assert _gone(engine.server.pgid)


def test_stop_kills_a_server_that_ignores_sigterm():
    cfg = _cfg(stop_timeout_s=1.0, env={"FAKE_VLLM_IGNORE_TERM": "1"})
    engine = make_engine(cfg, PolicyRef(base="b"))
    with engine:
        list(engine.sample(_items(1)))
        pgid = engine.server.pgid
    assert _gone(pgid)


def test_server_killed_mid_stage_fails_the_attempt_and_the_rerun_resumes(tmp_path):
    out = tmp_path / "rollouts.jsonl"
    cfg = _cfg(env={"FAKE_VLLM_DIE_AFTER": "6", "FAKE_VLLM_REPLY_DELAY": "0.02"})
    engine = make_engine(cfg, PolicyRef(base="b"), log_path=tmp_path / "s.log")
    with pytest.raises(VLLMServerDied, match=r"went away while sampling.*resumes"):
        try:
            sample_to_file(engine, _items(20), out)
        finally:
            engine.close()
    assert _gone(engine.server.pgid)
    written = [json.loads(line)["record_id"] for line in out.read_text().splitlines()]
    assert 0 < len(set(written)) < 20  # some records done, none rejected
    # The retry: a new server, and only the missing records are sampled.
    with make_engine(_cfg(), PolicyRef(base="b")) as engine2:
        stats = sample_to_file(engine2, _items(20), out)
    assert stats.skipped + stats.records == 20 and stats.rejected == 0
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert ids == [f"r{i:03d}#{k}" for i in range(20) for k in range(2)]


def test_ctrl_c_stops_the_server(tmp_path):
    cfg = _cfg(env={"FAKE_VLLM_REPLY_DELAY": "0.05"})
    engine = make_engine(cfg, PolicyRef(base="b"))
    started = threading.Event()

    def interrupt():
        started.wait(20)
        time.sleep(0.2)
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    threading.Thread(target=interrupt, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        try:
            for _ in engine.sample(_items(200)):
                started.set()
        finally:
            engine.close()
    assert _gone(engine.server.pgid)


def test_attached_server_gets_the_adapter_loaded_and_unloaded(tmp_path):
    """An attached server (here the real protocol's stand-in) is never started or stopped: the
    engine loads the round's adapter at runtime, samples it and unloads it."""
    adapter = str(_adapter(tmp_path / "a", LM_MODULES))
    policy = PolicyRef(base="/m/base", adapter=adapter)
    name = lora_request_args(policy)[0]
    cfg = _cfg(env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"})
    with make_engine(cfg, PolicyRef(base="/m/base")) as host:  # someone else's server
        host.start()
        url = host.info["url"]
        attached = _cfg(base_url=url + "/v1")
        with make_engine(attached, policy) as engine:
            assert engine.server is None
            rows = list(engine.sample(_items(2)))
            listed = engine.info
        assert rows[0].response == f"{name}|question 0|0"
        assert listed["managed"] is False and listed["adapter_load_s"] >= 0
        import httpx

        models = [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]]
        assert models == ["base"]  # unloaded again; the server itself still runs
        assert host.healthy()


def test_attached_server_without_runtime_lora_says_how_to_start_it(tmp_path):
    adapter = str(_adapter(tmp_path / "a", LM_MODULES))
    with make_engine(_cfg(), PolicyRef(base="/m/base")) as host:
        host.start()
        cfg = _cfg(base_url=host.info["url"])
        engine = make_engine(cfg, PolicyRef(base="/m/base", adapter=adapter))
        with pytest.raises(VLLMServerError, match=r"VLLM_ALLOW_RUNTIME_LORA_UPDATING"):
            list(engine.sample(_items(1)))


def test_attached_server_that_is_not_there(tmp_path):
    with FakeOpenAI() as fake:  # answers chat, but has no /health: not a vLLM server
        cfg = _cfg(base_url=fake.base_url, startup_timeout_s=1.0)
        engine = make_engine(cfg, PolicyRef(base="b"))
        with pytest.raises(VLLMServerError, match=r"no vLLM server answers.*base_url"):
            list(engine.sample(_items(1)))


@pytest.mark.parametrize("profile", sorted((REPO / "configs" / "gpu").glob("*.yaml")))
def test_gpu_profiles_switch_to_server_mode(profile):
    """Each GPU profile's sample section is valid with engine vllm_server, and its server
    command carries the profile's engine options and the round's adapter."""
    from fire_mpo_core.config import load_config

    cfg = load_config(profile)
    sample = SampleConfig.model_validate({**cfg.sample.model_dump(), "engine": "vllm_server"})
    policy = PolicyRef(base=cfg.model.name_or_path, adapter="/store/round-1/train/k/adapter")
    argv, name = server_command(sample, policy, ".venv-vllm/bin/python", 8000)
    joined = " ".join(argv)
    assert f"--model {cfg.model.name_or_path}" in joined
    assert f"--max-lora-rank {sample.vllm.max_lora_rank}" in joined
    assert f"--lora-modules {name}=/store/round-1/train/k/adapter" in joined
    assert f"--dtype {sample.vllm.dtype}" in joined


def test_engine_usage_counts_requests_and_tokens_and_outlives_close():
    """The sample stage reads the engine's usage after closing it (the server is gone by then)."""
    models = VLLMModels(base="base")
    with FakeOpenAI(vllm=models, default=ok("x y", tokens=(11, 4))) as fake:
        engine = make_engine(_cfg(base_url=fake.base_url), PolicyRef(base="b"))
        with engine:
            rows = list(engine.sample(_items(3)))
        used = engine.usage.snapshot()
    assert len(rows) == 6 and engine.uses_endpoint
    # 3 records, one request each for its n = 2 answers.
    assert (used.requests, used.failed_requests, used.retries) == (3, 0, 0)
    assert (used.prompt_tokens, used.completion_tokens) == (33, 12)
