"""Test helper (not product code): tiny checkpoints made the way a user would, with plain
transformers classes and their defaults (``XForConditionalGeneration(config).save_pretrained`` +
the family's processor), not with ``fire_mpo_core.models.tiny``.

What differs from our builder, on purpose: transformers' own initialisation (Gemma 3's zero
projection, tied embeddings), default rotary / deepstack settings, and tiled images (Idefics3
splits each image into 2 x 2 tiles + a global view, InternVL into 4 tiles + a thumbnail).
Only the tokenizer is trained locally (no hub), with the family's real special tokens.
"""

from __future__ import annotations

from pathlib import Path

from transformers import (
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3ImageProcessorPil,
    Gemma3Processor,
    GotOcr2ImageProcessorPil,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3ImageProcessorPil,
    Idefics3Processor,
    InternVLConfig,
    InternVLForConditionalGeneration,
    InternVLProcessor,
    Qwen2VLImageProcessorPil,
    Qwen3VLConfig,
    Qwen3VLForConditionalGeneration,
    Qwen3VLProcessor,
)

from fire_mpo_core.models.loading import image_only_processor_class
from fire_mpo_core.models.tiny import (
    GEMMA3_CHAT_TEMPLATE,
    IDEFICS3_CHAT_TEMPLATE,
    INTERNVL_CHAT_TEMPLATE,
    QWEN2_VL_CHAT_TEMPLATE,
    build_tiny_tokenizer,
)
from testing_support.world import CORPUS

TEXT = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2}
HEADS = {"num_attention_heads": 2, "num_key_value_heads": 1}
VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}


def _gemma3(tok):
    ids = tok.convert_tokens_to_ids
    config = Gemma3Config(
        text_config={"vocab_size": len(tok), **TEXT, **HEADS, "head_dim": 32},
        vision_config={**VISION, "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        mm_tokens_per_image=4,
        boi_token_index=ids("<start_of_image>"),
        eoi_token_index=ids("<end_of_image>"),
        image_token_index=ids("<image_soft_token>"),
    )
    processor = Gemma3Processor(
        Gemma3ImageProcessorPil(size={"height": 32, "width": 32}),
        tok,
        image_seq_length=4,
        chat_template=GEMMA3_CHAT_TEMPLATE,
    )
    return Gemma3ForConditionalGeneration(config), processor


def _qwen3_vl(tok):
    ids = tok.convert_tokens_to_ids
    config = Qwen3VLConfig(
        text_config={
            "vocab_size": len(tok), **TEXT, **HEADS, "head_dim": 32,
            "rope_parameters": {"rope_type": "default", "rope_theta": 5e6,
                                "mrope_section": [4, 6, 6], "mrope_interleaved": True},
        },
        vision_config={"depth": 2, "hidden_size": 32, "intermediate_size": 64, "num_heads": 2,
                       "out_hidden_size": 64, "num_position_embeddings": 16,
                       "deepstack_visual_indexes": [0]},
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )  # fmt: skip
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=16, merge_size=2, size={"shortest_edge": 64 * 64, "longest_edge": 64 * 64}
    )
    processor = image_only_processor_class(Qwen3VLProcessor)(
        image_processor=image_processor, tokenizer=tok, chat_template=QWEN2_VL_CHAT_TEMPLATE
    )
    return Qwen3VLForConditionalGeneration(config), processor


def _idefics3(tok):
    config = Idefics3Config(
        text_config={"model_type": "llama", "vocab_size": len(tok), **TEXT, **HEADS,
                     "pad_token_id": tok.pad_token_id},
        vision_config={**VISION, "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        image_token_id=tok.convert_tokens_to_ids("<image>"),
    )  # fmt: skip
    # Image splitting on (the default): a 64 px image = 2 x 2 tiles of 32 px + a global view.
    image_processor = Idefics3ImageProcessorPil(
        size={"longest_edge": 64}, max_image_size={"longest_edge": 32}
    )
    processor = Idefics3Processor(
        image_processor, tok, image_seq_len=4, chat_template=IDEFICS3_CHAT_TEMPLATE
    )
    return Idefics3ForConditionalGeneration(config), processor


def _internvl(tok):
    config = InternVLConfig(
        text_config={"model_type": "qwen2", "vocab_size": len(tok), **TEXT, **HEADS},
        vision_config={**VISION, "num_attention_heads": 2, "image_size": [32, 32],
                       "patch_size": [8, 8]},
        image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
        image_seq_length=4,
    )  # fmt: skip
    # Dynamic tiling on (the default): a 64 px image = 4 tiles of 32 px + a thumbnail.
    image_processor = GotOcr2ImageProcessorPil(
        size={"height": 32, "width": 32}, crop_to_patches=True, max_patches=4
    )
    processor = image_only_processor_class(InternVLProcessor)(
        image_processor=image_processor,
        tokenizer=tok,
        image_seq_length=4,
        chat_template=INTERNVL_CHAT_TEMPLATE,
    )
    return InternVLForConditionalGeneration(config), processor


FOREIGN = {"gemma3": _gemma3, "qwen3_vl": _qwen3_vl, "idefics3": _idefics3, "internvl": _internvl}


def save_foreign(arch: str, path: Path) -> Path:
    """Save the plain-transformers tiny checkpoint of ``arch`` (a key of FOREIGN) to ``path``."""
    tok = build_tiny_tokenizer(CORPUS, 300, arch)
    model, processor = FOREIGN[arch](tok)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path
