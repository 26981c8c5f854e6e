"""Tiny vision-language models built offline: a locally trained tokenizer plus a small config of a
real ``transformers`` architecture, randomly initialised and saved like any hub checkpoint.

The result loads with the same calls as a real model (``load_model`` / ``load_processor``), so every
stage runs unchanged on a tiny CPU model or a 7B GPU model::

    from fire_mpo_core.models.config import ModelConfig
    from fire_mpo_core.models import build_tiny_model, load_model, load_processor

    path = build_tiny_model(ModelConfig(arch="llava"), texts, image_size=64, out_dir=Path("base"))
    model, processor = load_model(path), load_processor(path)

Architectures (``ModelConfig.arch``; image tokens at 64 px / patch 8):

* ``llava`` (the embedded default): ``LlavaForConditionalGeneration`` = a CLIP vision tower (the
  CLS token dropped: ``(image_size / patch_size)^2`` = 64 image tokens), a 2-layer GELU projector
  and a Llama decoder, ChatML turns. About 2M parameters at the defaults.
* ``llava_mistral``: the same tower and projector with a Mistral decoder and ``[INST]`` turns
  (LLaVA-Med v1.5 style); EOS ``</s>``.
* ``qwen2_vl`` / ``qwen2_5_vl`` / ``qwen3_vl``: the Qwen-VL ViT (2D rotary; Qwen2.5-VL's window
  attention; Qwen3-VL's learned position grid and deepstack mergers feeding the first decoder
  layers), its 2x2 patch merger (16 tokens) and a decoder with M-RoPE. Image-only processors
  (see ``loading``).
* ``gemma3``: SigLIP tower, Gemma 3's RMS-normed, 2x2 average-pooled projector (16 tokens), a
  Gemma 3 decoder with tied embeddings; ``<start_of_turn>`` turns, images marked by
  ``token_type_ids``; the processor takes one list of images per sample.
* ``idefics3``: SigLIP-style tower, pixel-shuffle connector (16 tokens), a Llama decoder,
  SmolVLM's ``User:`` / ``Assistant:`` turns; one untiled image per sample.
* ``internvl``: InternViT, pixel shuffle + MLP projector (16 tokens), a Qwen2 decoder, ChatML
  with ``<IMG_CONTEXT>``; one tile per image.

Every tokenizer carries its family's real special tokens, and each chat template's end-of-turn
marker is the EOS token, so a response followed by EOS is a finished turn. The build is
deterministic: the same config, texts and image size give byte-identical files.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessorPil,
    Gemma3Processor,
    GenerationConfig,
    GotOcr2ImageProcessorPil,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessorPil,
    Idefics3Processor,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    MistralConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
)
from transformers.processing_utils import ProcessorMixin

from fire_mpo_core.models.config import ModelConfig
from fire_mpo_core.models.loading import image_only_processor_class

__all__ = [
    "GEMMA3_CHAT_TEMPLATE",
    "IDEFICS3_CHAT_TEMPLATE",
    "INTERNVL_CHAT_TEMPLATE",
    "LLAVA_CHAT_TEMPLATE",
    "LLAVA_MISTRAL_CHAT_TEMPLATE",
    "QWEN2_VL_CHAT_TEMPLATE",
    "TINY_ARCHS",
    "build_tiny_model",
    "build_tiny_tokenizer",
    "create_tiny_config",
    "create_tiny_model",
    "mrope_sections",
]

# ChatML with the image placeholder where the message puts {"type": "image"}; the LLaVA variant
# starts with BOS (an attention sink for the tiny decoder), as Llama-based LLaVA templates do.
_CHATML_BODY = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}IMAGE_PLACEHOLDER"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAVA_CHAT_TEMPLATE = "{{ bos_token }}" + _CHATML_BODY.replace("IMAGE_PLACEHOLDER", "<image>\n")
QWEN2_VL_CHAT_TEMPLATE = _CHATML_BODY.replace(
    "IMAGE_PLACEHOLDER", "<|vision_start|><|image_pad|><|vision_end|>"
)

# LLaVA-Mistral: [INST] turns after BOS, the image first in the user turn.
LLAVA_MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}[INST] "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %} [/INST]"
    "{% else %}{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}{% if item['type'] == 'text' %}"
    "{{ item['text'] }}{% endif %}{% endfor %}{% endif %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)
# Gemma 3: <start_of_turn>user / model turns; the processor expands <start_of_image>.
GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<start_of_image>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
# Idefics3 / SmolVLM: "User:<image>question<end_of_utterance>\nAssistant:".
IDEFICS3_CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}: {{ message['content'] }}"
    "{% else %}{% if message['content'][0]['type'] == 'image' %}:{% else %}: {% endif %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<image>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
# InternVL (transformers-native): ChatML, <IMG_CONTEXT> expanded to <img>...</img> by the processor.
INTERNVL_CHAT_TEMPLATE = _CHATML_BODY.replace("IMAGE_PLACEHOLDER", "<IMG_CONTEXT>\n")

# Special tokens per architecture, in id order (ids 0..n-1). Roles of each are set below.
_LLAVA_SPECIALS = ["<pad>", "<s>", "<|im_end|>", "<|im_start|>", "<image>"]
_QWEN2_VL_SPECIALS = [
    "<|endoftext|>",  # pad (as in Qwen2-VL)
    "<|im_start|>",
    "<|im_end|>",  # eos = end of turn
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",  # unused, but the Qwen2-VL processor resolves its id
]
_QWEN_EXTRA = {
    "image_token": "<|image_pad|>",
    "video_token": "<|video_pad|>",
    "vision_bos_token": "<|vision_start|>",
    "vision_eos_token": "<|vision_end|>",
}
# LLaVA-Mistral (LLaVA-Med v1.5): Mistral's <unk>/<s>/</s> and [INST] turns.
_MISTRAL_SPECIALS = ["<unk>", "<s>", "</s>", "<image>", "<pad>"]
_GEMMA3_SPECIALS = [
    "<pad>",
    "<eos>",
    "<bos>",
    "<start_of_turn>",
    "<end_of_turn>",  # eos of a chat turn (Gemma 3 -it stops on it)
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
]
# Idefics3 / SmolVLM: the processor resolves all 36 tile tags even when images are not split.
_IDEFICS3_SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<end_of_utterance>",
    "<fake_token_around_image>",
    "<image>",
    "<global-img>",
    *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)),
]
_INTERNVL_SPECIALS = [*_QWEN2_VL_SPECIALS[:3], "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]

#: arch -> (special tokens in id order, PreTrainedTokenizerFast keyword arguments).
_TOKENIZERS: dict[str, tuple[list[str], dict]] = {
    "llava": (
        _LLAVA_SPECIALS,
        {"bos_token": "<s>", "eos_token": "<|im_end|>", "pad_token": "<pad>",
         "extra_special_tokens": {"image_token": "<image>"}},
    ),
    "llava_mistral": (
        _MISTRAL_SPECIALS,
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
         "extra_special_tokens": {"image_token": "<image>"}},
    ),
    "qwen2_vl": (
        _QWEN2_VL_SPECIALS,
        {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
         "extra_special_tokens": _QWEN_EXTRA},
    ),
    "gemma3": (
        _GEMMA3_SPECIALS,
        {"bos_token": "<bos>", "eos_token": "<end_of_turn>", "pad_token": "<pad>",
         "extra_special_tokens": {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                  "image_token": "<image_soft_token>"}},
    ),
    "idefics3": (
        _IDEFICS3_SPECIALS,
        {"eos_token": "<end_of_utterance>", "pad_token": "<|endoftext|>"},
    ),
    "internvl": (
        _INTERNVL_SPECIALS,
        {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
         "extra_special_tokens": {"start_image_token": "<img>", "end_image_token": "</img>",
                                  "context_image_token": "<IMG_CONTEXT>",
                                  "video_token": "<video>"}},
    ),
}  # fmt: skip
_TOKENIZERS["qwen2_5_vl"] = _TOKENIZERS["qwen3_vl"] = _TOKENIZERS["qwen2_vl"]

# Literal template text, fed to the tokenizer trainer so role names get compact merges.
_TEMPLATE_WORDS = ["user\n", "assistant\n", "system\n"]


def _corpus(texts: Iterable[str]) -> Iterator[str]:
    yield from _TEMPLATE_WORDS
    for t in texts:
        if t:
            yield t


def build_tiny_tokenizer(
    texts: Iterable[str], vocab_size: int, arch: str
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (GPT-2 / Qwen style) on ``texts``.

    The full 256-byte alphabet is always in the vocabulary, so any string round-trips; the final
    size is ``max(vocab_size, 256 + n_specials)`` at most (fewer when the corpus runs out of
    merges). Special tokens take ids ``0..n_specials-1``. Deterministic for the same texts.
    """
    specials, kwargs = _TOKENIZERS[arch]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(texts), trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=4096, **kwargs)


def mrope_sections(head_dim: int) -> list[int]:
    """Split the ``head_dim / 2`` rotary frequencies of Qwen2-VL's M-RoPE into (t, h, w).

    Images of a still-image task all share one temporal index, so time gets ~1/8 of the
    frequencies (the highest ones) and height / width split the rest equally:
    head_dim 32 -> [2, 7, 7], 48 -> [4, 10, 10], 128 -> [8, 28, 28] (Qwen2-VL-7B itself
    uses [16, 24, 24]; any split summing to head_dim / 2 is valid).
    The sections must sum to ``head_dim / 2``, or the model silently mixes axes.
    """
    if head_dim % 2:
        raise ValueError(f"head_dim must be even for rotary embeddings, got {head_dim}")
    half = head_dim // 2
    hw = (half - max(1, half // 8)) // 2
    sections = [half - 2 * hw, hw, hw]
    if min(sections) < 1:
        raise ValueError(f"head_dim {head_dim} is too small for 3 M-RoPE sections")
    assert sum(sections) == half
    return sections


def _vision_heads(width: int) -> int:
    # Head width 32 where it divides the tower width (CLIP / ViT convention), else one head.
    return width // 32 if width % 32 == 0 and width >= 32 else 1


def _llava(cfg: ModelConfig, tokenizer, image_size: int) -> tuple[PreTrainedModel, LlavaProcessor]:
    if image_size % cfg.patch_size:
        raise ValueError(
            f"image_size {image_size} must be a multiple of patch_size {cfg.patch_size}"
        )
    n_image_tokens = (image_size // cfg.patch_size) ** 2
    vision = CLIPVisionConfig(
        hidden_size=cfg.vision_hidden_size,
        intermediate_size=4 * cfg.vision_hidden_size,
        projection_dim=cfg.vision_hidden_size,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=_vision_heads(cfg.vision_hidden_size),
        image_size=image_size,
        patch_size=cfg.patch_size,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=4 * cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.image_token_id,
        image_seq_length=n_image_tokens,
        # "default" drops CLIP's CLS token: exactly one token per patch. The last layer is used
        # because with 2 layers the usual -2 would leave the final layer untrained.
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
    )
    model = LlavaForConditionalGeneration(config)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=cfg.patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,  # CLIP's CLS, removed again by "default"
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    return model, processor


def _qwen2_vl(
    cfg: ModelConfig, tokenizer, image_size: int
) -> tuple[PreTrainedModel, ProcessorMixin]:
    # Every image is resized to image_size x image_size (min = max pixels), then cut into
    # patch_size patches merged 2x2: (image_size / patch_size / 2)^2 tokens per image.
    image_processor = _qwen_image_processor(cfg, image_size)
    vision = {
        "depth": cfg.vision_layers,
        "embed_dim": cfg.vision_hidden_size,
        "hidden_size": cfg.hidden_size,  # the patch merger projects into the decoder width
        "num_heads": _vision_heads(cfg.vision_hidden_size),
        "mlp_ratio": 4,
        "patch_size": cfg.patch_size,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
    }
    text = _qwen_text(cfg, tokenizer, use_sliding_window=False)
    return _qwen_model(
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLProcessor,
        vision,
        text,
        tokenizer,
        image_processor,
    )


def _llava_mistral(
    cfg: ModelConfig, tokenizer, image_size: int
) -> tuple[PreTrainedModel, LlavaProcessor]:
    # LLaVA-Med v1.5 style: the LLaVA tower and projector of `_llava` with a Mistral decoder.
    model, processor = _llava(cfg, tokenizer, image_size)
    text = MistralConfig(**{
        k: v for k, v in model.config.text_config.to_dict().items()
        if k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                 "rope_parameters", "bos_token_id", "eos_token_id", "pad_token_id",
                 "tie_word_embeddings")
    })  # fmt: skip
    config = LlavaConfig(**{**model.config.to_dict(), "text_config": text.to_dict()})
    model = LlavaForConditionalGeneration(config)
    processor.chat_template = LLAVA_MISTRAL_CHAT_TEMPLATE
    return model, processor


def _qwen_text(cfg: ModelConfig, tokenizer, **extra) -> dict:
    head_dim = cfg.hidden_size // cfg.num_heads
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": cfg.hidden_size,
        "intermediate_size": 4 * cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_heads,
        "max_position_embeddings": 4096,
        # A low base: with ~10 M-RoPE frequencies per axis and positions < 200, theta 1e6 would
        # leave most of them nearly constant; 100 makes every frequency rotate over a sequence.
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 100.0,
            "mrope_section": mrope_sections(head_dim),
            **extra.pop("rope_extra", {}),
        },
        "bos_token_id": None,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        **extra,
    }


def _qwen_image_processor(cfg: ModelConfig, image_size: int) -> Qwen2VLImageProcessorPil:
    if image_size % (cfg.patch_size * 2):
        raise ValueError(
            f"image_size {image_size} must be a multiple of patch_size * 2 = {cfg.patch_size * 2}"
        )
    return Qwen2VLImageProcessorPil(
        patch_size=cfg.patch_size,
        merge_size=2,
        temporal_patch_size=2,
        size={"shortest_edge": image_size * image_size, "longest_edge": image_size * image_size},
    )


def _qwen_token_ids(tokenizer) -> dict[str, int]:
    ids = tokenizer.convert_tokens_to_ids
    return {
        "image_token_id": ids("<|image_pad|>"),
        "video_token_id": ids("<|video_pad|>"),
        "vision_start_token_id": ids("<|vision_start|>"),
        "vision_end_token_id": ids("<|vision_end|>"),
    }


def _qwen_model(
    config_cls, model_cls, processor_cls, vision: dict, text: dict, tokenizer, image_processor
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """The Qwen-VL families' common build: their special tokens, untied lm_head, the Qwen2-VL
    chat template, and a processor without the video side."""
    config = config_cls(
        vision_config=vision, text_config=text, tie_word_embeddings=False,
        **_qwen_token_ids(tokenizer),
    )  # fmt: skip
    processor = image_only_processor_class(processor_cls)(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=QWEN2_VL_CHAT_TEMPLATE
    )
    return model_cls(config), processor


def _qwen2_5_vl(
    cfg: ModelConfig, tokenizer, image_size: int
) -> tuple[PreTrainedModel, ProcessorMixin]:
    image_processor = _qwen_image_processor(cfg, image_size)
    vision = {
        "depth": cfg.vision_layers,
        "hidden_size": cfg.vision_hidden_size,
        "intermediate_size": 4 * cfg.vision_hidden_size,
        "num_heads": _vision_heads(cfg.vision_hidden_size),
        "patch_size": cfg.patch_size,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "out_hidden_size": cfg.hidden_size,
        # Windows of 2x2 merged tokens (as Qwen2.5-VL's 112 px / 14 px / 2), full attention in
        # the last block, so both attention kinds run.
        "window_size": 4 * cfg.patch_size,
        "fullatt_block_indexes": [cfg.vision_layers - 1],
    }
    text = _qwen_text(cfg, tokenizer, use_sliding_window=False)
    return _qwen_model(
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        vision,
        text,
        tokenizer,
        image_processor,
    )


def _qwen3_vl(
    cfg: ModelConfig, tokenizer, image_size: int
) -> tuple[PreTrainedModel, ProcessorMixin]:
    image_processor = _qwen_image_processor(cfg, image_size)
    if cfg.vision_layers < 2:
        raise ValueError("qwen3_vl needs vision_layers >= 2 (one deepstack layer + the output)")
    vision = {
        "depth": cfg.vision_layers,
        "hidden_size": cfg.vision_hidden_size,
        "intermediate_size": 4 * cfg.vision_hidden_size,
        "num_heads": _vision_heads(cfg.vision_hidden_size),
        "patch_size": cfg.patch_size,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "out_hidden_size": cfg.hidden_size,
        # Learned position grid (interpolated to each image): one entry per patch.
        "num_position_embeddings": (image_size // cfg.patch_size) ** 2,
        # Deepstack: features of the inner vision blocks are added to the first decoder layers.
        "deepstack_visual_indexes": list(range(min(cfg.vision_layers - 1, cfg.num_layers))),
    }
    text = _qwen_text(
        cfg, tokenizer, head_dim=cfg.hidden_size // cfg.num_heads,
        rope_extra={"mrope_interleaved": True},
    )  # fmt: skip
    return _qwen_model(
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
        Qwen3VLProcessor,
        vision,
        text,
        tokenizer,
        image_processor,
    )


def _pooled_grid(cfg: ModelConfig, image_size: int, factor: int = 2) -> int:
    """Tokens per image side after a ``factor`` x ``factor`` pooling / pixel shuffle."""
    if image_size % (cfg.patch_size * factor):
        raise ValueError(
            f"image_size {image_size} must be a multiple of patch_size * {factor} "
            f"= {cfg.patch_size * factor}"
        )
    return image_size // cfg.patch_size // factor


def _gemma3(cfg: ModelConfig, tokenizer, image_size: int) -> tuple[PreTrainedModel, ProcessorMixin]:
    side = _pooled_grid(cfg, image_size)  # the projector average-pools the patch grid 2x2
    ids = tokenizer.convert_tokens_to_ids
    head_dim = cfg.hidden_size // cfg.num_heads
    vision = {
        "model_type": "siglip_vision_model",
        "hidden_size": cfg.vision_hidden_size,
        "intermediate_size": 4 * cfg.vision_hidden_size,
        "num_hidden_layers": cfg.vision_layers,
        "num_attention_heads": _vision_heads(cfg.vision_hidden_size),
        "image_size": image_size,
        "patch_size": cfg.patch_size,
        "vision_use_head": False,
    }
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": cfg.hidden_size,
        "intermediate_size": 4 * cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_heads,
        "head_dim": head_dim,
        "query_pre_attn_scalar": head_dim,
        "max_position_embeddings": 4096,
        "sliding_window": 512,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = Gemma3Config(
        vision_config=vision,
        text_config=text,
        mm_tokens_per_image=side * side,
        boi_token_index=ids("<start_of_image>"),
        eoi_token_index=ids("<end_of_image>"),
        image_token_index=ids("<image_soft_token>"),
        tie_word_embeddings=True,  # as Gemma 3 itself
    )
    model = Gemma3ForConditionalGeneration(config)
    # transformers initialises the projection to zeros (image features all 0: a blind model
    # whose vision side gets no gradient signal through the image tokens at first); a
    # pretrained Gemma 3 has it trained, so draw it like every other weight.
    with torch.no_grad():
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(
            0.0, config.text_config.initializer_range
        )
    image_processor = Gemma3ImageProcessorPil(
        size={"height": image_size, "width": image_size}, do_pan_and_scan=False
    )
    processor = Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_length=side * side,
        chat_template=GEMMA3_CHAT_TEMPLATE,
    )
    return model, processor


def _idefics3(
    cfg: ModelConfig, tokenizer, image_size: int
) -> tuple[PreTrainedModel, ProcessorMixin]:
    side = _pooled_grid(cfg, image_size)  # pixel shuffle, scale factor 2
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=4 * cfg.hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_heads,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    vision = {
        "hidden_size": cfg.vision_hidden_size,
        "intermediate_size": 4 * cfg.vision_hidden_size,
        "num_hidden_layers": cfg.vision_layers,
        "num_attention_heads": _vision_heads(cfg.vision_hidden_size),
        "image_size": image_size,
        "patch_size": cfg.patch_size,
    }
    config = Idefics3Config(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        scale_factor=2,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = Idefics3ForConditionalGeneration(config)
    # One global image per sample (no tiling): resized to image_size x image_size.
    image_processor = Idefics3ImageProcessorPil(
        do_image_splitting=False,
        size={"longest_edge": image_size},
        max_image_size={"longest_edge": image_size},
    )
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=side * side,
        chat_template=IDEFICS3_CHAT_TEMPLATE,
    )
    return model, processor


def _internvl(
    cfg: ModelConfig, tokenizer, image_size: int
) -> tuple[PreTrainedModel, ProcessorMixin]:
    side = _pooled_grid(cfg, image_size)  # pixel shuffle, downsample ratio 0.5
    vision = {
        "hidden_size": cfg.vision_hidden_size,
        "intermediate_size": 4 * cfg.vision_hidden_size,
        "num_hidden_layers": cfg.vision_layers,
        "num_attention_heads": _vision_heads(cfg.vision_hidden_size),
        "image_size": [image_size, image_size],
        "patch_size": [cfg.patch_size, cfg.patch_size],
    }
    text = {
        "model_type": "qwen2",
        "vocab_size": len(tokenizer),
        "hidden_size": cfg.hidden_size,
        "intermediate_size": 4 * cfg.hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_heads,
        "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "use_sliding_window": False,
        "bos_token_id": None,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "tie_word_embeddings": False,
    }
    config = InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=side * side,
        downsample_ratio=0.5,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",  # drops the CLS token
        tie_word_embeddings=False,
    )
    model = InternVLForConditionalGeneration(config)
    # One tile per image (no dynamic tiling): resized to image_size x image_size.
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": image_size, "width": image_size}, crop_to_patches=False
    )
    processor = image_only_processor_class(InternVLProcessor)(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_length=side * side,
        chat_template=INTERNVL_CHAT_TEMPLATE,
    )
    return model, processor


_BUILDERS = {
    "llava": _llava,
    "llava_mistral": _llava_mistral,
    "qwen2_vl": _qwen2_vl,
    "qwen2_5_vl": _qwen2_5_vl,
    "qwen3_vl": _qwen3_vl,
    "gemma3": _gemma3,
    "idefics3": _idefics3,
    "internvl": _internvl,
}
#: The tiny architectures ``ModelConfig.arch`` can name.
TINY_ARCHS = tuple(_BUILDERS)


def create_tiny_config(arch: str):
    """The transformers config of the tiny ``arch`` at the default sizes (no weights), e.g. to
    look its family up."""
    cfg = ModelConfig(arch=arch)
    tokenizer = build_tiny_tokenizer([], cfg.vocab_size, arch)
    with torch.device("meta"):
        model, _ = _BUILDERS[arch](cfg, tokenizer, 64)
    return model.config


def create_tiny_model(
    cfg: ModelConfig, texts: Iterable[str], image_size: int
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Build the tiny model and its processor in memory (what :func:`build_tiny_model` saves).

    Returns ``(model, processor)``: the model in float32, train mode as constructed, initialised
    with ``torch.manual_seed(cfg.seed)``; see :func:`build_tiny_model` for the sizes.
    """
    tokenizer = build_tiny_tokenizer(texts, cfg.vocab_size, cfg.arch)
    # Seed right before construction: weight init is the only random draw of the build.
    torch.manual_seed(cfg.seed)
    if cfg.arch not in _BUILDERS:  # pragma: no cover - ModelConfig's Literal already rejects it
        raise ValueError(f"unknown tiny architecture {cfg.arch!r}")
    model, processor = _BUILDERS[cfg.arch](cfg, tokenizer, image_size)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return model, processor


def build_tiny_model(
    cfg: ModelConfig, texts: Iterable[str], image_size: int, out_dir: Path
) -> Path:
    """Build, randomly initialise and save a tiny LVLM with its processor; return ``out_dir``.

    Args:
        cfg: architecture and sizes (``arch``, ``hidden_size``, ``num_layers``, ``num_heads``,
            ``vision_hidden_size``, ``vision_layers``, ``patch_size``, ``vocab_size``, ``seed``).
            Decoder MLP width is ``4 * hidden_size``, vision MLP ``4 * vision_hidden_size``,
            vision heads of width 32.
        texts: the tokenizer's training corpus (questions, answers, reports of the train split).
        image_size: square input side in pixels; images of any size are resized to it.
        out_dir: folder for ``config.json``, ``generation_config.json``, ``model.safetensors``,
            ``tokenizer.json``, ``tokenizer_config.json``, ``processor_config.json`` and
            ``chat_template.jinja``. Created if missing; existing files are overwritten.

    Parameter count of ``llava`` (V = tokenizer size, d = hidden_size, L = num_layers,
    e = vision_hidden_size, Lv = vision_layers, p = patch_size, n = (image_size / p)^2)::

        vision    = 3 p^2 e + e + (n + 1) e + 4 e + Lv (12 e^2 + 13 e)      # CLIP, 2 LayerNorms
        projector = e d + d + d^2 + d
        decoder   = V d + L (16 d^2 + 2 d) + d,    lm_head = V d          # MLP width 4 d

    1.74M at the defaults with V = 1024 (0.12M vision, 0.05M projector, 1.38M decoder, 0.2M head).

    The weights are float32 (``cfg.dtype`` is the dtype they are loaded in) and initialised with
    ``torch.manual_seed(cfg.seed)``, so the same inputs give byte-identical files.
    """
    out_dir = Path(out_dir)
    model, processor = create_tiny_model(cfg, texts, image_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir
