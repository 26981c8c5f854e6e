"""SFT warm start and the benchmark evaluation on a tiny model and a small SynthLesion."""

from __future__ import annotations

import json

import pytest
import torch

from fire_mpo_core.config import (
    EvaluateConfig,
    SFTConfig,
    VisionWarmupConfig,
)
from fire_mpo_core.data.io import load_records
from fire_mpo_core.evaluation.vqa import evaluate_policy
from fire_mpo_core.models import load_model, load_processor
from fire_mpo_core.policy import PolicyRef
from fire_mpo_core.training.sft import run_sft
from fire_mpo_core.training.vision_warmup import vision_parameters, warm_up_vision


@pytest.fixture(scope="module")
def tiny(tiny_world):
    """SynthLesion (16 train / 6 test scans, DataConfig's defaults otherwise) with a tiny LLaVA
    at ``model/`` inside the data folder."""
    w = tiny_world(
        data={"n_train_images": 16, "n_val_images": 0, "n_test_images": 6},
        data_defaults={},
        data_dir="",
        models={"model": {"hidden_size": 64, "num_heads": 2, "vocab_size": 300, "patch_size": 16}},
    )
    return w["root"], w["records"]


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


def _split_params(model):
    vision = {id(p) for p in vision_parameters(model)}
    named = dict(model.named_parameters())
    return (
        {n: p.detach().clone() for n, p in named.items() if id(p) in vision},
        {n: p.detach().clone() for n, p in named.items() if id(p) not in vision},
    )


def test_vision_warmup_trains_only_the_vision_side(tiny):
    torch.set_num_threads(1)
    root, train = tiny
    model, proc = load_model(root / "model"), load_processor(root / "model")
    vis0, dec0 = _split_params(model)
    cfg = VisionWarmupConfig(steps=3, batch_size=4, pretrain_scans=4)
    stats = warm_up_vision(model, proc, train, root, cfg, holdout=train)
    assert stats["steps"] == 3 and stats["scans"] == len({r.image for r in train}) + 4
    assert 0.0 <= stats["holdout_presence_auc"] <= 1.0
    vis1, dec1 = _split_params(model)
    assert any(not torch.equal(vis0[n], vis1[n]) for n in vis0)  # tower + projector moved
    assert all(torch.equal(dec0[n], dec1[n]) for n in dec0)  # the decoder did not


def test_sft_with_frozen_vision_keeps_the_warm_features(tiny, tmp_path):
    torch.set_num_threads(1)
    root, train = tiny
    warm = VisionWarmupConfig(steps=2, batch_size=4, pretrain_scans=0)
    cfg = SFTConfig(max_steps=3, batch_size=4, vision_warmup=warm, train_vision=False)
    out = run_sft(root / "model", train, root, cfg, tmp_path / "m", warm_vision=True)
    assert out["vision_warmup_steps"] == 2
    assert (tmp_path / "m" / "vision_warmup_log.jsonl").read_text().count("\n") == 2
    # Reload: the vision side equals a warm-up alone (SFT left it), the decoder differs.
    model = load_model(root / "model")
    warm_up_vision(model, load_processor(root / "model"), train, root, warm)
    vis_warm, dec_base = _split_params(model)
    vis_sft, dec_sft = _split_params(load_model(tmp_path / "m"))
    assert all(torch.equal(vis_warm[n], vis_sft[n]) for n in vis_warm)
    assert any(not torch.equal(dec_base[n], dec_sft[n]) for n in dec_base)


@pytest.mark.parametrize(
    ("enabled", "tiny_model", "dataset", "active"),
    [
        ("auto", True, "synthlesion", True),
        ("auto", False, "synthlesion", False),  # a real checkpoint has a pretrained encoder
        ("auto", True, "slake", False),  # a real dataset has no dense lesion targets
        (False, True, "synthlesion", False),
        (True, False, "slake", True),
    ],
)
def test_vision_warmup_auto(enabled, tiny_model, dataset, active):
    assert VisionWarmupConfig(enabled=enabled).active(tiny_model, dataset) is active
    # Families the warm start does not read features from skip it under auto.
    assert VisionWarmupConfig().active(True, "synthlesion", "gemma3") is False
    assert VisionWarmupConfig().active(True, "synthlesion", "qwen2_vl") is True
