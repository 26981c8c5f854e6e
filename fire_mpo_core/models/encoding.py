"""Turn (image, question[, response]) triples into model-ready tensors, for training, scoring and
generation alike::

    from fire_mpo_core.models import encode_batch, model_inputs, shift_for_next_token

    batch = encode_batch(processor, images, questions, responses, response_spans, max_length=256)
    logits = model(**model_inputs(batch)).logits                    # [B, T, V]
    logits, labels, span = shift_for_next_token(logits, batch["labels"], batch["span_mask"])

Sequence layout of row b (right padding; left padding moves the pads to the front)::

    [ chat-template prompt with expanded image tokens | response tokens | EOS | pad ... ]
      labels = -100 ..............................      = input_ids ......     -100 ...

Label alignment (HF convention, *not* pre-shifted): ``labels[b, t]`` is ``input_ids[b, t]`` on
response tokens, and ``logits[b, t]`` predicts position ``t + 1``. So the log-probability of
response token ``t`` is ``log_softmax(logits[b, t - 1])[labels[b, t]]``; use
:func:`shift_for_next_token` (or pass ``labels`` to the HF model, which shifts internally).
``span_mask`` is aligned with ``labels`` and shifts with them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image
from torch import Tensor

from fire_mpo_core.models.families import processor_family

__all__ = [
    "IGNORE_INDEX",
    "NON_MODEL_KEYS",
    "build_prompts",
    "encode_batch",
    "model_inputs",
    "shift_for_next_token",
]

IGNORE_INDEX = -100
#: Keys of :func:`encode_batch` that are targets / bookkeeping, not model forward arguments.
NON_MODEL_KEYS = ("labels", "span_mask", "response_truncated")
# Processor outputs aligned token-by-token with input_ids (padded and extended with the text);
# every other processor output (pixel_values, image_grid_thw, image_sizes) is per image.
_TEXT_ALIGNED = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")


def build_prompts(processor, questions: Sequence[str]) -> list[str]:
    """Render each question as a user turn holding the image, plus the generation prompt, with
    the processor's own chat template (the image placeholder is expanded later, by the
    processor call)."""
    prompts = []
    for q in questions:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
        prompts.append(
            processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        )
    return prompts


def _pad_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token")
    return tokenizer.eos_token_id


def _overlaps(offset: tuple[int, int], spans: Sequence[tuple[int, int]]) -> bool:
    start, end = offset
    return any(start < s_end and end > s_start for s_start, s_end in spans)


def encode_batch(
    processor,
    images: list[Image.Image],
    questions: list[str],
    responses: list[str] | None = None,
    response_spans: list[list[tuple[int, int]]] | None = None,
    max_length: int | None = None,
    padding_side: str = "right",
) -> dict[str, Tensor]:
    """Encode a batch of B (image, question[, response]) examples.

    The prompt is the chat template (user turn = image + question, then the generation prompt),
    with image tokens expanded by the processor and special tokens added as
    ``processor.apply_chat_template(..., tokenize=True)`` adds them. The response is
    ``tokenizer(response, add_special_tokens=False)`` followed by EOS, appended after the prompt.

    Args:
        processor: a multimodal processor from :func:`~fire_mpo_core.models.load_processor`.
        images: B PIL images, one per example.
        questions: B question strings.
        responses: B response strings, or None for generation inputs (prompt only).
        response_spans: per example, half-open character spans ``[start, end)`` into the
            response; tokens whose character offsets overlap a span are marked in ``span_mask``.
        max_length: cap on T. Only the response (EOS included) is cut, never the prompt or its
            image tokens; a cut response loses its EOS.
        padding_side: ``right`` for training / scoring, ``left`` for generation.

    Returns:
        ``input_ids`` [B, T] long, ``attention_mask`` [B, T] long (1 = real token), plus
        everything else the processor gives (``pixel_values`` [B, 3, H, W] for LLaVA;
        ``pixel_values`` [sum patches, C*t*p*p], ``image_grid_thw`` [B, 3] and
        ``mm_token_type_ids`` [B, T] for Qwen2-VL). With ``responses`` also ``labels`` [B, T]
        long (-100 on prompt and padding, the response ids and EOS elsewhere; not shifted, see
        the module docstring), ``span_mask`` [B, T] bool (all False without spans) and
        ``response_truncated`` [B] bool.

    Raises:
        ValueError: an empty batch, mismatched lengths, spans without responses, a tokenizer
            without EOS (with responses), or a prompt longer than
            ``max_length`` (with responses: leaving no room for one response token).
    """
    _check_batch(images, questions, responses, response_spans, padding_side)
    tokenizer = processor.tokenizer
    if responses is not None and tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token to end the responses with")
    enc = _encode_prompts(processor, images, questions)
    text_keys = [k for k in _TEXT_ALIGNED if k in enc]
    rows, labels_rows, span_rows, truncated = _token_rows(
        enc, text_keys, tokenizer, len(questions), responses, response_spans, max_length
    )
    width = max(len(r["input_ids"]) for r in rows)
    pad_values = {"input_ids": _pad_id(tokenizer)}
    out: dict[str, Tensor] = {}
    for k in text_keys:
        padded = [_pad(r[k], pad_values.get(k, 0), width, padding_side) for r in rows]
        out[k] = torch.tensor(padded, dtype=enc[k].dtype)
    for k, v in enc.items():
        if k not in text_keys:
            out[k] = v
    if responses is not None:
        labels = [_pad(r, IGNORE_INDEX, width, padding_side) for r in labels_rows]
        out["labels"] = torch.tensor(labels, dtype=torch.long)
        marks = [_pad(r, False, width, padding_side) for r in span_rows]
        out["span_mask"] = torch.tensor(marks, dtype=torch.bool)
        out["response_truncated"] = torch.tensor(truncated, dtype=torch.bool)
    return out


def _pad(seq: list, value: Any, width: int, side: str) -> list:
    fill = [value] * (width - len(seq))
    return fill + seq if side == "left" else seq + fill


def _token_rows(
    enc,
    text_keys: list[str],
    tokenizer,
    n: int,
    responses: list[str] | None,
    response_spans: list[list[tuple[int, int]]] | None,
    max_length: int | None,
) -> tuple[list[dict[str, list[int]]], list[list[int]], list[list[bool]], list[bool]]:
    """Per example, unpadded: the text-aligned rows (the prompt's real tokens, then the response
    tokens and EOS) and, with responses, the labels, the span marks and whether it was cut."""
    real = enc["attention_mask"].bool()
    resp_enc = (
        tokenizer(list(responses), add_special_tokens=False, return_offsets_mapping=True)
        if responses is not None
        else None
    )
    rows: list[dict[str, list[int]]] = []
    labels_rows: list[list[int]] = []
    span_rows: list[list[bool]] = []
    truncated: list[bool] = []
    for i in range(n):
        row = {k: enc[k][i][real[i]].tolist() for k in text_keys}
        prompt_len = len(row["input_ids"])
        _check_prompt_fits(i, prompt_len, max_length, responses is not None)
        if resp_enc is not None:
            spans = response_spans[i] if response_spans is not None else []
            ids, marks, cut = _response_tokens(
                resp_enc, i, tokenizer.eos_token_id, spans, prompt_len, max_length
            )
            row["input_ids"] = row["input_ids"] + ids
            for k in text_keys:
                if k == "attention_mask":
                    row[k] = row[k] + [1] * len(ids)
                elif k != "input_ids":  # type ids: response tokens are text (0)
                    row[k] = row[k] + [0] * len(ids)
            labels_rows.append([IGNORE_INDEX] * prompt_len + ids)
            span_rows.append([False] * prompt_len + marks)
            truncated.append(cut)
        rows.append(row)
    return rows, labels_rows, span_rows, truncated


def _check_batch(images, questions, responses, response_spans, padding_side) -> None:
    n = len(questions)
    if n == 0:
        raise ValueError("encode_batch needs at least one example")
    if len(images) != n:
        raise ValueError(f"{len(images)} images for {n} questions")
    if responses is not None and len(responses) != n:
        raise ValueError(f"{len(responses)} responses for {n} questions")
    if response_spans is not None:
        if responses is None:
            raise ValueError("response_spans given without responses")
        if len(response_spans) != n:
            raise ValueError(f"{len(response_spans)} span lists for {n} questions")
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")


def _encode_prompts(processor, images: list[Image.Image], questions: list[str]):
    """The processor's encoding of the chat-template prompts with their images."""
    prompts = build_prompts(processor, questions)
    # As ProcessorMixin.apply_chat_template(tokenize=True) does: a template that writes BOS itself
    # gets no second one; otherwise the tokenizer adds its usual specials (Llama's BOS, ...).
    bos = processor.tokenizer.bos_token
    add_special = not (bos is not None and prompts[0].startswith(bos))
    family = processor_family(processor)
    return processor(
        # Gemma 3 / Idefics3 want one list of images per sample, the others a flat list.
        images=family.processor_images(images) if family is not None else list(images),
        text=prompts,
        add_special_tokens=add_special,
        padding=True,
        return_tensors="pt",
    )


def _check_prompt_fits(i: int, prompt_len: int, max_length: int | None, with_response: bool):
    if max_length is None:
        return
    if prompt_len + (1 if with_response else 0) > max_length:
        raise ValueError(
            f"prompt of example {i} is {prompt_len} tokens (image tokens included), "
            f"max_length is {max_length}"
            + ("; no room for a response token" if with_response else "")
        )


def _response_tokens(resp_enc, i, eos_id, spans, prompt_len, max_length):
    """(response ids + EOS, their span marks, cut?) of example ``i``; only the response is cut
    to ``max_length`` (a cut response loses its EOS)."""
    ids = [*resp_enc["input_ids"][i], eos_id]
    offsets = [tuple(o) for o in resp_enc["offset_mapping"][i]]
    marks = [_overlaps(o, spans) for o in offsets] + [False]  # EOS is in no span
    if max_length is not None and prompt_len + len(ids) > max_length:
        keep = max_length - prompt_len
        return ids[:keep], marks[:keep], True
    return ids, marks, False


def model_inputs(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """The forward arguments of a batch: everything but ``labels``, ``span_mask`` and
    ``response_truncated``."""
    return {k: v for k, v in batch.items() if k not in NON_MODEL_KEYS}


def shift_for_next_token(
    logits: Tensor, labels: Tensor, span_mask: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Align logits with the tokens they predict.

    Args:
        logits: [B, T, V], ``logits[:, t]`` = distribution of token ``t + 1``.
        labels: [B, T] from :func:`encode_batch` (unshifted).
        span_mask: [B, T] bool aligned with ``labels``, or None.

    Returns:
        ``(logits[:, :-1], labels[:, 1:], span_mask[:, 1:])``: now position ``t`` of the logits
        scores ``labels[:, t]``, the convention of ``preference_loss_from_logits``.
    """
    shifted_mask = span_mask[:, 1:] if span_mask is not None else None
    return logits[:, :-1], labels[:, 1:], shifted_mask
