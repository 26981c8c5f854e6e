"""SFT warm start and the benchmark evaluation on a tiny model and a small SynthLesion."""

from __future__ import annotations

import json

import pytest
import torch

from fire_mpo_core.config import DataConfig, EvaluateConfig, ModelConfig, SFTConfig
from fire_mpo_core.data.io import load_records
from fire_mpo_core.data.synthlesion import generate_synthlesion
from fire_mpo_core.evaluation.vqa import evaluate_policy
from fire_mpo_core.models import build_tiny_model
from fire_mpo_core.policy import PolicyRef
from fire_mpo_core.training.sft import run_sft


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("sl")
    generate_synthlesion(DataConfig(n_train_images=16, n_val_images=0, n_test_images=6), root)
    train = load_records(root, splits=("train",))
    texts = [t for r in train for t in (r.question, r.answer)]
    cfg = ModelConfig(hidden_size=64, num_heads=2, vocab_size=300, patch_size=16)
    build_tiny_model(cfg, texts, 64, root / "model")
    return root, train


def test_sft_lowers_the_loss_and_is_deterministic(tiny, tmp_path):
    torch.set_num_threads(1)
    root, train = tiny
    cfg = SFTConfig(max_steps=25, batch_size=8, lr=3e-3, seed=1)
    a = run_sft(root / "model", train, root, cfg, tmp_path / "a")
    assert a["steps"] == 25 and a["final_loss"] < 0.6 * a["first_loss"]
    log = [json.loads(x) for x in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 26))
    b = run_sft(root / "model", train, root, cfg, tmp_path / "b")
    assert a["final_loss"] == b["final_loss"]  # same seed, same data order, same result
    wa = (tmp_path / "a" / "model.safetensors").read_bytes()
    assert wa == (tmp_path / "b" / "model.safetensors").read_bytes()


def test_evaluate_writes_flat_metrics(tiny, tmp_path):
    root, _ = tiny
    m = evaluate_policy(
        PolicyRef(base=str(root / "model")), root, EvaluateConfig(max_new_tokens=6), tmp_path
    )
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    assert m["samples_per_second"] > 0  # returned for the manifest, kept out of the file
    assert on_disk == {k: v for k, v in m.items() if k != "samples_per_second"}
    assert all(not isinstance(v, dict | list) for v in on_disk.values())
    assert m["n_closed"] + m["n_open"] + m["n_report"] == len(
        (tmp_path / "data.jsonl").read_text().splitlines()
    )
    assert 0.0 <= m["closed_accuracy"] <= 1.0


def test_unreadable_image_is_a_reject_in_sft_and_evaluate(tiny, tmp_path):
    """One truncated scan costs its records (rejects naming the file), not the stage."""
    import shutil

    torch.set_num_threads(1)
    src, _ = tiny
    root = tmp_path / "data"
    shutil.copytree(src, root)
    train = load_records(root, splits=("train",))
    test = load_records(root, splits=("test",))
    for rec in (train[0], test[0]):
        data = (root / rec.image).read_bytes()
        (root / rec.image).write_bytes(data[: len(data) // 3])  # truncated PNG
    rejects: list[tuple[str, str]] = []
    cfg = SFTConfig(max_steps=2, batch_size=4)
    run_sft(
        root / "model", train, root, cfg, tmp_path / "sft", on_reject=lambda *r: rejects.append(r)
    )
    bad_train = {r.id for r in train if r.image == train[0].image}
    assert {i for i, _ in rejects} == bad_train
    assert all(train[0].image in why for _, why in rejects)
    with pytest.raises(ValueError, match=train[0].image):  # without a reject sink: an error
        run_sft(root / "model", train, root, cfg, tmp_path / "sft2")

    rejects.clear()
    m = evaluate_policy(
        PolicyRef(base=str(root / "model")),
        root,
        EvaluateConfig(max_new_tokens=4, grounding=False),
        tmp_path / "eval",
        on_reject=lambda *r: rejects.append(r),
    )
    bad_test = {r.id for r in test if r.image == test[0].image}
    assert {i for i, _ in rejects} == bad_test
    assert m["n_closed"] + m["n_open"] + m["n_report"] == len(test) - len(bad_test)
