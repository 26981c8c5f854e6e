"""Data-parallel preference training: 2 CPU ranks (gloo) through `accelerate launch` vs 1 process.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/core/test_distributed.py -q       # fast
    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/core/test_distributed.py -q -m ""  # + resume

The launched run trains the tiny LLaVA on 8 SynthLesion pairs with the same global batch as the
in-process run; its per-step losses and final adapter must match within float tolerance, rank 0
alone writes metrics and checkpoints, and an interrupted 2-rank run resumes bit for bit.
"""

from __future__ import annotations

import itertools
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fire_mpo_core.training.config import LoRAConfig, TrainConfig
from fire_mpo_core.training.distributed import rank_share, step_seed
from fire_mpo_core.training.launch import (
    LaunchError,
    build_launch_command,
    launch_env,
    launch_training,
    parse_progress,
    run_streaming,
)
from fire_mpo_core.training.preference import train_preference
from testing_support.world import TRAINER_WORLD, train_job

# --------------------------------------------------------------------------- pure parts


def test_rank_share_is_contiguous_and_covers_the_batch():
    batch = [7, 3, 5, 1, 9]
    shares = [rank_share(batch, r, 2) for r in range(2)]
    assert shares == [[7, 3, 5], [1, 9]]  # array_split sizes: 3, 2
    assert [rank_share(batch, r, 3) for r in range(3)] == [[7, 3], [5, 1], [9]]
    assert [rank_share([4], r, 2) for r in range(2)] == [[4], []]  # an idle rank


def test_step_seed_depends_on_seed_step_and_rank_only():
    assert step_seed(0, 3, 1) == step_seed(0, 3, 1)
    assert (
        len({step_seed(0, 3, 0), step_seed(0, 3, 1), step_seed(0, 4, 0), step_seed(1, 3, 0)}) == 4
    )
    assert 0 <= step_seed(5, 10**6, 7) < 2**63


def test_launch_command_and_config_validation(tmp_path):
    cfg = TrainConfig(num_processes=2, batch_size=4, dtype="bfloat16")
    cmd = build_launch_command(cfg, tmp_path / "spec.json", 29555, python="py")
    assert cmd[:3] == ["py", "-m", "accelerate.commands.launch"]
    flags = dict(itertools.pairwise(cmd))
    assert flags["--num_processes"] == "2" and flags["--mixed_precision"] == "bf16"
    assert flags["--main_process_port"] == "29555" and "--multi_gpu" in cmd
    assert cmd[-3:] == ["-m", "fire_mpo_core.training.launch", str(tmp_path / "spec.json")]
    gpu = TrainConfig(num_processes=8, accelerate_config="configs/accelerate/ddp_gpu.yaml")
    cmd = build_launch_command(gpu, "s.json", 1)
    assert "--multi_gpu" not in cmd and cmd[cmd.index("--config_file") + 1].endswith("ddp_gpu.yaml")
    assert launch_env({}, cuda=False)["ACCELERATE_USE_CPU"] == "true"
    assert "ACCELERATE_USE_CPU" not in launch_env({}, cuda=True)
    with pytest.raises(ValueError, match="num_processes=4 exceeds batch_size=2"):
        TrainConfig(num_processes=4, batch_size=2)
    with pytest.raises(ValueError, match="accelerate_config"):
        TrainConfig(accelerate_config="configs/accelerate/ddp_gpu.yaml")


def test_progress_lines_are_parsed_and_a_failing_child_raises_its_error(tmp_path):
    assert parse_progress(
        'FIRE_MPO_PROGRESS {"step": 2, "total": 5, "metrics": {"loss": 0.5}}'
    ) == (
        2,
        5,
        {"loss": 0.5},
    )
    assert parse_progress("FIRE_MPO_PROGRESS not json") is None
    assert parse_progress("loss 0.5") is None
    # A real child process: prints progress and a log line, leaves a traceback file, exits 3.
    script = (
        "import pathlib, sys\n"
        'print(\'FIRE_MPO_PROGRESS {"step": 1, "total": 2, "metrics": {}}\')\n'
        "print('hello from rank 0')\n"
        f"pathlib.Path({str(tmp_path)!r}, 'error-rank1.txt').write_text('ValueError: bad pair')\n"
        "sys.exit(3)\n"
    )
    steps, lines = [], []
    with pytest.raises(LaunchError) as err:
        run_streaming(
            [sys.executable, "-c", script],
            launch_env(cuda=False),
            on_line=lines.append,
            on_step=lambda s, n, m: steps.append((s, n)),
            error_dir=tmp_path,
        )
    assert steps == [(1, 2)] and lines == ["hello from rank 0"]
    msg = str(err.value)
    assert "exited with code 3" in msg and "ValueError: bad pair" in msg
    assert "hello from rank 0" in msg


# --------------------------------------------------------------------------- launched runs


@pytest.fixture(scope="module")
def world(tiny_world) -> dict:
    """SynthLesion (8 train scans), a tiny LLaVA, 8 pairs with v', their reference artifact: the
    trainer tests' world."""
    torch.set_num_threads(1)
    w = tiny_world(**TRAINER_WORLD)
    return w


def _cfg(**kw) -> TrainConfig:
    # 4 steps of 4 pairs (2 per rank), no dropout: the ranks' sum is the one-process gradient.
    values = {
        "max_length": 128,
        "batch_size": 4,
        "lr": 1e-2,
        "max_steps": 4,
        "logging_every": 1,
        "save_every": 2,
        "lora": LoRAConfig(r=4, alpha=8, dropout=0.0),
    }
    values.update(kw)
    return TrainConfig(**values)


def _metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


@pytest.fixture(scope="module")
def two_ranks(world, tmp_path_factory) -> dict:
    """The uninterrupted 2-rank run (shared by the match and the resume tests)."""
    out = tmp_path_factory.mktemp("ddp") / "two"
    steps: list[tuple[int, int]] = []
    lines: list[str] = []
    result = launch_training(
        train_job(world, _cfg(num_processes=2), out),
        on_step=lambda s, n, m: steps.append((s, n)),
        on_line=lines.append,
    )
    return {"out": out, "result": result, "steps": steps, "lines": lines}


def test_two_cpu_ranks_match_one_process(world, two_ranks, tmp_path):
    one = train_preference(train_job(world, _cfg(), tmp_path / "one"))
    two = two_ranks["result"]
    assert two.num_processes == 2 and one.num_processes == 1
    assert two_ranks["steps"] == [(s, 4) for s in range(1, 5)]  # rank 0's progress, once a step
    a, b = _metrics(tmp_path / "one"), _metrics(two_ranks["out"])
    assert [m["step"] for m in b] == [1, 2, 3, 4]  # one line per step: only rank 0 writes
    for m1, m2 in zip(a, b, strict=True):
        # Same global batch: the same loss up to float summation order (measured: < 1e-6).
        assert m2["loss"] == pytest.approx(m1["loss"], rel=1e-5, abs=1e-6)
        assert m2["rewards/margin"] == pytest.approx(m1["rewards/margin"], rel=1e-4, abs=1e-6)
        assert m2["grad_norm"] == pytest.approx(m1["grad_norm"], rel=1e-4)
        # A scan shown on both ranks is encoded by each: never fewer encodes than one process.
        assert m2["images/encodes_per_pair"] >= m1["images/encodes_per_pair"]
    assert a[-1]["loss"] < a[0]["loss"]
    w1, w2 = _adapter(tmp_path / "one"), _adapter(two_ranks["out"])
    assert w1.keys() == w2.keys() and w1
    for k in w1:
        # Adam divides each coordinate by its own gradient scale, so float-order noise in a
        # near-zero gradient reaches ~1e-5 in that weight (measured 7.6e-6; weights ~1e-2).
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-3, atol=5e-5)
    assert two.policy.adapter == str((two_ranks["out"] / "adapter").resolve())
    assert not (two_ranks["out"] / "checkpoints").exists()  # removed after a finished run
    assert len(list((two_ranks["out"] / "tensorboard").glob("events.out.tfevents.*"))) == 1


@pytest.mark.slow
def test_two_rank_run_resumes_bit_for_bit(world, two_ranks, tmp_path):
    class Stop(Exception):
        pass

    def stop_at_3(step, total, metrics):
        if step == 3:  # the parent stops the launch (a cancelled task): every rank is killed
            raise Stop

    out = tmp_path / "cut"
    cfg = _cfg(num_processes=2)
    with pytest.raises(Stop):
        launch_training(train_job(world, cfg, out), on_step=stop_at_3)
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step-2"]  # one checkpoint, written once (by rank 0)
    state = json.loads((out / "checkpoints" / "step-2" / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["num_processes"] == 2
    resumed = launch_training(train_job(world, cfg, out))
    assert resumed.resumed_from_step == 2
    full, cut = _adapter(two_ranks["out"]), _adapter(out)
    for k in full:
        assert torch.equal(full[k], cut[k]), k
    assert [m["loss"] for m in _metrics(out)] == [m["loss"] for m in _metrics(two_ranks["out"])]


@pytest.mark.slow
def test_a_failing_rank_fails_the_launch_with_its_traceback(world, tmp_path):
    empty = tmp_path / "pairs.jsonl"
    empty.write_text('{"id": "broken"}\n')  # no valid pair: every rank raises ValueError
    job = train_job(world, _cfg(num_processes=2), tmp_path / "o", pairs_path=empty)
    with pytest.raises(LaunchError, match="no trainable pairs"):
        launch_training(job)
