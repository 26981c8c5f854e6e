"""Gradient checkpointing on the fused path gives the gradients of the plain path; the data order
puts each random epoch's longest micro-batch first.

Tiny LLaVA and Qwen2.5-VL models (hidden 64, vocabulary 300, 32 px images) on a small generated
SynthLesion; pairs with v' from tests/helpers_pairs.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fire_mpo_core.config import DataConfig, ModelConfig
from fire_mpo_core.data.synthlesion import generate_synthlesion, load_records
from fire_mpo_core.losses.config import LossConfig
from fire_mpo_core.models import build_tiny_model, load_model, load_processor
from fire_mpo_core.policy import PolicyRef
from fire_mpo_core.training.batching import ImageCache, build_branch_batch, hf_model, load_pairs
from fire_mpo_core.training.config import LoRAConfig, TrainConfig
from fire_mpo_core.training.data_order import DataOrder, _longest_batch_first
from fire_mpo_core.training.job import TrainJob
from fire_mpo_core.training.lora import attach_lora
from fire_mpo_core.training.preference import (
    train_preference,
)
from fire_mpo_core.training.scoring import score_batch
from testing_support.pairs import corrupt, write_pairs

IMAGE_SIZE = 32
needs_corruption = pytest.mark.skipif(corrupt is None, reason="fire_mpo_core.corruption missing")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("gc")
    data = root / "data"
    generate_synthlesion(
        DataConfig(
            image_size=IMAGE_SIZE,
            n_train_images=6,
            n_val_images=0,
            n_test_images=1,
            questions_per_image=2,
            report_fraction=0.0,
        ),
        data,
    )
    records = [r for r in load_records(data) if r.split == "train"]
    texts = [t for r in records for t in (r.question, r.answer)]
    bases = {}
    for arch in ("llava", "qwen2_5_vl"):
        cfg = ModelConfig(
            arch=arch,
            hidden_size=64,
            num_heads=2,
            vocab_size=300,
            vision_hidden_size=32,
            vision_layers=2,
            patch_size=8,
        )
        bases[arch] = build_tiny_model(cfg, texts, IMAGE_SIZE, root / arch)
    pairs_path = write_pairs(records, data, root / "pairs", n=6)
    return {"data": data, "bases": bases, "pairs_path": pairs_path}


def _policy(base: Path, checkpointing: bool):
    model = load_model(base)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(0)
    lora = LoRAConfig(r=4, alpha=8, dropout=0.1)  # dropout on: the recompute must redraw it
    model = attach_lora(model, PolicyRef(base=str(base)), lora)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)  # policy != reference, so the KL has a gradient
    model.train()
    return model


@needs_corruption
@pytest.mark.parametrize("arch", ["llava", "qwen2_5_vl"])
def test_gradient_checkpointing_gives_the_same_fused_gradients(world, arch):
    """FiRe-MPO (4 branches, span KL, reference in the step) on the fused path: the loss and
    every LoRA gradient agree with and without checkpointing, and checkpointing really ran
    (the first decoder layer's MLP runs once more, in the backward's recompute)."""
    base = world["bases"][arch]
    processor = load_processor(base)
    pairs = load_pairs(world["pairs_path"])[:4]
    images = ImageCache(world["data"], world["pairs_path"].parent)
    batch = build_branch_batch(processor, pairs, images, 128)
    assert bool(batch.has_corrupted.all())
    results = {}
    for checkpointing in (False, True):
        model = _policy(base, checkpointing)
        # Count the first decoder layer's MLP calls; a wrapped forward (not a forward hook: the
        # checkpoint's recompute does not run module hooks) also sees the recompute.
        mlp = hf_model(model).model.language_model.layers[0].mlp
        calls: list[int] = []
        mlp_forward = mlp.forward

        def counted(*args, _forward=mlp_forward, _calls=calls, **kwargs):
            _calls.append(1)
            return _forward(*args, **kwargs)

        mlp.forward = counted
        torch.manual_seed(1)  # the same dropout draws in both runs
        out, _ = score_batch(
            model,
            batch,
            LossConfig(name="fire_mpo"),
            use_fused=True,
            chunk_size=7,
            reference=None,
        )
        out.loss.mean().backward()
        del mlp.forward
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results[checkpointing] = (out.loss.detach(), out.kl_forward.detach(), grads, len(calls))
    loss0, kl0, grads0, calls0 = results[False]
    loss1, kl1, grads1, calls1 = results[True]
    # Policy forward + reference forward; checkpointing adds one recompute of the policy's.
    assert (calls0, calls1) == (2, 3)
    assert (kl0 > 0).all()
    torch.testing.assert_close(loss1, loss0, rtol=0, atol=1e-6)
    torch.testing.assert_close(kl1, kl0, rtol=0, atol=1e-6)
    assert grads1.keys() == grads0.keys() and len(grads0) > 0
    for name in grads0:
        assert grads0[name].abs().sum() > 0, name
        torch.testing.assert_close(grads1[name], grads0[name], rtol=1e-5, atol=1e-7, msg=name)


@needs_corruption
def test_training_with_gradient_checkpointing_ends_with_the_same_adapter(world, tmp_path):
    """Two optimizer steps of the trainer (fused, reference artifact, KL in the step): the
    adapter with `gradient_checkpointing` equals the one without, up to float rounding."""
    base = world["bases"]["llava"]
    adapters = {}
    for checkpointing in (False, True):
        cfg = TrainConfig(
            loss={"name": "fire_mpo"},
            lora={"r": 4, "alpha": 8, "dropout": 0.05},
            lr=1e-2,
            max_steps=2,
            batch_size=3,
            max_length=128,
            use_fused=True,
            gradient_checkpointing=checkpointing,
            save_every=None,
            logging_every=1,
        )
        out_dir = tmp_path / f"gc-{checkpointing}"
        job = TrainJob(
            policy=PolicyRef(base=str(base)),
            pairs_path=world["pairs_path"],
            image_root=world["data"],
            cfg=cfg,
            out_dir=out_dir,
        )
        out = train_preference(job)
        adapters[checkpointing] = load_file(Path(out.policy.adapter) / "adapter_model.safetensors")
    assert adapters[True].keys() == adapters[False].keys()
    for key, value in adapters[False].items():
        torch.testing.assert_close(adapters[True][key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_longest_batch_first_is_hand_derived():
    """Batches of 2 of the permutation [3, 0, 5, 1, 4, 2]: (3, 0), (5, 1), (4, 2); their longest
    items are 30, 9 and 40, so (4, 2) swaps places with (3, 0); the middle batch stays."""
    lengths = [1, 9, 40, 30, 2, 3]  # lengths[i] of item i
    assert _longest_batch_first([3, 0, 5, 1, 4, 2], lengths, 2) == [4, 2, 5, 1, 3, 0]
    # A ragged last batch can be the longest too.
    assert _longest_batch_first([0, 1, 2], [1, 1, 5], 2) == [2, 0, 1]


def test_random_epochs_start_with_their_longest_batch():
    """Every epoch of the random order is still a seeded permutation whose first micro-batch
    holds the longest pair; the grouped order is unchanged by it."""
    lengths = [5, 50, 6, 48, 7, 52, 4, 49, 3, 8]
    order = DataOrder(10, 3, seed=0, longest_first=lengths)
    for epoch in range(3):
        batches = [order.micro_batch(epoch * order.per_epoch + j) for j in range(order.per_epoch)]
        assert sorted(i for b in batches for i in b) == list(range(10))
        assert 5 in batches[0]  # item 5 (length 52) is the longest
    plain = DataOrder(10, 3, seed=0)
    first = [plain.micro_batch(j) for j in range(order.per_epoch)]
    again = [order.micro_batch(j) for j in range(order.per_epoch)]
    assert sorted(map(tuple, first)) == sorted(map(tuple, again))  # only batches swapped
