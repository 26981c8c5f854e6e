"""Sampling engines: config validation, the openai engine end to end against a fake OpenAI server
(retries, timeouts, rejects, concurrency, fan-out), resumable writing, the hf engine on a tiny
model built in a temporary folder, and the vllm engine's import error and prompt building."""

from __future__ import annotations

import base64
import io
import json
import logging
import time

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from fire_mpo_core.config import ModelConfig
from fire_mpo_core.data.records import Rollout
from fire_mpo_core.models import build_prompts, build_tiny_model, load_processor
from fire_mpo_core.openai_client import ChatClient, OpenAIEndpointConfig, backoff_delay
from fire_mpo_core.policy import PolicyRef
from fire_mpo_core.sampling import (
    ENGINES,
    Reject,
    SampleConfig,
    SampleItem,
    derive_seed,
    make_engine,
    sample_to_file,
)
from fire_mpo_core.sampling.openai_engine import OpenAIEngine
from fire_mpo_core.sampling.vllm_engine import VLLM_MISSING, VLLMEngine, build_vllm_inputs
from testing_support.fake_openai import (
    FakeOpenAI,
    drop,
    hang,
    malformed,
    ok,
    rate_limited,
    server_error,
)

KEY = "sk-test-0123456789abcdef"
KEY_ENV = "FIRE_MPO_TEST_KEY"


@pytest.fixture
def fake(fake_openai):
    return fake_openai


@pytest.fixture
def key_env(monkeypatch):
    monkeypatch.setenv(KEY_ENV, KEY)
    return KEY_ENV


def _image(seed: int, size: int = 16) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


def _items(n: int, size: int = 16) -> list[SampleItem]:
    return [SampleItem(f"rec{i}", _image(i, size), f"question {i}?") for i in range(n)]


def _cfg(urls: list[str], key_env: str | None = KEY_ENV, **kw) -> SampleConfig:
    endpoint = {
        "base_urls": urls,
        "model": "policy-model",
        "api_key_env": key_env,
        "timeout_s": 0.2,
        "max_retries": 2,
        "backoff_base_s": 0.01,
        "backoff_max_s": 0.2,
        "max_concurrency": kw.pop("max_concurrency", 4),
    }
    return SampleConfig(engine="openai", openai=endpoint, **kw)


def _rows(engine, items) -> tuple[list[Rollout], list[Reject]]:
    out = list(engine.sample(items))
    return [r for r in out if isinstance(r, Rollout)], [r for r in out if isinstance(r, Reject)]


# --------------------------------------------------------------------------- config


def test_config_openai_needs_urls_and_model_naming_both():
    with pytest.raises(ValidationError) as e:
        SampleConfig(engine="openai")
    assert "openai.base_urls" in str(e.value) and "openai.model" in str(e.value)


def test_config_greedy_with_several_samples_names_both_fields():
    with pytest.raises(ValidationError) as e:
        SampleConfig(temperature=0, n=3)
    assert "temperature=0" in str(e.value) and "n=3" in str(e.value)


def test_config_rejects_a_key_in_api_key_env_without_echoing_it():
    from fire_mpo_core.config import _format_errors  # how load_config reports errors

    with pytest.raises(ValidationError) as e:
        OpenAIEndpointConfig(base_urls=["http://x/v1"], model="m", api_key_env=KEY)
    assert "NAME of an environment variable" in str(e.value)
    assert KEY not in str(e.value)
    with pytest.raises(ValidationError) as e:
        SampleConfig(openai={"api_key_env": KEY})
    assert KEY not in str(e.value) and KEY not in _format_errors(e.value, "cfg.yaml")
    assert KEY not in repr(OpenAIEndpointConfig(api_key_env="MY_KEY_VAR"))


def test_config_backoff_bounds_and_extra_keys():
    with pytest.raises(ValidationError, match=r"backoff_max_s .* backoff_base_s"):
        OpenAIEndpointConfig(backoff_base_s=2.0, backoff_max_s=1.0)
    with pytest.raises(ValidationError):
        SampleConfig(engine="hf", samples=3)  # typo of n
    assert set(ENGINES) == {"hf", "vllm", "vllm_server", "openai"}


def test_backoff_delay_is_jittered_exponential_capped_and_honours_retry_after():
    import random

    rng = random.Random(0)
    # retry k: d = min(max, base * 2^k), delay uniform in [d/2, d]
    for k, d in [(0, 0.1), (1, 0.2), (2, 0.4), (5, 1.0)]:
        v = backoff_delay(k, 0.1, 1.0, rng=rng)
        assert d / 2 <= v <= d
    assert backoff_delay(0, 0.1, 1.0, retry_after=0.7, rng=rng) == 0.7  # floor
    assert backoff_delay(0, 0.1, 1.0, retry_after=30.0, rng=rng) == 1.0  # capped


def test_missing_key_env_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("FIRE_MPO_UNSET_KEY", raising=False)
    cfg = OpenAIEndpointConfig(
        base_urls=["http://x/v1"], model="m", api_key_env="FIRE_MPO_UNSET_KEY"
    )
    with pytest.raises(ValueError, match="FIRE_MPO_UNSET_KEY"):
        ChatClient(cfg)


# --------------------------------------------------------------------------- openai engine


def test_openai_engine_ok_sends_image_model_n_and_auth(fake, key_env, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    items = _items(3)
    engine = make_engine(_cfg([fake.base_url], n=2, seed=7), None)
    fake.set_default(ok(["answer a", "answer b"]))
    rollouts, rejects = _rows(engine, items)

    assert not rejects
    assert [r.id for r in rollouts] == [f"rec{i}#{k}" for i in range(3) for k in range(2)]
    assert [r.response for r in rollouts[:2]] == ["answer a", "answer b"]
    assert {(r.engine, r.model_key, r.seed) for r in rollouts} == {("openai", "policy-model", 7)}
    assert rollouts[0].question == "question 0?"

    reqs = sorted(fake.requests, key=lambda r: r.body["messages"][0]["content"][1]["text"])
    assert len(reqs) == 3
    body = reqs[0].body
    assert body["model"] == "policy-model" and body["n"] == 2
    # Each record's request has its own seed, from the config seed and the record id.
    assert body["seed"] == derive_seed(7, ["rec0", "0"]) != derive_seed(7, ["rec1", "0"])
    assert body["temperature"] == 0.7 and body["top_p"] == 0.95 and body["max_tokens"] == 48
    image_part, text_part = body["messages"][0]["content"]
    assert text_part == {"type": "text", "text": "question 0?"}
    url = image_part["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    decoded = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert np.array_equal(np.asarray(decoded), np.asarray(items[0].image))  # lossless PNG
    assert reqs[0].headers["authorization"] == f"Bearer {KEY}"
    # The key travels in the header only: never in logs or printed output.
    out = capsys.readouterr()
    assert KEY not in caplog.text and KEY not in out.out + out.err


def test_openai_engine_429_is_retried_after_retry_after(fake, key_env):
    fake.script(rate_limited(0.15), ok("fine"))
    engine = make_engine(_cfg([fake.base_url]), None)
    rollouts, rejects = _rows(engine, _items(1))
    assert [r.response for r in rollouts] == ["fine"] and not rejects
    t0, t1 = (r.t for r in fake.requests)
    assert t1 - t0 >= 0.15  # waited as asked, although backoff_base_s is 0.01


@pytest.mark.parametrize("failure", [server_error(500), server_error(503), drop(), malformed()])
def test_openai_engine_transient_failures_are_retried(fake, key_env, failure):
    fake.script(failure, ok("recovered"))
    rollouts, rejects = _rows(make_engine(_cfg([fake.base_url]), None), _items(1))
    assert [r.response for r in rollouts] == ["recovered"] and not rejects
    assert len(fake.requests) == 2


def test_openai_engine_timeout_becomes_reject_after_max_retries(fake, key_env):
    # rec0 hangs on all 3 attempts (max_retries=2); rec1 is fine: the stage goes on.
    fake.script(hang(1.0), hang(1.0), hang(1.0))
    engine = make_engine(_cfg([fake.base_url], max_concurrency=1), None)
    t = time.monotonic()
    rollouts, rejects = _rows(engine, _items(2))
    assert time.monotonic() - t < 3.0
    assert [r.id for r in rejects] == ["rec0"]
    assert "gave up after 3 attempts" in rejects[0].reason and "timed out" in rejects[0].reason
    assert [r.id for r in rollouts] == ["rec1#0"]
    assert len(fake.requests) == 4


def test_openai_engine_permanent_error_rejects_at_once_with_key_redacted(fake, key_env):
    fake.script(server_error(401, message=f"Incorrect API key provided: {KEY}"))
    rollouts, rejects = _rows(make_engine(_cfg([fake.base_url]), None), _items(1))
    assert not rollouts and len(fake.requests) == 1
    assert "HTTP 401" in rejects[0].reason
    assert KEY not in rejects[0].reason and "[REDACTED]" in rejects[0].reason


def test_openai_engine_asks_again_when_fewer_choices_than_n(fake, key_env):
    fake.script(ok(["one"]), ok(["two"]), ok(["three"]))
    rollouts, _ = _rows(make_engine(_cfg([fake.base_url], n=3), None), _items(1))
    assert [r.response for r in rollouts] == ["one", "two", "three"]
    assert [r.body["n"] for r in fake.requests] == [3, 2, 1]


def test_openai_engine_greedy_sends_no_top_p(fake, key_env):
    _rows(make_engine(_cfg([fake.base_url], temperature=0.0), None), _items(1))
    body = fake.requests[0].body
    assert body["temperature"] == 0.0 and "top_p" not in body


def test_openai_engine_respects_the_concurrency_bound_and_keeps_order(fake, key_env):
    fake.set_default(ok(lambda body: body["messages"][0]["content"][1]["text"], delay_s=0.1))
    engine = make_engine(_cfg([fake.base_url], max_concurrency=3), None)
    t = time.monotonic()
    rollouts, _ = _rows(engine, _items(12))
    elapsed = time.monotonic() - t
    assert fake.max_in_flight == 3  # reached, never exceeded
    assert [r.response for r in rollouts] == [f"question {i}?" for i in range(12)]
    assert elapsed < 12 * 0.1  # concurrent: about 4 rounds of 0.1 s, not 12


def test_openai_engine_fans_out_round_robin_over_endpoints(key_env):
    with FakeOpenAI(lifetime_s=60) as a, FakeOpenAI(lifetime_s=60) as b:
        engine = make_engine(_cfg([a.base_url, b.base_url], max_concurrency=2), None)
        rollouts, _ = _rows(engine, _items(6))
        assert len(rollouts) == 6
        assert len(a.requests) == 3 and len(b.requests) == 3
        # A retry moves on to the next endpoint: a fails once, b answers.
        a.script(server_error(500))
        before_b = len(b.requests)
        engine2 = OpenAIEngine(_cfg([a.base_url, b.base_url], max_concurrency=1))
        rollouts, rejects = _rows(engine2, _items(1))
        assert len(rollouts) == 1 and not rejects and len(b.requests) == before_b + 1


def test_openai_engine_no_auth_header_value_when_no_key(fake, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)  # must not be picked up implicitly
    _rows(make_engine(_cfg([fake.base_url], key_env=None), None), _items(1))
    assert KEY not in fake.requests[0].headers.get("authorization", "")


# --------------------------------------------------------------------------- resumable writer


def _read(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sample_to_file_resumes_record_by_record(fake, key_env, tmp_path):
    engine = make_engine(_cfg([fake.base_url], n=2), None)
    out = tmp_path / "rollouts.jsonl"
    items = _items(5)

    s1 = sample_to_file(engine, items[:3], out)
    assert (s1.records, s1.rollouts, s1.skipped) == (3, 6, 0)
    assert len(fake.requests) == 3

    s2 = sample_to_file(engine, items, out)  # same file: only rec3, rec4 are new
    assert (s2.records, s2.skipped) == (2, 3)
    assert len(fake.requests) == 5
    ids = [r["id"] for r in _read(out)]
    assert sorted(ids) == sorted(f"rec{i}#{k}" for i in range(5) for k in range(2))

    s3 = sample_to_file(engine, items, out, done_ids=["rec0"])
    assert (s3.records, s3.skipped) == (0, 5) and len(fake.requests) == 5


def test_sample_to_file_repairs_a_crash_mid_record(fake, key_env, tmp_path):
    engine = make_engine(_cfg([fake.base_url], n=2), None)
    out = tmp_path / "rollouts.jsonl"
    sample_to_file(engine, _items(2), out)
    lines = out.read_text().splitlines(keepends=True)
    # A crash after rec1's first row and half of its second: rec1 must be redone whole.
    out.write_text("".join(lines[:3]) + lines[3][:10])
    stats = sample_to_file(engine, _items(2), out)
    assert stats.repaired == 2 and stats.records == 1 and stats.skipped == 1
    rows = _read(out)
    assert sorted(r["id"] for r in rows) == ["rec0#0", "rec0#1", "rec1#0", "rec1#1"]


def test_sample_to_file_rejects_go_to_on_reject_and_are_retried_later(fake, key_env, tmp_path):
    engine = make_engine(_cfg([fake.base_url]), None)
    out = tmp_path / "rollouts.jsonl"
    fake.script(server_error(400))
    got: list[tuple[str, str]] = []
    stats = sample_to_file(engine, _items(2)[:1], out, on_reject=lambda i, r: got.append((i, r)))
    assert stats.rejected == 1 and got[0][0] == "rec0" and "HTTP 400" in got[0][1]
    assert not out.read_text()
    stats = sample_to_file(engine, _items(2)[:1], out)
    assert stats.records == 1


def test_images_load_lazily_and_bad_images_reject_their_record(fake, key_env, tmp_path):
    calls: list[str] = []

    def loader(i: int):
        def load() -> Image.Image:
            calls.append(f"rec{i}")
            if i == 1:
                raise OSError("cannot identify image file")
            return _image(i)

        return load

    items = [SampleItem(f"rec{i}", loader(i), "q?") for i in range(3)]
    out = tmp_path / "rollouts.jsonl"
    engine = make_engine(_cfg([fake.base_url]), None)
    got: list[str] = []
    sample_to_file(engine, items, out, done_ids=["rec2"], on_reject=lambda i, r: got.append(r))
    assert sorted(calls) == ["rec0", "rec1"]  # rec2 was skipped before its image was read
    assert len(got) == 1 and "cannot identify image file" in got[0]


# --------------------------------------------------------------------------- hf engine

_TEXTS = [
    "is there a lesion in the left lung?",
    "yes",
    "no",
    "the lesion is in the upper right",
    "a small round hyperdense lesion is seen",
] * 4


@pytest.fixture(scope="module")
def tiny_policy(tmp_path_factory) -> PolicyRef:
    root = tmp_path_factory.mktemp("tiny")
    cfg = ModelConfig(
        hidden_size=64,
        num_layers=1,
        num_heads=2,
        vision_hidden_size=32,
        vision_layers=1,
        patch_size=8,
        vocab_size=300,
    )
    base = build_tiny_model(cfg, _TEXTS, image_size=32, out_dir=root / "base")
    return PolicyRef(base=str(base))


def _hf(policy: PolicyRef, **kw) -> object:
    kw.setdefault("max_new_tokens", 6)
    kw.setdefault("batch_size", 4)
    return make_engine(SampleConfig(engine="hf", **kw), policy)


def test_hf_engine_n_samples_ids_and_seed_determinism(tiny_policy):
    items = _items(5, size=32)
    rows, rejects = _rows(_hf(tiny_policy, n=3, temperature=1.0, seed=1), items)
    assert not rejects
    assert [r.id for r in rows] == [f"rec{i}#{k}" for i in range(5) for k in range(3)]
    assert {(r.engine, r.seed, r.model_key) for r in rows} == {("hf", 1, tiny_policy.base)}
    again, _ = _rows(_hf(tiny_policy, n=3, temperature=1.0, seed=1), items)
    assert [r.response for r in again] == [r.response for r in rows]
    other, _ = _rows(_hf(tiny_policy, n=3, temperature=1.0, seed=2), items)
    assert [r.response for r in other] != [r.response for r in rows]
    # An untrained model at T = 1 spreads its mass: the 3 samples of a prompt are not all equal.
    assert any(len({r.response for r in rows[3 * i : 3 * i + 3]}) > 1 for i in range(5))


def test_hf_engine_same_batch_same_samples_after_resume(tiny_policy, tmp_path):
    # Batches are seeded by their record ids: a resumed run that starts a batch at the same
    # record draws the same samples as the uninterrupted run.
    items = _items(8, size=32)
    engine = _hf(tiny_policy, n=2, temperature=1.0, batch_size=4)
    full = tmp_path / "full.jsonl"
    sample_to_file(engine, items, full)
    part = tmp_path / "part.jsonl"
    sample_to_file(engine, items[:4], part)
    sample_to_file(engine, items, part)
    assert _read(full) == _read(part)


def test_hf_engine_greedy_is_deterministic_and_batch_independent(tiny_policy):
    items = _items(4, size=32)
    a, _ = _rows(_hf(tiny_policy, temperature=0.0, seed=0), items)
    b, _ = _rows(_hf(tiny_policy, temperature=0.0, seed=123), items)
    c, _ = _rows(_hf(tiny_policy, temperature=0.0, batch_size=1), items)
    assert [r.response for r in a] == [r.response for r in b] == [r.response for r in c]


def test_hf_engine_applies_the_peft_adapter(tiny_policy, tmp_path):
    from peft import LoraConfig, get_peft_model

    from fire_mpo_core.models import load_model

    model = load_model(tiny_policy.base)
    torch.manual_seed(0)
    lora = LoraConfig(
        r=4, lora_alpha=64, target_modules=["q_proj", "v_proj", "down_proj"],
        init_lora_weights=False,  # random A and B: the adapter changes the outputs
    )  # fmt: skip
    get_peft_model(model, lora).save_pretrained(tmp_path / "adapter")
    adapted = PolicyRef(base=tiny_policy.base, adapter=str(tmp_path / "adapter"))

    items = _items(4, size=32)
    base_rows, _ = _rows(_hf(tiny_policy, temperature=0.0, max_new_tokens=8), items)
    merged, _ = _rows(_hf(adapted, temperature=0.0, max_new_tokens=8), items)
    unmerged_engine = make_engine(
        SampleConfig(temperature=0.0, max_new_tokens=8, hf={"merge_adapter": False}), adapted
    )
    unmerged, _ = _rows(unmerged_engine, items)
    assert [r.response for r in merged] != [r.response for r in base_rows]
    assert [r.response for r in merged] == [r.response for r in unmerged]
    assert {r.model_key for r in merged} == {adapted.adapter}


def test_make_engine_needs_a_policy_for_local_engines():
    with pytest.raises(ValueError, match="needs a policy"):
        make_engine(SampleConfig(engine="hf"), None)


# --------------------------------------------------------------------------- vllm engine


def test_vllm_engine_without_vllm_says_how_to_install(tiny_policy):
    try:
        import vllm  # noqa: F401

        pytest.skip("vllm is installed here")
    except ImportError:
        pass
    with pytest.raises(ImportError) as e:
        VLLMEngine(SampleConfig(engine="vllm"), tiny_policy)
    assert str(e.value) == VLLM_MISSING and "pip install 'fire-mpo[gpu]'" in str(e.value)


def test_vllm_inputs_use_the_chat_template_with_one_image(tiny_policy):
    processor = load_processor(tiny_policy.base)
    images = [_image(0, 32), _image(1, 32)]
    inputs = build_vllm_inputs(processor, ["Is there a lesion?", "Which side?"], images)
    assert [i["prompt"] for i in inputs] == build_prompts(
        processor, ["Is there a lesion?", "Which side?"]
    )
    assert inputs[0]["multi_modal_data"]["image"] is images[0]
    p = inputs[1]["prompt"]
    assert p.count("<image>") == 1 and p.endswith("<|im_start|>assistant\n")
    assert "Which side?" in p and p.startswith("<s>")  # this tokenizer adds no BOS itself


def test_vllm_inputs_drop_the_template_bos_when_the_tokenizer_adds_one(tiny_policy):
    from tokenizers.processors import TemplateProcessing

    processor = load_processor(tiny_policy.base)
    tok = processor.tokenizer
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)]
    )
    assert tok("a")["input_ids"][0] == tok.bos_token_id
    (inp,) = build_vllm_inputs(processor, ["q?"], [_image(0, 32)])
    assert not inp["prompt"].startswith("<s>") and inp["prompt"].startswith("<|im_start|>user")
