"""Tests of the preference trainer: branch layout and its edge cases, shared image encoding, the
reference artifact, fused == naive, training progress, exact resume, LoRA scope, continuation.

Everything runs on a tiny LLaVA (hidden 64, 2 heads, vocabulary 300, 32 px images) built in a
temporary folder from a small generated SynthLesion; pairs come from testing_support/pairs.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fire_mpo_core.config import ModelConfig
from fire_mpo_core.losses.config import LossConfig
from fire_mpo_core.models import build_tiny_model, encode_batch, load_model, load_processor
from fire_mpo_core.policy import PolicyRef
from fire_mpo_core.training.batching import (
    ImageCache,
    build_branch_batch,
    load_pairs,
    pair_problem,
)
from fire_mpo_core.training.config import LoRAConfig, ReferenceConfig, TrainConfig
from fire_mpo_core.training.lora import adapted_modules, attach_lora
from fire_mpo_core.training.preference import train_preference
from fire_mpo_core.training.reference import ReferenceTable, compute_reference_logprobs
from fire_mpo_core.training.scoring import score_batch
from testing_support.pairs import corrupt, make_pairs, write_pairs
from testing_support.world import TRAINER_WORLD, train_job

IMAGE_SIZE = TRAINER_WORLD["data"]["image_size"]
LOG2 = math.log(2.0)
needs_corruption = pytest.mark.skipif(corrupt is None, reason="fire_mpo_core.corruption missing")


# --------------------------------------------------------------------------- fixtures


# Every test here runs with one intra-op thread (the shared fixture of tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tiny_world) -> dict:
    """SynthLesion (8 train scans), a tiny LLaVA, 8 pairs with v' and their reference artifact."""
    return tiny_world(**TRAINER_WORLD)


@pytest.fixture(scope="module")
def processor(world):
    return load_processor(world["base"])


@pytest.fixture(scope="module")
def qwen_base(world, tmp_path_factory) -> Path:
    """The same tiny sizes as a Qwen2-VL (packed patches, image_grid_thw, M-RoPE)."""
    cfg = ModelConfig(arch="qwen2_vl", hidden_size=64, num_heads=2, vocab_size=300)
    return build_tiny_model(cfg, world["texts"], IMAGE_SIZE, tmp_path_factory.mktemp("qwen"))


def lora_model(base: Path, scope: str = "language_model", seed: int = 0):
    """The tiny policy with a LoRA adapter whose B matrices are random (policy != reference)."""
    model = load_model(base)
    torch.manual_seed(seed)
    model = attach_lora(model, PolicyRef(base=str(base)), LoRAConfig(r=4, dropout=0.0, scope=scope))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.5)
    model.train()
    return model


def small_cfg(**kw) -> TrainConfig:
    defaults = {
        "max_length": 128,
        "batch_size": 4,
        "lr": 1e-2,
        "logging_every": 1,
        "save_every": None,
        "lora": LoRAConfig(r=4, alpha=8, dropout=0.0),
    }
    defaults.update(kw)
    return TrainConfig(**defaults)


def batch_of(world, processor, n: int | None = 4, pairs=None, max_length: int = 128):
    pairs = pairs if pairs is not None else load_pairs(world["pairs_path"])[:n]
    images = ImageCache(world["data"], world["corrupt_root"])
    return build_branch_batch(processor, pairs, images, max_length)


# --------------------------------------------------------------------------- config


def test_config_validators_name_both_fields():
    with pytest.raises(ValueError, match=r"chunk_size.*use_fused"):
        TrainConfig(chunk_size=64)
    assert TrainConfig(chunk_size=64, use_fused=True).effective_chunk_size == 64
    assert TrainConfig(use_fused=True).effective_chunk_size == LossConfig().chunk_size
    with pytest.raises(ValueError, match=r"save_every.*max_steps"):
        TrainConfig(save_every=10, max_steps=5)
    with pytest.raises(ValueError, match=r"lm_head.*scope"):
        LoRAConfig(target_modules=["q_proj", "lm_head"], scope="language_model")
    with pytest.raises(ValueError, match="extra"):
        TrainConfig(learning_rate=1e-3)
    ref = ReferenceConfig.for_training(TrainConfig(max_length=96, dtype="bfloat16"))
    assert (ref.max_length, ref.dtype) == (96, "bfloat16")


# --------------------------------------------------------------------------- batch layout


@needs_corruption
def test_branch_layout_one_batch_and_span_masks(world, processor):
    pairs = load_pairs(world["pairs_path"])[:3]
    pairs[2] = pairs[2].model_copy(update={"corrupted_image": None})
    batch = batch_of(world, processor, pairs=pairs)
    b, c = 3, 2
    enc = batch.encoded
    assert batch.num_rows == 2 * b + 2 * c == enc["input_ids"].shape[0]
    assert batch.rows["clean_chosen"].tolist() == [0, 1, 2]
    assert batch.rows["clean_rejected"].tolist() == [3, 4, 5]
    assert batch.rows["corrupt_chosen"].tolist() == [6, 7, -1]
    assert batch.rows["corrupt_rejected"].tolist() == [8, 9, -1]
    assert batch.has_corrupted.tolist() == [True, True, False]
    # Distinct images: the clean scans (shared by both clean rows) plus 2 corrupted ones.
    n_clean = len({p.image for p in pairs})
    assert len(batch.image_keys) == n_clean + c
    assert batch.row_image[0] == batch.row_image[3] and batch.row_image[6] == batch.row_image[8]
    # Whole-answer spans: every response token but EOS is marked, on every row.
    labels, span = enc["labels"], enc["span_mask"]
    for r in range(batch.num_rows):
        resp = (labels[r] != -100).sum().item()
        assert span[r].sum().item() == resp - 1
        assert not span[r][labels[r] == -100].any()
    tok = processor.tokenizer
    first = labels[0][labels[0] != -100].tolist()
    assert tok.decode(first[:-1]) == pairs[0].chosen and first[-1] == tok.eos_token_id


def test_partial_span_marks_only_overlapping_tokens(world, processor):
    pair = load_pairs(world["pairs_path"])[0]
    answer = pair.chosen
    chosen = f"The finding is {answer} today."
    start = chosen.index(answer)
    pair = pair.model_copy(
        update={"chosen": chosen, "chosen_spans": [(start, start + len(answer))]}
    )
    batch = batch_of(world, processor, pairs=[pair])
    row = batch.rows["clean_chosen"][0]
    ids = batch.encoded["input_ids"][row][batch.encoded["span_mask"][row]]
    assert processor.tokenizer.decode(ids.tolist()).strip() == answer


def test_empty_span_pair_is_rejected(world, tmp_path):
    good = load_pairs(world["pairs_path"])[0]
    bad = good.model_copy(update={"id": "empty-span", "chosen_spans": [(2, 2)]})
    outside = good.model_copy(update={"id": "outside", "rejected_spans": [(0, 999)]})
    assert "empty span" in pair_problem(bad)
    assert "outside" in pair_problem(outside)
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(p.model_dump_json() for p in (good, bad, outside)) + "\n")
    rejects: list[tuple[str, str]] = []
    kept = load_pairs(path, on_reject=lambda i, r: rejects.append((i, r)))
    assert [p.id for p in kept] == [good.id]
    assert [i for i, _ in rejects] == ["empty-span", "outside"]
    with pytest.raises(ValueError, match="empty span"):
        load_pairs(path)


def test_long_response_is_truncated_never_image_tokens(world, processor):
    pair = load_pairs(world["pairs_path"])[0]
    long = pair.chosen + " and the rest is filler text" * 40
    pair = pair.model_copy(update={"chosen": long})
    max_length = 80
    batch = batch_of(world, processor, pairs=[pair], max_length=max_length)
    enc = batch.encoded
    row = batch.rows["clean_chosen"][0]
    n_image = (IMAGE_SIZE // 8) ** 2
    assert enc["response_truncated"][row]
    assert enc["attention_mask"][row].sum() == max_length
    assert (enc["input_ids"][row] == processor.image_token_id).sum() == n_image
    # The short rejected row keeps its whole response and EOS.
    rej = batch.rows["clean_rejected"][0]
    assert not enc["response_truncated"][rej]
    model = lora_model(world["base"])
    out, _ = score_batch(model, batch, LossConfig(), use_fused=False, chunk_size=64, reference=None)
    assert torch.isfinite(out.loss).all()


# --------------------------------------------------------------------------- scoring


@needs_corruption
def test_pair_without_corrupted_image_skips_visual_term(world, processor):
    pairs = load_pairs(world["pairs_path"])[:3]
    pairs[1] = pairs[1].model_copy(update={"corrupted_image": None})
    batch = batch_of(world, processor, pairs=pairs)
    model = lora_model(world["base"])
    kw = {"use_fused": False, "chunk_size": 64, "reference": None}
    with torch.no_grad():
        out, _ = score_batch(model, batch, LossConfig(gamma=0.1), **kw)
        no_visual, _ = score_batch(model, batch, LossConfig(gamma=0.0), **kw)
    assert out.visual_active.tolist() == [True, False, True]
    assert out.visual_margin[1] == 0
    torch.testing.assert_close(out.loss[1], no_visual.loss[1], rtol=0, atol=1e-6)
    visual = -torch.nn.functional.logsigmoid(out.visual_margin[0])
    torch.testing.assert_close(out.loss[0] - no_visual.loss[0], 0.1 * visual, rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
def test_shared_image_features_match_per_row_encoding(world, qwen_base, arch):
    base = world["base"] if arch == "llava" else qwen_base
    processor = load_processor(base)
    batch = batch_of(world, processor, n=3)
    model = lora_model(base)
    calls: list[int] = []
    vision = model.get_base_model().model
    tower = getattr(vision, "vision_tower", None) or vision.visual
    tower.register_forward_hook(lambda m, a, o: calls.append(1))
    kw = {"use_fused": False, "chunk_size": 64, "reference": None}
    with torch.no_grad():
        shared, stats = score_batch(model, batch, LossConfig(), shared_images=True, **kw)
        n_shared = len(calls)
        per_row, stats_rows = score_batch(model, batch, LossConfig(), shared_images=False, **kw)
    torch.testing.assert_close(shared.loss, per_row.loss, rtol=0, atol=1e-5)
    assert n_shared == 1  # one vision pass for all distinct images of the batch
    assert stats["image_encodes"] == len(batch.image_keys)
    assert stats_rows["image_encodes"] == 2 * batch.num_rows  # policy + reference, every row


@needs_corruption
@pytest.mark.parametrize(
    ("arch", "name"),
    [("llava", "fire_mpo"), ("llava", "rrpo"), ("llava", "mdpo"), ("qwen2_vl", "fire_mpo")],
)
def test_fused_equals_naive_and_artifact_equals_in_loop(world, qwen_base, arch, name, tmp_path):
    base = world["base"] if arch == "llava" else qwen_base
    processor = load_processor(base)
    batch = batch_of(world, processor, n=4)
    if arch == "llava":
        table = ReferenceTable.load(world["reference"])
    else:
        ref_cfg = ReferenceConfig(max_length=128)
        info = compute_reference_logprobs(
            PolicyRef(base=str(base)), world["pairs_path"], world["data"], None, ref_cfg, tmp_path
        )
        table = ReferenceTable.load(info["path"])
    ref = table.lookup(batch.pair_ids)
    model = lora_model(base)
    cfg = LossConfig(name=name)
    results = {}
    for fused in (False, True):
        for artifact in (False, True):
            model.zero_grad(set_to_none=True)
            out, _ = score_batch(
                model,
                batch,
                cfg,
                use_fused=fused,
                chunk_size=7,  # several chunks, one ragged
                reference=ref if artifact else None,
            )
            out.loss.mean().backward()
            grads = torch.cat(
                [p.grad.flatten() for n, p in model.named_parameters() if p.requires_grad]
            )
            results[fused, artifact] = (out.loss.detach(), out.kl_forward.detach(), grads)
    loss0, kl0, grad0 = results[False, False]
    assert loss0.shape == (4,) and (loss0 > 0).all()
    if name != "mdpo":
        assert (kl0 > 0).all()  # random adapter: the policy has moved off the reference
    for key, (loss, kl, grad) in results.items():
        torch.testing.assert_close(loss, loss0, rtol=0, atol=1e-5, msg=str(key))
        torch.testing.assert_close(kl, kl0, rtol=0, atol=1e-5, msg=str(key))
        torch.testing.assert_close(grad, grad0, rtol=1e-4, atol=1e-5, msg=str(key))


def test_reference_artifact_holds_base_model_log_probs(world, processor):
    """Hand-computed from one plain forward of the base model per sequence."""
    table = ReferenceTable.load(world["reference"])
    info = world["reference_info"]
    pairs = load_pairs(world["pairs_path"])
    assert table.pair_ids == [p.id for p in pairs] and table.max_length == 128
    assert info["image_encodes"] < info["sequences"]  # shared across branches
    model = load_model(world["base"])
    images = ImageCache(world["data"], world["corrupt_root"])
    pair = pairs[2]
    row = table.pair_ids.index(pair.id)
    cases = [
        (0, ("clean", pair.image), pair.chosen, pair.chosen_spans),
        (1, ("clean", pair.image), pair.rejected, pair.rejected_spans),
    ]
    if pair.corrupted_image is not None:
        cases.append((3, ("corrupt", pair.corrupted_image), pair.rejected, pair.rejected_spans))
    for col, key, text, spans in cases:
        enc = encode_batch(processor, [images.get(key)], [pair.question], [text], [spans], 128)
        with torch.no_grad():
            logits = model(input_ids=enc["input_ids"], pixel_values=enc["pixel_values"]).logits
        lp = torch.log_softmax(logits[0, :-1], -1)
        labels, span = enc["labels"][0, 1:], enc["span_mask"][0, 1:]
        resp = labels != -100
        tok = lp[resp].gather(-1, labels[resp].unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(table.logp[row, col], tok.sum(), rtol=0, atol=1e-4)
        torch.testing.assert_close(
            table.span_logp[row, col], tok[span[resp]].sum(), rtol=0, atol=1e-4
        )
        assert table.num_tokens[row, col] == resp.sum()


def test_artifact_mismatch_is_refused(world, tmp_path):
    cfg = small_cfg(max_length=100, max_steps=1)
    with pytest.raises(ValueError, match="max_length"):
        train_preference(train_job(world, cfg, tmp_path / "out"))


# --------------------------------------------------------------------------- training


@needs_corruption
def test_training_lowers_loss_and_writes_outputs(world, tmp_path):
    cfg = small_cfg(max_steps=8, warmup_ratio=0.0, merge_adapter=True)
    seen: list[tuple[int, int]] = []
    out = tmp_path / "train"
    result = train_preference(
        train_job(world, cfg, out),
        on_step=lambda step, total, m: seen.append((step, total)),
    )
    assert seen == [(s, 8) for s in range(1, 9)]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == list(range(1, 9))
    first, last = lines[0], lines[-1]
    # LoRA B starts at zero: policy == reference, all rewards 0, no KL, every pair has v'.
    # loss = -log sig(0) + gamma * (-log sig(0)) + alpha * 0 = (1 + gamma) log 2.
    assert first["loss"] == pytest.approx((1 + 0.1) * LOG2, abs=1e-4)
    # LoRA starts at zero: policy == reference, so every reward margin is 0 up to float noise
    # (the reference artifact was scored in other batches; the sign of a 1e-9 margin is noise,
    # so reward *accuracy* at step 1 is not meaningful, the margin is).
    assert first["rewards/margin"] == pytest.approx(0, abs=1e-5)
    assert first["kl/forward"] == pytest.approx(0, abs=1e-6)
    # Steps 7 and 8 are the last epoch's two micro-batches (8 pairs, batch 4): its mean loss,
    # not one batch's, so that which batch an epoch ends on does not decide the check.
    last_epoch = (lines[-2]["loss"] + lines[-1]["loss"]) / 2
    assert last_epoch < first["loss"] - 0.05
    assert last["rewards/accuracy"] >= 0.75 and last["rewards/margin"] > 0
    for key in (
        "loss/ranking",
        "loss/visual",
        "loss/kl",
        "rewards/chosen",
        "rewards/rejected",
        "kl/reverse",
        "visual/margin",
        "grad_norm",
        "pairs_per_s",
        "lr",
    ):
        assert key in last
    # Policy: one encode per distinct clean scan and per v'; the in-step reference reuses them.
    assert 1.0 <= result.image_encodes_per_pair_step <= 2.0
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert not (out / "checkpoints").exists()
    assert result.policy == PolicyRef(
        base=world["policy"].base, adapter=str((out / "adapter").resolve()), trust_remote_code=False
    )
    assert result.steps == 8 and result.pairs == 8 and result.rejects == []
    # The merged model computes what base + adapter computes.
    from peft import PeftModel

    merged = load_model(result.merged)
    peft_model = PeftModel.from_pretrained(load_model(world["base"]), out / "adapter")
    processor = load_processor(result.merged)
    batch = batch_of(world, processor, n=2)
    inputs = {k: batch.encoded[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    with torch.no_grad():
        torch.testing.assert_close(
            merged(**inputs).logits, peft_model(**inputs).logits, rtol=0, atol=1e-4
        )


def _adapter(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapter" / "adapter_model.safetensors"))


@needs_corruption
def test_exact_resume_after_interruption(world, tmp_path):
    cfg = small_cfg(
        max_steps=5, batch_size=3, grad_accum=2, save_every=2, lora=LoRAConfig(r=4, dropout=0.1)
    )
    full = train_preference(train_job(world, cfg, tmp_path / "full"))
    assert full.resumed_from_step is None

    class Stop(Exception):
        pass

    def stop_at_3(step, total, metrics):
        if step == 3:
            raise Stop

    with pytest.raises(Stop):
        train_preference(train_job(world, cfg, tmp_path / "cut"), on_step=stop_at_3)
    assert (tmp_path / "cut" / "checkpoints" / "step-2" / "trainer_state.json").is_file()
    resumed = train_preference(train_job(world, cfg, tmp_path / "cut"))
    assert resumed.resumed_from_step == 2
    a, b = _adapter(tmp_path / "full"), _adapter(tmp_path / "cut")
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert torch.equal(a[k], b[k]), k
    lines = {
        d: [json.loads(x) for x in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
        for d in ("full", "cut")
    }
    assert [m["step"] for m in lines["cut"]] == [1, 2, 3, 4, 5]
    assert [m["loss"] for m in lines["cut"]] == [m["loss"] for m in lines["full"]]


def test_lora_scope_language_model_only(world):
    lm = lora_model(world["base"], scope="language_model")
    names = adapted_modules(lm)
    assert names and all(n.startswith("model.language_model.") for n in names)
    trainable = [n for n, p in lm.named_parameters() if p.requires_grad]
    assert trainable and all(".language_model." in n and "lora_" in n for n in trainable)
    everywhere = lora_model(world["base"], scope="all")
    names_all = adapted_modules(everywhere)
    assert any(n.startswith("model.vision_tower.") for n in names_all)
    assert any(n.startswith("model.multi_modal_projector.") for n in names_all)
    assert not any(n == "lm_head" for n in names_all)


@needs_corruption
def test_vision_adapter_recomputes_reference_image_features(world, processor):
    """With adapters in the vision tower the reference's clean images are encoded again."""
    batch = batch_of(world, processor, n=4)
    ref = ReferenceTable.load(world["reference"]).lookup(batch.pair_ids)
    model = lora_model(world["base"], scope="all")
    n_clean = len({k for k in batch.image_keys if k[0] == "clean"})
    with torch.no_grad():
        out, stats = score_batch(
            model,
            batch,
            LossConfig(),
            use_fused=False,
            chunk_size=64,
            reference=ref,
            vision_adapted=True,
        )
    assert stats["image_encodes"] == len(batch.image_keys) + n_clean
    assert torch.isfinite(out.loss).all()


def test_continue_from_previous_adapter(world, tmp_path):
    cfg = small_cfg(max_steps=2)
    first = train_preference(train_job(world, cfg, tmp_path / "round1"))
    tiny_lr = small_cfg(max_steps=1, lr=1e-12, warmup_ratio=0.0)
    second = train_preference(train_job(world, tiny_lr, tmp_path / "round2", policy=first.policy))
    before, after = _adapter(tmp_path / "round1"), _adapter(tmp_path / "round2")
    lora_b = [k for k in before if "lora_B" in k]
    assert lora_b and any(before[k].abs().sum() > 0 for k in lora_b)
    for k in before:
        torch.testing.assert_close(after[k], before[k], rtol=0, atol=1e-9)
    # Continuing from a moved adapter: the first loss is no longer the zero-adapter value.
    assert second.final_metrics["rewards/margin"] != 0


def test_pairs_without_corrupted_images_train_without_visual_term(world, tmp_path):
    missing = make_pairs(world["records"], 5)[4].model_copy(
        update={"id": "no-such-image", "image": "images/missing.png"}
    )
    plain = tmp_path / "plain"
    pairs_path = write_pairs(
        world["records"], world["data"], plain, n=4, with_corrupted=False, extra=[missing]
    )
    # No reference_path: the trainer computes the artifact itself, into out/reference.
    out = tmp_path / "out"
    job = train_job(world, small_cfg(max_steps=1), out, pairs_path=pairs_path, reference_path=None)
    result = train_preference(job)
    table = ReferenceTable.load(out / "reference")
    assert len(table.pair_ids) == 4 and not table.has_corrupted.any()
    assert [r["id"] for r in result.rejects] == ["no-such-image"]
    assert "not found" in result.rejects[0]["reason"]
    m = result.final_metrics
    assert m["visual/active_fraction"] == 0 and m["loss/visual"] == 0
    assert m["loss"] == pytest.approx(LOG2, abs=1e-4)  # zero adapter: -log sig(0) only
    assert m["images/encodes_per_pair"] == pytest.approx(
        len({p.image for p in make_pairs(world["records"], 4)}) / 4
    )


def test_group_by_length_orders_micro_batches_by_length(world, tmp_path):
    """`group_by_length`: each epoch is still a permutation (seeded, so resume is exact), but
    micro-batches hold pairs of similar length: less padding than a random order."""
    from fire_mpo_core.training.data_order import DataOrder

    lengths = [5, 50, 6, 48, 7, 52, 4, 49]
    order = DataOrder(8, 2, seed=0, lengths=lengths)
    again = DataOrder(8, 2, seed=0, lengths=lengths)
    batches = [order.micro_batch(k) for k in range(4)]
    assert sorted(i for b in batches for i in b) == list(range(8))
    assert batches == [again.micro_batch(k) for k in range(4)]
    # Every micro-batch is all short (< 10) or all long (> 40): the padding is within a batch.
    assert all(len({lengths[i] < 10 for i in b}) == 1 for b in batches)
    assert order.micro_batch(4) != batches[0] or order.micro_batch(5) != batches[1]  # epoch 2
    cfg = small_cfg(max_steps=2, batch_size=3, group_by_length=True)
    out = train_preference(train_job(world, cfg, tmp_path / "grouped"))
    assert out.steps == 2


@needs_corruption
@pytest.mark.parametrize(("artifact", "fused"), [(False, False), (True, True)])
def test_previous_round_reference_starts_equal_to_the_policy(world, tmp_path, artifact, fused):
    """loop.reference: previous_round. Round 2 starts from round 1's adapter and its frozen
    reference IS round 1's policy, so the first step's rewards and KL are 0 (up to float),
    in-step on every row (naive) and through the artifact the trainer computes itself (fused);
    the saved adapter holds the trained adapter only."""
    first = train_preference(train_job(world, small_cfg(max_steps=2), tmp_path / "round1"))
    cfg = small_cfg(
        max_steps=1, lr=1e-12, warmup_ratio=0.0, use_fused=fused, use_reference_artifact=artifact
    )
    out = {}
    for name, adapter in (("previous_round", Path(first.policy.adapter)), ("base", None)):
        job = train_job(
            world,
            cfg,
            tmp_path / name,
            policy=first.policy,
            reference_path=None,
            reference_adapter=adapter,
        )
        out[name] = train_preference(job).final_metrics
    prev, base = out["previous_round"], out["base"]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margin", "kl/forward", "kl/reverse"):
        assert abs(prev[key]) < 1e-5, (key, prev[key])
    assert abs(base["rewards/margin"]) > 1e-3 and base["kl/forward"] > 1e-5  # moved off the base
    assert sorted(p.name for p in (tmp_path / "previous_round" / "adapter").iterdir()) == sorted(
        p.name for p in (tmp_path / "round1" / "adapter").iterdir()
    )
