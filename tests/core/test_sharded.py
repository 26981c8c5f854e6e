"""Sharded preference training (``train.strategy: fsdp``): 2 CPU ranks (gloo) with FSDP2 units.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/core/test_sharded.py -q           # fast part
    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/core/test_sharded.py -q -m ""     # + 2 ranks

The launched runs shard the tiny LLaVA (vision tower, projector, decoder layers, embeddings,
norm, lm_head) across 2 gloo processes and train with the fused FiRe-MPO loss on the same global
batch as one process: the per-step losses must match one process, every rank must hold only its
shard, and a run stopped after its checkpoint must resume to the same adapter, bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fire_mpo_core.training.config import LoRAConfig, TrainConfig
from fire_mpo_core.training.launch import launch_training
from fire_mpo_core.training.preference import train_preference
from fire_mpo_core.training.sharding import loss_scale
from testing_support.world import TRAINER_WORLD, train_job

# --------------------------------------------------------------------------- pure parts


def test_strategy_fields_are_checked_against_each_other():
    with pytest.raises(ValueError, match=r"strategy='fsdp'.*num_processes=1"):
        TrainConfig(strategy="fsdp")
    with pytest.raises(ValueError, match=r"merge_adapter=True.*strategy='fsdp'"):
        TrainConfig(strategy="fsdp", num_processes=2, merge_adapter=True)
    assert TrainConfig(strategy="fsdp", num_processes=2).strategy == "fsdp"
    assert TrainConfig().strategy == "ddp"


def test_loss_scale_turns_the_ranks_mean_into_their_sum():
    """FSDP2 averages: (2 g0 + 2 g1) / 2 = g0 + g1, the data-parallel sum."""
    g0, g1 = torch.tensor([0.25, -1.5]), torch.tensor([0.75, 0.5])
    s = loss_scale(2)
    assert torch.equal((s * g0 + s * g1) / 2, g0 + g1)
    assert loss_scale(4) == 4.0


def test_sharded_strategy_from_the_cycle_config_and_its_gpu_accelerate_config():
    """`train.num_processes: 2` with `train.strategy: fsdp` validates from the config and
    launches with the GPU accelerate config: a plain MULTI_GPU launch (the sharding is ours:
    FSDP2 units the trainer's calls need; an accelerate FSDP config is refused at start)."""
    from accelerate.commands.config.config_args import load_config_from_file

    from fire_mpo_core.config import load_config
    from fire_mpo_core.training.launch import build_launch_command

    fsdp_yaml = Path(__file__).resolve().parents[2] / "configs/accelerate/fsdp_gpu.yaml"
    cfg = load_config(
        Path(__file__).resolve().parents[2] / "configs/default.yaml",
        {
            "train.num_processes": 2,
            "train.strategy": "fsdp",
            "train.accelerate_config": str(fsdp_yaml),
        },
    ).train
    assert (cfg.num_processes, cfg.strategy) == (2, "fsdp")
    cmd = build_launch_command(cfg, "spec.json", 29500, python="py")
    assert cmd[cmd.index("--config_file") + 1] == str(fsdp_yaml)
    assert cmd[cmd.index("--num_processes") + 1] == "2"
    parsed = load_config_from_file(str(fsdp_yaml))
    assert parsed.distributed_type == "MULTI_GPU" and parsed.mixed_precision == "bf16"


# --------------------------------------------------------------------------- launched runs


@pytest.fixture(scope="module")
def world(tiny_world) -> dict:
    """The trainer tests' world: SynthLesion (8 train scans), a tiny LLaVA, 8 pairs with v',
    their reference artifact."""
    torch.set_num_threads(1)
    return tiny_world(**TRAINER_WORLD)


def _cfg(**kw) -> TrainConfig:
    # 4 steps of 4 pairs (2 per rank), fused FiRe-MPO (KL in the step), no dropout.
    values = {
        "loss": {"name": "fire_mpo"},
        "max_length": 128,
        "batch_size": 4,
        "lr": 1e-2,
        "max_steps": 4,
        "logging_every": 1,
        "save_every": 2,
        "use_fused": True,
        "lora": LoRAConfig(r=4, alpha=8, dropout=0.0),
    }
    values.update(kw)
    return TrainConfig(**values)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def sharded(world) -> dict:
    """The uninterrupted 2-rank sharded run (shared by the match and the resume tests)."""
    out = world["root"] / "sharded"
    lines: list[str] = []
    result = launch_training(
        train_job(world, _cfg(num_processes=2, strategy="fsdp"), out), on_line=lines.append
    )
    return {"out": out, "result": result, "lines": lines}


@pytest.mark.slow
def test_two_sharded_ranks_match_one_process_step_by_step(world, sharded, tmp_path):
    one = train_preference(train_job(world, _cfg(), tmp_path / "one"))
    two = sharded["result"]
    assert two.strategy == "fsdp" and two.num_processes == 2
    assert one.num_processes == 1
    a, b = _metrics(tmp_path / "one"), _metrics(sharded["out"])
    assert [m["step"] for m in b] == [1, 2, 3, 4]
    for m1, m2 in zip(a, b, strict=True):
        # Same global batch: the same loss up to float summation order (measured: < 1e-6).
        assert m2["loss"] == pytest.approx(m1["loss"], rel=1e-5, abs=1e-6)
        assert m2["kl/forward"] == pytest.approx(m1["kl/forward"], rel=1e-4, abs=1e-7)
        assert m2["grad_norm"] == pytest.approx(m1["grad_norm"], rel=1e-4)
    w1, w2 = _adapter(tmp_path / "one"), _adapter(sharded["out"])
    assert w1.keys() == w2.keys() and w1
    for k in w1:  # full tensors in the saved adapter, not one rank's shard
        assert w2[k].shape == w1[k].shape
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-3, atol=5e-5)
    assert not (sharded["out"] / "checkpoints").exists()


@pytest.mark.slow
def test_sharded_run_resumes_bit_for_bit(world, sharded, tmp_path):
    class Stop(Exception):
        pass

    def stop_at_3(step, total, metrics):
        if step == 3:  # the parent stops the launch: every rank is killed
            raise Stop

    out = tmp_path / "cut"
    cfg = _cfg(num_processes=2, strategy="fsdp")
    with pytest.raises(Stop):
        launch_training(train_job(world, cfg, out), on_step=stop_at_3)
    ckpt = out / "checkpoints" / "step-2"
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2"]
    assert (ckpt / "rank-0.pt").is_file() and (ckpt / "rank-1.pt").is_file()
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["strategy"] == "fsdp" and state["num_processes"] == 2
    # Each rank's file holds a shard: the two halves of a LoRA tensor make the full one.
    r0, r1 = (torch.load(ckpt / f"rank-{r}.pt", weights_only=True)["params"] for r in (0, 1))
    full = load_file(str(ckpt / "adapter.safetensors"))
    assert r0.keys() == r1.keys() and r0
    for name in r0:
        whole_tensor = full[name.replace(".default", "")]
        assert r0[name].shape[0] < whole_tensor.shape[0]  # a shard, not a copy
        assert torch.equal(torch.cat([r0[name], r1[name]]), whole_tensor), name
    resumed = launch_training(train_job(world, cfg, out))
    assert resumed.resumed_from_step == 2
    whole, cut = _adapter(sharded["out"]), _adapter(out)
    for k in whole:
        assert torch.equal(whole[k], cut[k]), k
    assert [m["loss"] for m in _metrics(out)] == [m["loss"] for m in _metrics(sharded["out"])]
