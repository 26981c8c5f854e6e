"""Every vision-language family of fire_mpo_core.models.families, at tiny size, on CPU.

Per family (``ModelConfig.arch``): build / save / reload through ``load_model`` /
``load_processor``; the family's chat conventions; fused == naive loss and gradients with shared
image features == per-row encoding (float32, 1e-5); image tokens mapped to the patch grid,
checked against a known mask through the model's own vision path; LoRA on the language model
leaves the vision side untouched; the vLLM prompt / multi-modal inputs; a checkpoint made with
plain transformers (not our builder) through the same layer; and the whole one-round cycle,
fused and naive (testing_support/cycle.py).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from fire_mpo_core.evaluation.grounding import _grid_and_crop, image_token_id, patch_coverage
from fire_mpo_core.losses.config import LossConfig
from fire_mpo_core.models import (
    encode_batch,
    load_model,
    load_processor,
    model_inputs,
)
from fire_mpo_core.models.families import FAMILIES, family_of
from fire_mpo_core.models.tiny import TINY_ARCHS
from fire_mpo_core.policy import PolicyRef
from fire_mpo_core.sampling.vllm_engine import build_vllm_inputs
from fire_mpo_core.store import is_finished, read_manifest
from fire_mpo_core.training.batching import ImageCache, build_branch_batch, load_pairs
from fire_mpo_core.training.config import LoRAConfig
from fire_mpo_core.training.lora import adapted_modules, attach_lora
from fire_mpo_core.training.scoring import score_batch
from testing_support.cycle import run_cycle_direct, write_config
from testing_support.foreign_checkpoints import FOREIGN, save_foreign

IMAGE_SIZE = 64
SIZES = {"hidden_size": 64, "num_heads": 2, "vocab_size": 300, "vision_hidden_size": 32}
# Family, placeholder the chat template writes (vLLM expands it), and the end-of-turn token.
CONVENTIONS = {
    "llava": ("llava", "<image>", "<|im_end|>"),
    "llava_mistral": ("llava", "<image>", "</s>"),
    "qwen2_vl": ("qwen_vl", "<|vision_start|><|image_pad|><|vision_end|>", "<|im_end|>"),
    "qwen2_5_vl": ("qwen_vl", "<|vision_start|><|image_pad|><|vision_end|>", "<|im_end|>"),
    "qwen3_vl": ("qwen3_vl", "<|vision_start|><|image_pad|><|vision_end|>", "<|im_end|>"),
    "gemma3": ("gemma3", "<start_of_image>", "<end_of_turn>"),
    "idefics3": ("idefics3", "<image>", "<end_of_utterance>"),
    "internvl": ("internvl", "<IMG_CONTEXT>", "<|im_end|>"),
}


# Every test here runs with one intra-op thread (the shared fixture of tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tiny_world) -> dict:
    """SynthLesion (6 train scans), 4 pairs with v', one tiny model per family."""
    return tiny_world(
        data={"image_size": IMAGE_SIZE, "n_train_images": 6},
        models={
            arch: {"arch": arch, "vision_layers": 2, "patch_size": 8, **SIZES}
            for arch in TINY_ARCHS
        },
        pairs=4,
    )


def _batch(world, processor, n: int = 3):
    pairs = load_pairs(world["pairs_path"])[:n]
    return build_branch_batch(
        processor, pairs, ImageCache(world["data"], world["pairs_path"].parent), 160
    )


def _lora(base: Path, scope: str = "language_model"):
    model = load_model(base)
    torch.manual_seed(0)
    model = attach_lora(model, PolicyRef(base=str(base)), LoRAConfig(r=4, dropout=0.0, scope=scope))
    with torch.no_grad():  # random B: the policy differs from the reference
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)
    model.train()
    return model


# --------------------------------------------------------------------------- build / conventions


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_family_builds_reloads_and_keeps_its_chat_conventions(world, arch):
    base = world["bases"][arch]
    family, placeholder, end_of_turn = CONVENTIONS[arch]
    model, processor = load_model(base), load_processor(base)
    assert family_of(model).name == family
    assert json.loads((base / "config.json").read_text())["model_type"] in (
        FAMILIES[family].model_types
    )
    assert processor.tokenizer.eos_token == end_of_turn
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Q?"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt.count(placeholder) == 1
    batch = encode_batch(
        processor, [Image.new("RGB", (40, 50), 90)] * 2, ["Q?", "Where?"], ["a", "b"]
    )
    n_image = (batch["input_ids"] == image_token_id(model)).sum(-1)
    assert n_image[0] == n_image[1] > 0
    # The response ends with the family's end-of-turn token, which generation stops on.
    last = batch["labels"][0][batch["labels"][0] != -100][-1]
    assert int(last) == processor.tokenizer.convert_tokens_to_ids(end_of_turn)
    with torch.no_grad():
        logits = model(**model_inputs(batch)).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_vllm_inputs_hold_one_placeholder_and_no_doubled_bos(world, arch):
    processor = load_processor(world["bases"][arch])
    _, placeholder, _ = CONVENTIONS[arch]
    img = Image.new("RGB", (32, 32))
    (item,) = build_vllm_inputs(processor, ["Is there a lesion?"], [img])
    assert item["multi_modal_data"] == {"image": img}
    assert item["prompt"].count(placeholder) == 1
    ids = processor.tokenizer(item["prompt"])["input_ids"]
    bos = processor.tokenizer.bos_token_id
    assert bos is None or ids[:2] != [bos, bos]
    # A template that drops the image is refused, naming the placeholder.
    processor.chat_template = "{% for m in messages %}{{ m['role'] }}{% endfor %}"
    with pytest.raises(ValueError, match="0 image placeholders"):
        build_vllm_inputs(processor, ["Q?"], [img])


# --------------------------------------------------------------------------- trainer forward


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_fused_equals_naive_and_shared_features_equal_per_row(world, arch):
    base = world["bases"][arch]
    processor = load_processor(base)
    batch = _batch(world, processor)
    assert batch.has_corrupted.any()
    model = _lora(base)
    results = {}
    for fused in (False, True):
        for shared in (True, False):
            model.zero_grad(set_to_none=True)
            out, stats = score_batch(
                model, batch, LossConfig(name="fire_mpo"), use_fused=fused, chunk_size=7,
                reference=None, shared_images=shared,
            )  # fmt: skip
            out.loss.mean().backward()
            grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
            results[fused, shared] = (out.loss.detach(), grads, stats["image_encodes"])
    loss0, grad0, _ = results[False, True]
    assert (loss0 > 0).all() and grad0.abs().sum() > 0
    for key, (loss, grad, _) in results.items():
        torch.testing.assert_close(loss, loss0, rtol=0, atol=1e-5, msg=str(key))
        torch.testing.assert_close(grad, grad0, rtol=1e-4, atol=1e-5, msg=str(key))
    assert results[True, True][2] == len(batch.image_keys)  # each distinct image encoded once


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_lora_on_language_model_leaves_vision_untouched(world, arch):
    base = world["bases"][arch]
    family = family_of(load_model(base))
    model = _lora(base)
    names = adapted_modules(model)
    assert names and all(n.startswith(family.language_model + ".") for n in names)
    hf = model.get_base_model()
    vision = {
        f"{v}.{n}": p.detach().clone()
        for v in family.vision
        for n, p in hf.get_submodule(v).named_parameters()
    }
    assert vision and not any(p.requires_grad for p in (hf.get_parameter(n) for n in vision))
    processor = load_processor(base)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    out, _ = score_batch(
        model, _batch(world, processor, n=2), LossConfig(), use_fused=True, chunk_size=16,
        reference=None,
    )  # fmt: skip
    out.loss.mean().backward()
    opt.step()
    for name, before in vision.items():
        assert torch.equal(hf.get_parameter(name), before), name


# --------------------------------------------------------------------------- image-token mapping


def _local_vision(model: nn.Module, family) -> None:
    """Zero every linear layer inside the vision encoder's blocks: each block becomes the
    identity (pre-norm residual), so an image token depends only on its own patches. What is
    left (patch embedding, position, merger / pooling / pixel shuffle, projector) is the
    family's real token layout."""
    for path in family.vision:
        for name, module in model.get_submodule(path).named_modules():
            parts = set(name.split("."))
            if isinstance(module, nn.Linear) and parts & {"layers", "blocks", "layer"}:
                nn.init.zeros_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_image_tokens_map_to_the_patch_grid_of_a_known_mask(world, arch):
    base = world["bases"][arch]
    model, processor = load_model(base), load_processor(base)
    family = family_of(model)
    _local_vision(model, family)
    mask = np.zeros((IMAGE_SIZE, IMAGE_SIZE), bool)
    mask[4:20, 36:60] = True  # upper right, not aligned with the patches
    blank = np.full((IMAGE_SIZE, IMAGE_SIZE, 3), 40, np.uint8)
    marked = blank.copy()
    marked[mask] = 230
    images = [Image.fromarray(blank), Image.fromarray(marked)]
    batch = encode_batch(processor, images, ["Q?", "Q?"])
    with torch.no_grad():
        inputs = family.select_image_inputs(batch, [0, 1], model.config)
        out = model.model.get_image_features(**inputs, return_dict=True)
        feats = family.unpack_features(out, batch, [0, 1], model.config)
    changed = (feats[0].pooled - feats[1].pooled).abs().amax(-1) > 1e-6  # [n_image_tokens]
    n_image = int((batch["input_ids"][1] == image_token_id(model)).sum())
    assert changed.numel() == n_image
    grid, crop = _grid_and_crop(model, processor, batch, 1, n_image)
    coverage = patch_coverage(mask, grid, crop)
    assert coverage.max() > 0 and (coverage == 0).any()
    # Exactly the tokens whose patches overlap the mask see the change.
    assert changed.tolist() == (coverage > 0).tolist()


# --------------------------------------------------------------------------- foreign checkpoints


@pytest.fixture(scope="module")
def foreign(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("foreign")
    return {arch: save_foreign(arch, root / arch) for arch in FOREIGN}


@pytest.mark.parametrize("arch", sorted(FOREIGN))
def test_a_checkpoint_not_built_by_us_runs_through_the_model_layer(world, foreign, arch):
    model, processor = load_model(foreign[arch]), load_processor(foreign[arch])
    assert family_of(model).name == CONVENTIONS[arch][0]
    batch = _batch(world, processor, n=2)
    lora = _lora(foreign[arch])
    kw = {"chunk_size": 5, "reference": None}
    losses = [
        score_batch(lora, batch, LossConfig(), use_fused=f, shared_images=s, **kw)[0].loss
        for f, s in ((True, True), (False, True), (False, False))
    ]
    for loss in losses[1:]:
        torch.testing.assert_close(loss, losses[0], rtol=0, atol=1e-5)
    n_image = int((batch.encoded["input_ids"][0] == image_token_id(model)).sum())
    if arch in ("idefics3", "internvl"):  # tiled: refused by the grid mapping, by name
        with pytest.raises(ValueError, match="tiled images"):
            _grid_and_crop(model, processor, batch.encoded, 0, n_image)
    else:
        grid, _ = _grid_and_crop(model, processor, batch.encoded, 0, n_image)
        assert grid[0] * grid[1] == n_image


@pytest.mark.parametrize("arch", sorted(FOREIGN))
def test_a_users_own_checkpoint_completes_the_cycle(foreign, arch, tmp_path):
    cfg = write_config(
        tmp_path / "c.yaml",
        tmp_path / "store",
        None,
        model={"name_or_path": str(foreign[arch])},
        sft={"max_steps": 80, "lr": 5e-3},  # width 64 from scratch: enough to answer at all
    )
    metrics = json.loads((run_cycle_direct(cfg) / "metrics.json").read_text())
    assert metrics["closed_accuracy"] is not None and metrics["n_blind"] > 0
    # Tiled images are skipped by the attention ratio (with the reason in grounding.jsonl).
    assert (metrics["n_lesion_attention"] > 0) == (arch not in ("idefics3", "internvl"))


# --------------------------------------------------------------------------- the whole cycle


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_one_round_cycle_fused_and_naive(arch, tmp_path):
    store = tmp_path / "store"
    metrics = {}
    for fused in (True, False):
        cfg = write_config(tmp_path / f"{fused}.yaml", store, arch, train={"use_fused": fused})
        evaluation = run_cycle_direct(cfg)
        metrics[fused] = json.loads((evaluation / "metrics.json").read_text())
    for m in metrics.values():
        assert m["closed_accuracy"] is not None
        assert m["n_lesion_attention"] > 0 and m["grounded_accuracy_n"] > 0  # grounding ran
    round_1 = store / "fam" / "round-1"
    outputs = {d.name: [k for k in d.iterdir() if is_finished(k)] for d in round_1.iterdir()}
    # The naive run reused every stage before train: one output each, two of train / evaluate.
    assert {k: len(v) for k, v in outputs.items()} == {
        "sample": 1, "judge": 1, "corrupt": 1, "reference": 1, "train": 2, "evaluate": 2,
    }  # fmt: skip
    ref = read_manifest(outputs["reference"][0])["counts"]
    assert ref["pairs"] > 0 and ref["pairs_with_corrupted"] > 0  # the visual term has rows
    trains = [read_manifest(d)["counts"] for d in outputs["train"]]
    assert [t["steps"] for t in trains] == [2, 2]
    # Fused and naive paths trained the same pairs to the same loss.
    assert abs(trains[0]["loss"] - trains[1]["loss"]) < 1e-5
