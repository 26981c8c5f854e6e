"""Tests of the model layer: tiny model build / save / load for LLaVA and Qwen2-VL, deterministic
rebuilds, input encoding (labels, span masks, truncation, padding), batched generation and a short
overfit through the real training path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    CLIPImageProcessorPil,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
)

from fire_mpo_core.config import ModelConfig
from fire_mpo_core.models import (
    IGNORE_INDEX,
    build_prompts,
    build_tiny_model,
    count_parameters,
    create_tiny_model,
    encode_batch,
    generate,
    load_model,
    load_processor,
    model_inputs,
    mrope_sections,
    parameter_breakdown,
    shift_for_next_token,
)
from testing_support.world import CORPUS, QUADRANTS

ARCHS = ["llava", "qwen2_vl"]
IMAGE_SIZE = 64


def lesion_image(quadrant: int, size: int = IMAGE_SIZE) -> Image.Image:
    """A grey scan-like image with one bright disc in the given quadrant (0..3)."""
    yy, xx = np.mgrid[:size, :size]
    cy = size // 4 if quadrant < 2 else 3 * size // 4
    cx = size // 4 if quadrant % 2 == 0 else 3 * size // 4
    img = np.full((size, size), 60, np.uint8)
    img[(yy - cy) ** 2 + (xx - cx) ** 2 <= (size // 8) ** 2] = 220
    return Image.fromarray(img)


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    """One saved tiny model per architecture (default sizes)."""
    root = tmp_path_factory.mktemp("tiny")
    return {
        arch: build_tiny_model(ModelConfig(arch=arch), CORPUS, IMAGE_SIZE, root / arch)
        for arch in ARCHS
    }


@pytest.fixture(scope="module")
def loaded(built) -> dict[str, tuple]:
    return {arch: (load_model(path), load_processor(path)) for arch, path in built.items()}


# --- build / save / load -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "model_cls", "processor_cls", "image_processor_cls", "n_image_tokens"),
    [
        ("llava", LlavaForConditionalGeneration, LlavaProcessor, CLIPImageProcessorPil, 64),
        # Qwen2-VL: 8x8 patches of 8 px, merged 2x2 by the patch merger -> 16 tokens.
        (
            "qwen2_vl",
            Qwen2VLForConditionalGeneration,
            Qwen2VLProcessor,
            Qwen2VLImageProcessorPil,
            16,
        ),
    ],
)
def test_build_save_load(
    built, loaded, arch, model_cls, processor_cls, image_processor_cls, n_image_tokens
):
    files = {p.name for p in built[arch].iterdir()}
    assert {
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "processor_config.json",
        "chat_template.jinja",
    } <= files
    model, processor = loaded[arch]
    assert type(model) is model_cls
    assert isinstance(processor, processor_cls)
    assert type(processor.image_processor) is image_processor_cls  # PIL backend, no torchvision
    assert not model.training
    tok = processor.tokenizer
    assert tok.eos_token == "<|im_end|>"
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert model.config.text_config.vocab_size == len(tok)

    batch = encode_batch(processor, [lesion_image(0)], ["Where is the lesion?"])
    ids = batch["input_ids"][0]
    assert int((ids == processor.image_token_id).sum()) == n_image_tokens
    prompt = processor.tokenizer.decode(ids[ids != processor.image_token_id])
    assert prompt.endswith("Where is the lesion?<|im_end|>\n<|im_start|>assistant\n")


def test_qwen2_vl_processor_is_image_only(built, loaded):
    _, processor = loaded["qwen2_vl"]
    assert processor.image_only and not hasattr(processor, "video_processor")
    saved = json.loads((built["qwen2_vl"] / "processor_config.json").read_text())
    # Saved under the stock class name, so AutoProcessor reads it where torchvision exists.
    assert saved["processor_class"] == "Qwen2VLProcessor"
    batch = encode_batch(processor, [lesion_image(1), lesion_image(2)], ["Yes", "No"])
    assert batch["image_grid_thw"].tolist() == [[1, 8, 8], [1, 8, 8]]
    # patches x (channels * temporal patch * patch^2)
    assert tuple(batch["pixel_values"].shape) == (2 * 64, 3 * 2 * 8 * 8)


def test_load_processor_rejects_text_only_folder(built, tmp_path):
    _, processor = create_tiny_model(ModelConfig(), CORPUS, IMAGE_SIZE)
    processor.tokenizer.save_pretrained(tmp_path)
    with pytest.raises(TypeError, match="no image processor"):
        load_processor(tmp_path)
    with pytest.raises(OSError):
        load_processor(tmp_path / "missing")


@pytest.mark.parametrize("arch", ARCHS)
def test_rebuild_is_byte_identical(built, arch, tmp_path):
    again = build_tiny_model(ModelConfig(arch=arch), CORPUS, IMAGE_SIZE, tmp_path / "again")
    for path in sorted(built[arch].iterdir()):
        assert (again / path.name).read_bytes() == path.read_bytes(), path.name
    other = build_tiny_model(ModelConfig(arch=arch, seed=1), CORPUS, IMAGE_SIZE, tmp_path / "s1")
    weights = "model.safetensors"
    assert (other / weights).read_bytes() != (built[arch] / weights).read_bytes()
    assert (other / "tokenizer.json").read_bytes() == (built[arch] / "tokenizer.json").read_bytes()


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_shape_and_loaded_equals_in_memory(loaded, arch):
    model, processor = loaded[arch]
    fresh, _ = create_tiny_model(ModelConfig(arch=arch), CORPUS, IMAGE_SIZE)
    fresh.eval()
    images = [lesion_image(i) for i in range(3)]
    questions = ["Where is the lesion?", "Yes", "How many lesions are there?"]
    batch = encode_batch(processor, images, questions, responses=["upper left", "No", "One"])
    with torch.no_grad():
        logits = model(**model_inputs(batch)).logits
        logits_fresh = fresh(**model_inputs(batch)).logits
    b, t = batch["input_ids"].shape
    assert logits.shape == (b, t, len(processor.tokenizer))
    torch.testing.assert_close(logits, logits_fresh, rtol=0, atol=0)


def test_llava_parameter_count_matches_formula(loaded):
    model, processor = loaded["llava"]
    v, d, layers = len(processor.tokenizer), 192, 2
    e, vlayers, p, n = 64, 2, 8, 64
    vision = 3 * p * p * e + e + (n + 1) * e + 4 * e + vlayers * (12 * e * e + 13 * e)
    projector = e * d + d + d * d + d
    decoder = v * d + layers * (16 * d * d + 2 * d) + d
    head = v * d
    assert parameter_breakdown(model) == {
        "model.vision_tower": vision,
        "model.multi_modal_projector": projector,
        "model.language_model": decoder,
        "lm_head": head,
    }
    assert count_parameters(model) == vision + projector + decoder + head
    model.model.vision_tower.requires_grad_(False)
    try:
        assert count_parameters(model, trainable_only=True) == projector + decoder + head
    finally:
        model.model.vision_tower.requires_grad_(True)


def test_mrope_sections_sum_to_half_head_dim(loaded):
    assert mrope_sections(32) == [2, 7, 7]
    assert mrope_sections(48) == [4, 10, 10]
    assert mrope_sections(128) == [8, 28, 28]
    with pytest.raises(ValueError, match="even"):
        mrope_sections(33)
    model, _ = loaded["qwen2_vl"]
    text = model.config.text_config
    head_dim = text.hidden_size // text.num_attention_heads
    assert sum(text.rope_parameters["mrope_section"]) == head_dim // 2
    assert text.rope_parameters["rope_theta"] == 100.0


# --- encoding ----------------------------------------------------------------------------------


def _prompt_lengths(processor, images, questions) -> list[int]:
    """Prompt token counts, tokenized one example at a time (no padding involved)."""
    out = []
    for image, prompt in zip(images, build_prompts(processor, questions)):
        enc = processor(images=[image], text=[prompt], add_special_tokens=False)
        out.append(len(enc["input_ids"][0]))
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_labels_mask_prompt_and_padding(loaded, arch):
    _, processor = loaded[arch]
    tok = processor.tokenizer
    images = [lesion_image(0), lesion_image(3)]
    questions = ["Where is the lesion?", "Is there a lesion in the lower right?"]
    responses = ["The lesion is in the upper left of the lung.", "Yes"]
    batch = encode_batch(processor, images, questions, responses=responses)
    prompt_lens = _prompt_lengths(processor, images, questions)
    for i, response in enumerate(responses):
        ids = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        p, r = prompt_lens[i], len(ids)
        labels, mask = batch["labels"][i], batch["attention_mask"][i]
        assert (labels[:p] == IGNORE_INDEX).all()
        assert labels[p : p + r].tolist() == ids
        assert batch["input_ids"][i, p : p + r].tolist() == ids
        assert (labels[p + r :] == IGNORE_INDEX).all()
        assert mask[: p + r].all() and not mask[p + r :].any()  # right padding
        assert tok.decode(labels[labels != IGNORE_INDEX]) == response + tok.eos_token
    assert not batch["span_mask"].any()
    assert not batch["response_truncated"].any()


@pytest.mark.parametrize("arch", ARCHS)
def test_span_mask_marks_exactly_the_span_tokens(loaded, arch):
    _, processor = loaded[arch]
    tok = processor.tokenizer
    response = "A small hyperdense round lesion in the upper left."
    spans = [(response.index("hyperdense"), response.index("hyperdense") + len("hyperdense"))]
    spans.append((response.index("upper left"), response.index("upper left") + len("upper left")))
    batch = encode_batch(
        processor,
        [lesion_image(0), lesion_image(1)],
        ["Describe the lesion.", "Where is the lesion?"],
        responses=[response, "upper right"],
        response_spans=[spans, [(0, 5)]],
    )
    span = batch["span_mask"]
    assert not (span & (batch["labels"] == IGNORE_INDEX)).any()  # only response tokens
    marked = batch["input_ids"][0][span[0]]
    # Two separate runs of marked tokens, each decoding to its span (plus its leading space).
    positions = span[0].nonzero().flatten().tolist()
    runs = np.split(np.array(positions), np.where(np.diff(positions) > 1)[0] + 1)
    assert len(runs) == 2
    texts = [tok.decode(batch["input_ids"][0][run.tolist()]).strip() for run in runs]
    assert texts == ["hyperdense", "upper left"]
    assert tok.decode(marked).split() == ["hyperdense", "upper", "left"]
    assert tok.decode(batch["input_ids"][1][span[1]]).strip() == "upper"


@pytest.mark.parametrize("arch", ARCHS)
def test_truncation_cuts_the_response_only(loaded, arch):
    _, processor = loaded[arch]
    tok = processor.tokenizer
    images = [lesion_image(0), lesion_image(1)]
    questions = ["Where is the lesion?", "Yes"]
    responses = ["There is a large irregular hypodense lesion in the right lower lobe.", "No"]
    prompt_lens = _prompt_lengths(processor, images, questions)
    max_length = max(prompt_lens) + 3
    full = encode_batch(processor, images, questions, responses=responses)
    cut = encode_batch(processor, images, questions, responses=responses, max_length=max_length)
    assert cut["input_ids"].shape[1] == max_length
    assert cut["response_truncated"].tolist() == [True, False]
    long_ids = tok(responses[0], add_special_tokens=False)["input_ids"]
    p0 = prompt_lens[0]
    keep = max_length - p0
    assert cut["labels"][0, p0:].tolist() == long_ids[:keep]  # no EOS after a cut
    assert cut["input_ids"][0, :p0].tolist() == full["input_ids"][0, :p0].tolist()
    torch.testing.assert_close(cut["pixel_values"], full["pixel_values"])
    short = full["labels"][1][full["labels"][1] != IGNORE_INDEX]
    assert cut["labels"][1][cut["labels"][1] != IGNORE_INDEX].tolist() == short.tolist()

    with pytest.raises(ValueError, match=rf"{p0} tokens.*max_length is {p0 - 1}"):
        encode_batch(
            processor, images[:1], questions[:1], responses=responses[:1], max_length=p0 - 1
        )


def test_encode_batch_rejects_bad_inputs(loaded):
    _, processor = loaded["llava"]
    img = lesion_image(0)
    with pytest.raises(ValueError, match="at least one"):
        encode_batch(processor, [], [])
    with pytest.raises(ValueError, match="2 images for 1 questions"):
        encode_batch(processor, [img, img], ["Yes"])
    with pytest.raises(ValueError, match="without responses"):
        encode_batch(processor, [img], ["Yes"], response_spans=[[(0, 1)]])
    with pytest.raises(ValueError, match="padding_side"):
        encode_batch(processor, [img], ["Yes"], padding_side="middle")


@pytest.mark.parametrize("arch", ARCHS)
def test_left_padding_generation_inputs(loaded, arch):
    _, processor = loaded[arch]
    images = [lesion_image(0), lesion_image(1)]
    questions = ["Yes", "Is the lesion hyperdense or hypodense?"]
    left = encode_batch(processor, images, questions, padding_side="left")
    right = encode_batch(processor, images, questions)
    assert "labels" not in left and "span_mask" not in left
    pad = processor.tokenizer.pad_token_id
    n_pad = int((left["attention_mask"][0] == 0).sum())
    assert n_pad > 0
    assert (left["input_ids"][0, :n_pad] == pad).all()
    assert left["input_ids"][0, n_pad:].tolist() == right["input_ids"][0, :-n_pad].tolist()
    assert left["input_ids"][1].tolist() == right["input_ids"][1].tolist()


# --- generation and training path ------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_generate_sampling_is_seeded(loaded, arch):
    model, processor = loaded[arch]
    images = [lesion_image(0), lesion_image(1), lesion_image(2)]
    questions = ["Where is the lesion?", "Yes", "No"]
    kwargs = dict(max_new_tokens=8, do_sample=True, num_return_sequences=3, batch_size=2)
    a = generate(model, processor, images, questions, seed=5, **kwargs)
    b = generate(model, processor, images, questions, seed=5, **kwargs)
    c = generate(model, processor, images, questions, seed=6, **kwargs)
    assert a == b
    assert a != c
    assert len(a) == 3 and all(len(r) == 3 for r in a)
    with pytest.raises(ValueError, match="greedy"):
        generate(model, processor, images, questions, num_return_sequences=2)


ANSWERS = [f"The lesion is in the {q} of the lung." for q in QUADRANTS]


@pytest.fixture(scope="module", params=ARCHS)
def overfit(request) -> tuple:
    """A fresh tiny model trained 30 AdamW steps on 4 (image, question, answer) examples through
    the real path: encode_batch -> forward with labels -> backward. Returns (model, processor,
    per-step losses, per-step losses recomputed with shift_for_next_token)."""
    model, processor = create_tiny_model(ModelConfig(arch=request.param), CORPUS, IMAGE_SIZE)
    images = [lesion_image(q) for q in range(4)]
    batch = encode_batch(processor, images, ["Where is the lesion?"] * 4, responses=ANSWERS)
    inputs = model_inputs(batch)
    model.train()
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses, ours = [], []
    for _ in range(30):
        out = model(**inputs, labels=batch["labels"])
        logits, labels, _ = shift_for_next_token(out.logits, batch["labels"])
        ce = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX
        )
        losses.append(out.loss.item())
        ours.append(ce.item())
        optim.zero_grad()
        out.loss.backward()
        optim.step()
    model.eval()
    return model, processor, losses, ours


def test_overfit_lowers_the_loss(overfit):
    _, processor, losses, ours = overfit
    # The documented alignment reproduces the model's own (internally shifted) loss.
    np.testing.assert_allclose(ours, losses, rtol=1e-5)
    assert losses[0] > 0.7 * np.log(len(processor.tokenizer))  # near-uniform at random init
    assert losses[-1] < 0.15 * losses[0]


def _greedy_without_cache(model, processor, image, question, max_new_tokens):
    """Reference greedy decoding: a full forward pass per new token, no KV cache, no padding."""
    batch = encode_batch(processor, [image], [question])
    ids, eos = batch["input_ids"], processor.tokenizer.eos_token_id
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            step = {**model_inputs(batch), "input_ids": ids, "attention_mask": torch.ones_like(ids)}
            if "mm_token_type_ids" in step:
                pad = torch.zeros(1, ids.shape[1] - batch["input_ids"].shape[1], dtype=torch.long)
                step["mm_token_type_ids"] = torch.cat([batch["mm_token_type_ids"], pad], 1)
            token = int(model(**step).logits[0, -1].argmax())
            if token == eos:
                break
            new.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], 1)
    return processor.tokenizer.decode(new, skip_special_tokens=True).strip()


def test_generate_left_padding_matches_reference_decoding(overfit):
    model, processor, _, _ = overfit
    images = [lesion_image(q) for q in range(4)]
    q, long_q = "Where is the lesion?", "Is the lesion hyperdense or hypodense? How many lesions?"
    reference = _greedy_without_cache(model, processor, images[1], q, max_new_tokens=16)
    alone = generate(model, processor, [images[1]], [q], max_new_tokens=16)
    # In a batch with a longer prompt, the short one is left-padded.
    both = generate(model, processor, [images[2], images[1]], [long_q, q], max_new_tokens=16)
    assert len(both) == 2 and all(len(r) == 1 and isinstance(r[0], str) for r in both)
    assert reference != ""
    assert alone[0][0] == both[1][0] == reference
    # batch_size splits the work without changing greedy outputs.
    four = generate(model, processor, images, [q] * 4, max_new_tokens=16, batch_size=3)
    assert four[1][0] == reference
