"""Visual-grounding metrics: does the answer follow the image, and where does the model look?

Three measurements on a capped, evenly spaced subset of the evaluated split
(``EvaluateConfig.grounding_max_samples`` records per measurement)::

    from fire_mpo_core.evaluation.grounding import measure_grounding
    metrics, rows = measure_grounding(model, processor, data_root, records, predictions, cfg)

1. **Grounding probes** (:mod:`~fire_mpo_core.evaluation.probes`, the headline). Questions
   whose right answer is known on v and on v' (one or every lesion inpainted away, the mask
   grown by ``removal_dilate_px``), scored right-on-both so that answer bias cannot game them:
   ``grounded_accuracy`` (every lesion or the asked one removed: presence / quadrant "yes" ->
   "no", count -> "none"), ``keep_accuracy`` (one of two lesions removed: the finding stays),
   ``flip_given_right``, ``presence_accuracy_truth_yes`` / ``_truth_no``, and
   ``visual_logp_drop`` = mean of ``log p(truth | v, q) - log p(truth | v', q)``. Each rate has
   ``_n``, ``_ci_low`` and ``_ci_high`` (95% Wilson).

2. **Blind accuracy.** Closed questions answered on a blank image (one grey level, the original
   size): ``blind_accuracy`` (lower = less language prior) and ``blind_gap`` = accuracy of the
   same questions with their images minus ``blind_accuracy``.

3. **Lesion attention ratio** per decoder layer ``l``: the reference answer is teacher-forced;
   for each of its clinical tokens (:func:`~fire_mpo_core.evaluation.clinical.clinical_spans`) the
   attention row of the position that *predicts* it is read (eager attention), averaged over
   heads and clinical tokens, restricted to image tokens. With ``a_k`` that attention on image
   token ``k`` and ``f_k`` the share of token ``k``'s image patch inside the lesion mask::

       ratio_l = (sum_k a_k f_k / sum_k a_k) / (mean_k f_k)

   i.e. the share of image attention on the lesion over the lesion's area share; 1 = no
   preference, > 1 = attention concentrates on the lesion. ``lesion_attention_ratio_l<l>`` per
   layer (mean over records) and ``lesion_attention_ratio`` (mean over layers).

Image tokens are found from the processor's output: positions where ``input_ids`` is the
model's image token, in row-major order of the patch grid that the model's family
(:mod:`fire_mpo_core.models.families`) gives (LLaVA: the CLIP crop's ``crop / patch`` grid;
Qwen-VL: ``image_grid_thw`` after the ``merge_size`` merger; Gemma 3, Idefics3, InternVL: the
square grid of one pooled / pixel-shuffled tile). The mask
goes through the same resize / centre crop as the image (:func:`patch_coverage`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np
import torch
from PIL import Image
from torch import Tensor

from fire_mpo_core.corruption import corrupt, load_mask
from fire_mpo_core.corruption.masks import resize_mask
from fire_mpo_core.corruption.ops import dilate_mask
from fire_mpo_core.data.io import open_image, resolve_in_root
from fire_mpo_core.data.records import VQARecord
from fire_mpo_core.data.synthlesion import sentence_answer
from fire_mpo_core.evaluation.clinical import clinical_spans
from fire_mpo_core.evaluation.config import EvaluateConfig
from fire_mpo_core.evaluation.metrics import closed_correct, exact_match
from fire_mpo_core.evaluation.probes import Probe, build_probes
from fire_mpo_core.evaluation.stats import rate_with_ci
from fire_mpo_core.models import encode_batch, generate, model_inputs
from fire_mpo_core.models.families import family_of
from fire_mpo_core.models.families import image_token_id as _image_token_id


def evenly(items: Sequence[Any], n: int) -> list[Any]:
    """At most ``n`` items spread evenly over ``items`` (all of them if there are fewer)."""
    if len(items) <= n:
        return list(items)
    return [items[(i * len(items)) // n] for i in range(n)]


def _mask(root, record: VQARecord, shape: tuple[int, int]) -> np.ndarray:
    """The record's lesion mask as bool HxW at the image's size (nearest resize if needed)."""
    return _mask_file(root, record.mask, shape)


@torch.no_grad()
def answer_logprobs(
    model, processor, images: list[Image.Image], questions: list[str], answers: list[str], bs: int
) -> list[float]:
    """Sum of ``log p(answer tokens + EOS | image, question)`` per example, length N."""
    out: list[float] = []
    for s in range(0, len(questions), bs):
        batch = encode_batch(
            processor, images[s : s + bs], questions[s : s + bs], answers[s : s + bs]
        )
        logits = model(**_to_model(model, batch)).logits[:, :-1].float()  # [B, T-1, V]
        labels = batch["labels"][:, 1:].to(logits.device)  # [B, T-1]
        keep = labels != -100
        lp = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
        out.extend((lp * keep).sum(1).tolist())
    return out


def _to_model(model, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
    inputs = {k: v.to(model.device) for k, v in model_inputs(dict(batch)).items()}
    if "pixel_values" in inputs:
        inputs["pixel_values"] = inputs["pixel_values"].to(model.dtype)
    return inputs


def image_token_id(model) -> int:
    return _image_token_id(model.config)


def patch_coverage(
    mask: np.ndarray, grid: tuple[int, int], crop: tuple[int, int, int] | None = None
) -> np.ndarray:
    """Share of each image token's patch inside the mask, row-major, shape ``[gh * gw]``.

    Args:
        mask: bool HxW at the original image's size.
        grid: ``(gh, gw)`` image tokens the model sees.
        crop: ``(shortest_edge, crop_h, crop_w)`` of a resize-then-centre-crop processor (CLIP);
            None for a processor that resizes the whole image onto the grid (Qwen2-VL).
    """
    m = mask.astype(np.float32)
    if crop is not None:
        short, ch, cw = crop
        scale = short / min(m.shape)
        h0, w0 = min(m.shape[0], round(ch / scale)), min(m.shape[1], round(cw / scale))
        top, left = (m.shape[0] - h0) // 2, (m.shape[1] - w0) // 2
        m = m[top : top + h0, left : left + w0]
    gh, gw = grid
    return cv2.resize(m, (gw, gh), interpolation=cv2.INTER_AREA).reshape(-1)


def _grid_and_crop(model, processor, batch, row: int, n_image: int):
    # The family knows how its image tokens lie on the image (fire_mpo_core.models.families).
    grid, crop = family_of(model).image_grid(model, processor, batch, row, n_image)
    if grid[0] * grid[1] != n_image:
        raise ValueError(f"image grid {grid} does not match {n_image} image tokens")
    return grid, crop


def lesion_attention_ratio(
    attentions: Sequence[Tensor], query_pos: Tensor, image_pos: Tensor, coverage: Tensor
) -> list[float]:
    """Per-layer lesion attention ratio of one example (see the module docstring).

    Args:
        attentions: per layer ``[heads, T, T]`` attention probabilities (query, key).
        query_pos: ``[Q]`` positions whose attention rows are read (those predicting the
            clinical answer tokens).
        image_pos: ``[K]`` positions of the image tokens, in patch-grid order.
        coverage: ``[K]`` share of each image token's patch inside the lesion mask.

    Returns:
        ``L`` floats: ``(sum_k a_k f_k / sum_k a_k) / mean_k f_k`` with ``a_k`` the attention
        on image token k averaged over heads and queries (NaN if the mask or the image
        attention is empty).
    """
    f = coverage.double()
    area = f.mean()
    out = []
    for att in attentions:
        a = att.double()[:, query_pos][:, :, image_pos].mean(dim=(0, 1))  # [K]
        total = a.sum()
        if area <= 0 or total <= 0:
            out.append(float("nan"))
            continue
        out.append(float((a * f).sum() / total / area))
    return out


@torch.no_grad()
def attention_ratios(
    model, processor, root, records: Sequence[VQARecord], bs: int
) -> list[list[float] | str]:
    """Per record, the per-layer lesion attention ratios, or a reason string when skipped."""
    target = model.get_base_model() if hasattr(model, "get_base_model") else model
    previous = target.config._attn_implementation
    target.set_attn_implementation("eager")  # sdpa / flash kernels return no weights
    img_tok = image_token_id(target)
    results: list[list[float] | str] = []
    try:
        for s in range(0, len(records), bs):
            chunk = records[s : s + bs]
            images = [open_image(root, r.image) for r in chunk]
            batch = encode_batch(
                processor,
                images,
                [r.question for r in chunk],
                [r.answer for r in chunk],
                [clinical_spans(r.answer) for r in chunk],
            )
            out = model(**_to_model(model, batch), output_attentions=True)
            for i, r in enumerate(chunk):
                ids = batch["input_ids"][i]
                image_pos = (ids == img_tok).nonzero()[:, 0]
                query_pos = batch["span_mask"][i].nonzero()[:, 0] - 1
                if len(query_pos) == 0:
                    results.append("no clinical answer token")
                    continue
                try:
                    grid, crop = _grid_and_crop(target, processor, batch, i, len(image_pos))
                except ValueError as e:
                    results.append(str(e))
                    continue
                w, h = images[i].size
                cov = patch_coverage(_mask(root, r, (h, w)), grid, crop)
                layers = [a[i].cpu() for a in out.attentions]
                results.append(
                    lesion_attention_ratio(layers, query_pos, image_pos, torch.from_numpy(cov))
                )
    finally:
        target.set_attn_implementation(previous)
    return results


def _mean(xs: Sequence[float], digits: int = 4) -> float | None:
    xs = [x for x in xs if x == x]  # NaN-free
    return round(sum(xs) / len(xs), digits) if xs else None


def removed_image(root, image: str, masks: Sequence[str], dilate_px: int, kind: str) -> Image.Image:
    """``image`` with the union of ``masks`` (grown by ``dilate_px``: a lesion's soft rim lies
    outside its mask) removed by ``kind`` (inpaint: filled from the surrounding tissue), RGB."""
    img = np.asarray(open_image(root, image))
    union = np.zeros(img.shape[:2], bool)
    for m in masks:
        union |= _mask_file(root, m, img.shape[:2])
    return Image.fromarray(corrupt(img, dilate_mask(union, dilate_px), kind, 0))


def _mask_file(root, rel: str, shape: tuple[int, int]) -> np.ndarray:
    """A mask file under ``root`` as bool HxW at ``shape`` (nearest resize if needed)."""
    return resize_mask(load_mask(resolve_in_root(root, rel)), shape)


def _probe_correct(p: Probe, prediction: str, truth: str) -> bool:
    if p.answer_type == "closed":
        return closed_correct(prediction, truth)
    # The bare answer or SynthLesion's sentence form of it ("None, based on the image.").
    return exact_match(prediction, truth) or exact_match(prediction, sentence_answer(truth))


@torch.no_grad()
def score_probes(
    model, processor, root, probes: Sequence[Probe], cfg: EvaluateConfig
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Answer every probe on v and v' and score it (rates with n and 95% Wilson intervals).

    Keys: ``grounded_accuracy`` (remove probes right on v and on v': the headline),
    ``grounded_accuracy_closed`` (its presence + quadrant part), ``keep_accuracy`` (keep
    probes right both ways), ``flip_given_right`` (remove probes right on v' among those right
    on v), ``presence_accuracy_truth_yes`` / ``_truth_no`` (presence on lesion scans / on
    lesion-free scans) and their mean ``presence_balanced_accuracy``, ``visual_logp_drop``
    (mean log p(truth | v) - log p(truth | v') over closed remove probes; > 0: the model uses
    the lesion)."""
    gen = {"max_new_tokens": cfg.max_new_tokens, "batch_size": cfg.batch_size}
    # Each distinct (image, question) is answered once on v, each (image, removed, question)
    # once on v'.
    clean_keys = sorted({(p.image, p.question) for p in probes})
    removed_keys = sorted({(p.image, p.remove, p.question) for p in probes if p.remove})
    images = {img: open_image(root, img) for img, _ in clean_keys}
    outs = generate(model, processor, [images[i] for i, _ in clean_keys],
                    [q for _, q in clean_keys], **gen)  # fmt: skip
    on_v = {k: o[0] for k, o in zip(clean_keys, outs)}
    edited = {
        (img, rm): removed_image(root, img, rm, cfg.removal_dilate_px, cfg.sensitivity_corruption)
        for img, rm, _ in removed_keys
    }
    outs = generate(model, processor, [edited[(i, rm)] for i, rm, _ in removed_keys],
                    [q for _, _, q in removed_keys], **gen)  # fmt: skip
    on_vp = {k: o[0] for k, o in zip(removed_keys, outs)}
    rows, flags = [], {k: [] for k in ("both", "both_closed", "keep", "flip", "yes", "no")}
    lp_items = []
    for p in probes:
        pred_v = on_v[(p.image, p.question)]
        right_v = _probe_correct(p, pred_v, p.truth)
        row = {"id": p.id, "measure": f"probe_{p.kind}", "question": p.question,
               "truth": p.truth, "prediction": pred_v, "right": right_v}  # fmt: skip
        if p.kind == "free":
            flags["no"].append(right_v)
        else:
            pred_vp = on_vp[(p.image, p.remove, p.question)]
            right_vp = _probe_correct(p, pred_vp, p.truth_removed)
            both = right_v and right_vp
            row |= {"truth_removed": p.truth_removed, "prediction_removed": pred_vp,
                    "right_removed": right_vp, "right_both": both}  # fmt: skip
            if p.kind == "remove":
                flags["both"].append(both)
                if p.answer_type == "closed":
                    flags["both_closed"].append(both)
                    lp_items.append(p)
                if right_v:
                    flags["flip"].append(right_vp)
                if p.question_type == "presence":
                    flags["yes"].append(right_v)
            else:
                flags["keep"].append(both)
        rows.append(row)
    metrics: dict[str, Any] = {}
    for key, name in (("both", "grounded_accuracy"), ("both_closed", "grounded_accuracy_closed"),
                      ("keep", "keep_accuracy"), ("flip", "flip_given_right"),
                      ("yes", "presence_accuracy_truth_yes"),
                      ("no", "presence_accuracy_truth_no")):  # fmt: skip
        metrics |= rate_with_ci(name, flags[key])
    yes, no = metrics["presence_accuracy_truth_yes"], metrics["presence_accuracy_truth_no"]
    metrics["presence_balanced_accuracy"] = (
        round((yes + no) / 2, 4) if yes is not None and no is not None else None
    )
    if lp_items:
        bs = min(cfg.batch_size, 16)
        qs, ys = [p.question for p in lp_items], [p.truth for p in lp_items]
        lp_v = answer_logprobs(model, processor, [images[p.image] for p in lp_items], qs, ys, bs)
        lp_vp = answer_logprobs(
            model, processor, [edited[(p.image, p.remove)] for p in lp_items], qs, ys, bs
        )
        metrics["visual_logp_drop"] = _mean([a - b for a, b in zip(lp_v, lp_vp)], 6)
        metrics["visual_logp_drop_n"] = len(lp_items)
    return metrics, rows


def measure_grounding(
    model,
    processor,
    root,
    records: Sequence[VQARecord],
    predictions: Mapping[str, str],
    cfg: EvaluateConfig,
) -> tuple[dict[str, float | int | None], list[dict[str, Any]]]:
    """Grounding probes, blind accuracy and lesion attention ratios (module docstring).

    Args:
        model, processor: the policy in eval mode.
        root: dataset root of ``records``.
        records: the evaluated records.
        predictions: record id -> the model's answer with the real image (from the benchmark).
        cfg: ``grounding_max_samples``, ``sensitivity_corruption``, ``removal_dilate_px``,
            ``blind_fill``,
            ``batch_size``, ``max_new_tokens``.

    Returns:
        (flat metrics, per-sample rows for ``grounding.jsonl``).
    """
    n, bs = cfg.grounding_max_samples, cfg.batch_size
    gen = {"max_new_tokens": cfg.max_new_tokens, "batch_size": bs}
    # Headline keys are always present (None: nothing in this split could be measured).
    metrics: dict[str, float | int | None] = dict.fromkeys(
        ("grounded_accuracy", "keep_accuracy", "visual_logp_drop", "blind_accuracy",
         "blind_gap", "lesion_attention_ratio")
    )  # fmt: skip
    rows: list[dict[str, Any]] = []

    # 1. Grounding probes: right on v and on v' (evaluation.probes), the headline.
    probes = build_probes(records)
    if probes:
        g_metrics, g_rows = score_probes(model, processor, root, probes, cfg)
        metrics |= g_metrics
        rows += g_rows

    # 2. Blind accuracy: closed questions on a blank image of the original size.
    blind = evenly([r for r in records if r.answer_type == "closed"], n)
    if blind:
        blanks = []
        for r in blind:
            w, h = open_image(root, r.image).size
            blanks.append(Image.new("RGB", (w, h), (cfg.blind_fill,) * 3))
        preds = [
            o[0] for o in generate(model, processor, blanks, [r.question for r in blind], **gen)
        ]
        right = [float(closed_correct(p, r.answer)) for r, p in zip(blind, preds)]
        seen = [
            float(closed_correct(predictions[r.id], r.answer)) for r in blind if r.id in predictions
        ]
        for r, p, ok in zip(blind, preds, right):
            rows.append({"id": r.id, "measure": "blind", "prediction": p, "correct": bool(ok)})
        metrics["blind_accuracy"] = _mean(right)
        if len(seen) == len(right):
            metrics["blind_gap"] = round(sum(seen) / len(seen) - sum(right) / len(right), 4)
    metrics["n_blind"] = len(blind)

    # 3. Lesion attention ratio per layer, on clinical answer tokens.
    att = evenly([r for r in records if r.mask and clinical_spans(r.answer)], n)
    per_layer: list[list[float]] = []
    for r, res in zip(att, attention_ratios(model, processor, root, att, min(bs, 8))):
        if isinstance(res, str):
            rows.append({"id": r.id, "measure": "attention", "skipped": res})
            continue
        per_layer.append(res)
        rows.append({"id": r.id, "measure": "attention", "ratios": res})
    if per_layer:
        for layer, vals in enumerate(zip(*per_layer)):
            metrics[f"lesion_attention_ratio_l{layer}"] = _mean(vals)
        metrics["lesion_attention_ratio"] = _mean([x for res in per_layer for x in res])
    metrics["n_lesion_attention"] = len(per_layer)
    return metrics, rows
