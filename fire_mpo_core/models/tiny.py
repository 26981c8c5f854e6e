"""Tiny vision-language models built offline: a locally trained tokenizer plus a small config of a
real ``transformers`` architecture, randomly initialised and saved like any hub checkpoint.

The result loads with the same calls as a real model (``load_model`` / ``load_processor``), so every
stage runs unchanged on a tiny CPU model or a 7B GPU model::

    from transformers.processing_utils import ProcessorMixin

from fire_mpo_core.config import ModelConfig
    from fire_mpo_core.models import build_tiny_model, load_model, load_processor

    path = build_tiny_model(ModelConfig(arch="llava"), texts, image_size=64, out_dir=Path("base"))
    model, processor = load_model(path), load_processor(path)

Two architectures (``ModelConfig.arch``):

* ``llava``: ``LlavaForConditionalGeneration`` = a CLIP vision tower (patch ``patch_size``, the
  CLS token dropped: ``(image_size / patch_size)^2`` image tokens, 64 at 64 px / patch 8), a
  2-layer GELU projector and a Llama decoder. About 2M parameters at the defaults.
* ``qwen2_vl``: ``Qwen2VLForConditionalGeneration`` = the Qwen2-VL ViT (2D rotary), its 2x2 patch
  merger (``(image_size / patch_size / 2)^2`` tokens, 16 at 64 px / patch 8) and a Qwen2 decoder
  with multimodal rotary embeddings (M-RoPE). Its processor is image-only (see ``loading``).

Both use a ChatML-style chat template (``<|im_start|>role\\n ... <|im_end|>\\n``) whose end-of-turn
marker ``<|im_end|>`` is the EOS token, so a response followed by EOS is a finished turn.
The build is deterministic: the same config, texts and image size give byte-identical files.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    GenerationConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    Qwen2VLImageProcessorPil,
    Qwen2VLProcessor,
)
from transformers.processing_utils import ProcessorMixin

from fire_mpo_core.config import ModelConfig
from fire_mpo_core.models.loading import image_only_processor_class

__all__ = [
    "LLAVA_CHAT_TEMPLATE",
    "QWEN2_VL_CHAT_TEMPLATE",
    "build_tiny_model",
    "build_tiny_tokenizer",
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
    specials = _LLAVA_SPECIALS if arch == "llava" else _QWEN2_VL_SPECIALS
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
    if arch == "llava":
        return PreTrainedTokenizerFast(
            tokenizer_object=tok,
            bos_token="<s>",
            eos_token="<|im_end|>",
            pad_token="<pad>",
            extra_special_tokens={"image_token": "<image>"},
            model_max_length=4096,
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens={
            "image_token": "<|image_pad|>",
            "video_token": "<|video_pad|>",
            "vision_bos_token": "<|vision_start|>",
            "vision_eos_token": "<|vision_end|>",
        },
        model_max_length=4096,
    )


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
    merge = 2
    if image_size % (cfg.patch_size * merge):
        raise ValueError(
            f"image_size {image_size} must be a multiple of patch_size * 2 = {cfg.patch_size * 2}"
        )
    head_dim = cfg.hidden_size // cfg.num_heads
    ids = tokenizer.convert_tokens_to_ids
    vision = {
        "depth": cfg.vision_layers,
        "embed_dim": cfg.vision_hidden_size,
        "hidden_size": cfg.hidden_size,  # the patch merger projects into the decoder width
        "num_heads": _vision_heads(cfg.vision_hidden_size),
        "mlp_ratio": 4,
        "patch_size": cfg.patch_size,
        "spatial_merge_size": merge,
        "temporal_patch_size": 2,
    }
    text = {
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
        },
        "use_sliding_window": False,
        "bos_token_id": None,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    config = Qwen2VLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    model = Qwen2VLForConditionalGeneration(config)
    # Every image is resized to image_size x image_size (min = max pixels), then cut into
    # patch_size patches merged 2x2: (image_size / patch_size / 2)^2 tokens per image.
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=cfg.patch_size,
        merge_size=merge,
        temporal_patch_size=2,
        size={"shortest_edge": image_size * image_size, "longest_edge": image_size * image_size},
    )
    processor_cls = image_only_processor_class(Qwen2VLProcessor)
    processor = processor_cls(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=QWEN2_VL_CHAT_TEMPLATE
    )
    return model, processor


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
    if cfg.arch == "llava":
        model, processor = _llava(cfg, tokenizer, image_size)
    elif cfg.arch == "qwen2_vl":
        model, processor = _qwen2_vl(cfg, tokenizer, image_size)
    else:  # pragma: no cover - ModelConfig's Literal already rejects it
        raise ValueError(f"unknown tiny architecture {cfg.arch!r}")
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
