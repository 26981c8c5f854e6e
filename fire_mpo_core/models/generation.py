"""Batched, seeded generation with a Hugging Face vision-language model::

    from fire_mpo_core.models import generate

    answers = generate(model, processor, images, questions, max_new_tokens=48)  # greedy
    samples = generate(model, processor, images, questions, do_sample=True, temperature=0.7,
                       top_p=0.9, num_return_sequences=4, seed=3)
    answers[i][0]   # response to questions[i]; samples[i][k] = k-th sample

Prompts are left-padded (:func:`~fire_mpo_core.models.encoding.encode_batch` with
``padding_side="left"``), so every row's prompt ends at the same column and new tokens follow it.
Decoding settings are exactly the arguments: the checkpoint's own ``generation_config`` defaults
(top-k, repetition penalty, ...) are not applied, only its EOS / PAD / BOS ids.
"""

from __future__ import annotations

import torch
from PIL import Image
from transformers import GenerationConfig

from fire_mpo_core.models.encoding import encode_batch

__all__ = ["generate"]


def _generation_config(model, tokenizer, **settings) -> GenerationConfig:
    own = model.generation_config
    eos = own.eos_token_id if own.eos_token_id is not None else tokenizer.eos_token_id
    pad = own.pad_token_id if own.pad_token_id is not None else tokenizer.pad_token_id
    if pad is None:
        pad = eos[0] if isinstance(eos, list) else eos
    return GenerationConfig(
        eos_token_id=eos,
        pad_token_id=pad,
        bos_token_id=own.bos_token_id,
        use_cache=True,
        **settings,
    )


@torch.no_grad()
def generate(
    model,
    processor,
    images: list[Image.Image],
    questions: list[str],
    max_new_tokens: int = 48,
    batch_size: int = 32,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    num_return_sequences: int = 1,
    seed: int = 0,
) -> list[list[str]]:
    """Answer each (image, question) with ``num_return_sequences`` responses.

    Args:
        model: an image-text-to-text model (its mode is restored afterwards; it runs in eval).
        processor: its processor (chat template, image processor, tokenizer).
        images, questions: N each.
        max_new_tokens: generation budget per response.
        batch_size: prompts per ``model.generate`` call (each yields
            ``batch_size * num_return_sequences`` rows).
        do_sample: False = greedy (then ``num_return_sequences`` must be 1); True = ancestral
            sampling from ``softmax(logits / temperature)`` restricted to the top-p nucleus
            (no top-k).
        seed: ``torch.manual_seed(seed)`` before the first batch, so the same call gives the
            same samples (samples depend on ``batch_size``, as batches share one RNG stream).

    Returns:
        ``[N][num_return_sequences]`` decoded responses, special tokens removed and whitespace
        stripped.
    """
    if len(images) != len(questions):
        raise ValueError(f"{len(images)} images for {len(questions)} questions")
    if not do_sample and num_return_sequences != 1:
        raise ValueError("greedy decoding gives one sequence; set do_sample=True for several")
    if batch_size < 1 or max_new_tokens < 1 or num_return_sequences < 1:
        raise ValueError("batch_size, max_new_tokens and num_return_sequences must be >= 1")

    settings: dict = {
        "max_new_tokens": max_new_tokens,
        "do_sample": do_sample,
        "num_return_sequences": num_return_sequences,
    }
    if do_sample:
        settings.update(temperature=temperature, top_p=top_p, top_k=0)
    gen_config = _generation_config(model, processor.tokenizer, **settings)

    was_training = model.training
    model.eval()
    torch.manual_seed(seed)
    results: list[list[str]] = []
    try:
        for start in range(0, len(questions), batch_size):
            stop = start + batch_size
            batch = encode_batch(
                processor, images[start:stop], questions[start:stop], padding_side="left"
            )
            inputs = {k: v.to(model.device) for k, v in batch.items()}
            if "pixel_values" in inputs:  # the vision tower runs in the model's dtype
                inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
            prompt_width = inputs["input_ids"].shape[1]
            out = model.generate(**inputs, generation_config=gen_config)
            # Rows come as [q0 s0, q0 s1, ..., q1 s0, ...] (repeat-interleaved per prompt).
            texts = processor.tokenizer.batch_decode(
                out[:, prompt_width:], skip_special_tokens=True
            )
            texts = [t.strip() for t in texts]
            k = num_return_sequences
            results.extend(texts[j : j + k] for j in range(0, len(texts), k))
    finally:
        model.train(was_training)
    return results
