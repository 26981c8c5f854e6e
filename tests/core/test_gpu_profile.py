"""The real-model GPU profiles and the vLLM option mapping, checked without a GPU or downloads.

    .venv/bin/python -m pytest tests/core/test_gpu_profile.py -q

Each profile in configs/gpu/ must load, carry the paper's hyperparameters, and name a
model_type that transformers' auto mapping resolves to an image-text-to-text class (config
class built locally, no weights). The vLLM engine's kwargs and the `vllm serve` command are
computed without importing vLLM (it cannot run on CPU).
"""

from __future__ import annotations

import itertools
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText

from fire_mpo_core.config import ConfigError, load_config
from fire_mpo_core.policy import PolicyRef
from fire_mpo_core.sampling.config import SampleConfig
from fire_mpo_core.sampling.vllm_engine import (
    lora_request_args,
    vllm_engine_kwargs,
    vllm_serve_command,
)
from testing_support import REPO

PROFILES = {
    "qwen2_5_vl_7b": ("Qwen/Qwen2.5-VL-7B-Instruct", "Qwen2_5_VLForConditionalGeneration"),
    "qwen3_vl_4b": ("Qwen/Qwen3-VL-4B-Instruct", "Qwen3VLForConditionalGeneration"),
    "huatuogpt_vision_7b": (
        "FreedomIntelligence/HuatuoGPT-Vision-7B-Qwen2.5VL",
        "Qwen2_5_VLForConditionalGeneration",
    ),
    "medgemma_4b_it": ("google/medgemma-4b-it", "Gemma3ForConditionalGeneration"),
    "lingshu_7b": ("lingshu-medical-mllm/Lingshu-7B", "Qwen2_5_VLForConditionalGeneration"),
}


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_profile_loads_with_paper_settings_and_its_model_class_resolves(name):
    cfg = load_config(REPO / "configs" / "gpu" / f"{name}.yaml")
    hub_id, class_name = PROFILES[name]
    assert cfg.model.name_or_path == hub_id and cfg.model.dtype == "bfloat16"
    loss, lora, train = cfg.train.loss, cfg.train.lora, cfg.train
    assert (loss.name, loss.beta, loss.alpha, loss.gamma, loss.lambda_) == (
        "fire_mpo",
        0.1,
        0.01,
        0.1,
        0.5,
    )
    assert (lora.r, lora.alpha, lora.dropout, lora.scope) == (128, 256, 0.05, "language_model")
    assert (train.lr, train.batch_size, train.epochs, train.dtype) == (1e-6, 8, 1.0, "bfloat16")
    assert cfg.sample.engine == "vllm" and cfg.sample.vllm.max_lora_rank >= lora.r
    assert cfg.judge.name == "llm" and cfg.judge.llm.endpoint.base_urls
    # By name, through transformers' own mapping: config class built locally, no download.
    config = AutoConfig.for_model(cfg.model.model_type)
    model_class = AutoModelForImageTextToText._model_mapping[type(config)]
    assert model_class.__name__ == class_name


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_profile_family_is_one_the_tiny_cycle_runs(name):
    """The profile's model goes through the same family entry (processor images, LoRA scope,
    shared features, patch grid) as the tiny model of that architecture that
    tests/core/test_families.py runs through the whole cycle."""
    from fire_mpo_core.models.families import family_of
    from fire_mpo_core.models.tiny import TINY_ARCHS, create_tiny_config

    cfg = load_config(REPO / "configs" / "gpu" / f"{name}.yaml")
    family = family_of(cfg.model.model_type)
    tested = {family_of(create_tiny_config(a)).name for a in TINY_ARCHS}
    assert family.name in tested
    # The real-size model (on the meta device: no memory, no download) has the language model
    # and vision modules where the family says; LoRA's language_model scope relies on it.
    config = AutoConfig.for_model(cfg.model.model_type)
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    assert family_of(model) is family
    for path in (family.language_model, *family.vision):
        model.get_submodule(path)


def test_unknown_model_type_fails_naming_the_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  name_or_path: x/y\n  model_type: qwen9_vl\n")
    with pytest.raises(ConfigError, match=r"model: .*qwen9_vl.* not an image-text-to-text"):
        load_config(bad)


def test_ddp_accelerate_config_parses_as_multi_gpu():
    from accelerate.commands.config.config_args import load_config_from_file

    c = load_config_from_file(str(REPO / "configs" / "accelerate" / "ddp_gpu.yaml"))
    assert c.distributed_type.name == "MULTI_GPU" and c.mixed_precision == "bf16"
    assert c.num_machines == 1


def test_vllm_options_map_to_engine_kwargs_and_serve_command():
    cfg = load_config(REPO / "configs" / "gpu" / "qwen2_5_vl_7b.yaml").sample
    cfg = cfg.model_copy(
        update={
            "vllm": cfg.vllm.model_copy(
                update={
                    "tensor_parallel_size": 2,
                    "max_num_seqs": 64,
                    "enable_prefix_caching": False,
                }
            )
        }
    )
    base = PolicyRef(base="Qwen/Qwen2.5-VL-7B-Instruct")
    kw = vllm_engine_kwargs(cfg, base)
    assert kw == {
        "model": "Qwen/Qwen2.5-VL-7B-Instruct",
        "dtype": "bfloat16",
        "seed": 0,
        "tensor_parallel_size": 2,
        "gpu_memory_utilization": 0.85,
        "max_num_seqs": 64,
        "enable_prefix_caching": False,
        "limit_mm_per_prompt": {"image": 1},
        "trust_remote_code": False,
        "max_model_len": 4096,
    }
    r1 = PolicyRef(base=base.base, adapter="/store/run/round-1/train/k1/adapter")
    r2 = PolicyRef(base=base.base, adapter="/store/run/round-2/train/k2/adapter")
    kw1 = vllm_engine_kwargs(cfg, r1)
    assert (kw1["enable_lora"], kw1["max_lora_rank"], kw1["max_loras"]) == (True, 128, 1)
    # A new round's adapter gets a new name and id: vLLM caches adapters by id.
    (n1, id1, p1), (n2, id2, _p2) = lora_request_args(r1), lora_request_args(r2)
    assert n1 != n2 and id1 != id2 and min(id1, id2) >= 1 and p1 == r1.adapter
    assert lora_request_args(r1) == (n1, id1, p1) and lora_request_args(base) is None

    dp = cfg.model_copy(
        update={"engine": "openai", "vllm": cfg.vllm.model_copy(update={"data_parallel_size": 4})}
    )
    cmd = vllm_serve_command(dp, r1, port=8100)
    flags = dict(itertools.pairwise(cmd))
    assert cmd[:3] == ["vllm", "serve", "Qwen/Qwen2.5-VL-7B-Instruct"]
    assert flags["--tensor-parallel-size"] == "2" and flags["--data-parallel-size"] == "4"
    assert flags["--max-num-seqs"] == "64" and "--no-enable-prefix-caching" in cmd
    assert flags["--port"] == "8100" and flags["--limit-mm-per-prompt"] == '{"image": 1}'
    assert flags["--lora-modules"] == f"{n1}={r1.adapter}" and flags["--max-lora-rank"] == "128"
    assert "--enable-lora" in cmd and "--enable-lora" not in vllm_serve_command(dp, base)
    # The offline engine runs one replica: data parallelism is refused there, naming the fix.
    with pytest.raises(ValueError, match="data_parallel_size=4 needs a server"):
        SampleConfig(engine="vllm", vllm={"data_parallel_size": 4})
    if "vllm" not in sys.modules:  # none of the above imported vLLM
        assert not any(m == "vllm" or m.startswith("vllm.") for m in sys.modules)
