"""What the pipeline needs to know about each vision-language family, in one registry.

Every stage talks to a model through these few questions; the answers differ per family and live
here, one :class:`Family` entry each, looked up by the checkpoint's ``config.model_type`` (so a
checkpoint not built by us works the same way)::

    from fire_mpo_core.models.families import family_of

    fam = family_of(model)                    # or family_of(model.config)
    fam.processor_images(images)              # flat list, or one list per sample (Gemma 3)
    fam.language_model                        # "model.language_model" (LoRA scope)
    fam.select_image_inputs(encoded, rows, model.config)   # per-image inputs of some rows
    fam.pack_features(feats)                  # precomputed features -> mm_encoder_outputs
    fam.image_grid(model, processor, encoded, row, n_image_tokens)   # patch grid of the row

A new family = one entry in :data:`FAMILIES`.

Families (transformers 5 classes):

============  ==========================================  ============================
family        model_type                                  image tokens per image
============  ==========================================  ============================
llava         llava (Llama or Mistral decoder)            (crop / patch)^2, CLS dropped
qwen_vl       qwen2_vl, qwen2_5_vl, qwen3_vl (deepstack)  grid_thw / merge^2
gemma3        gemma3                                      mm_tokens_per_image (pooled)
idefics3      idefics3, smolvlm                           image_seq_len per tile
internvl      internvl                                    image_seq_length per tile
============  ==========================================  ============================
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from PIL import Image
from torch import Tensor
from transformers.modeling_outputs import BaseModelOutputWithPooling

__all__ = [
    "FAMILIES",
    "Family",
    "ImageFeatures",
    "family_of",
    "image_token_id",
    "processor_family",
]


@dataclass(frozen=True)
class ImageFeatures:
    """The vision side's output for one image: ``pooled`` [n_image_tokens, H_text] (what
    replaces the image tokens) and, for Qwen3-VL, one ``deepstack`` tensor of the same shape per
    deepstack layer (added to the first decoder layers' hidden states at the image tokens)."""

    pooled: Tensor
    deepstack: tuple[Tensor, ...] = ()


Grid = tuple[tuple[int, int], tuple[int, int, int] | None]


def image_token_id(config) -> int:
    """The id of the token that image features replace (``image_token_id`` or the older
    ``image_token_index`` of the config)."""
    for name in ("image_token_id", "image_token_index"):
        value = getattr(config, name, None)
        if value is not None:
            return int(value)
    raise ValueError(f"{type(config).__name__} names no image_token_id / image_token_index")


# --------------------------------------------------------------------------- image grids


def _clip_grid(model, processor, encoded, row: int, n_image: int) -> Grid:
    """LLaVA: CLIP's resize-then-centre-crop, one token per ``patch_size`` patch."""
    ip = processor.image_processor
    patch = int(model.config.vision_config.patch_size)
    cs = getattr(ip, "crop_size", None) or {}
    size = getattr(ip, "size", None) or {}
    ch, cw = cs.get("height"), cs.get("width")
    short = size.get("shortest_edge") or size.get("height")
    if not (ch and cw and short):
        raise ValueError(f"cannot infer the image grid of {type(ip).__name__}")
    crop = (short, ch, cw) if getattr(ip, "do_center_crop", False) else None
    return (ch // patch, cw // patch), crop


def _qwen_grid(model, processor, encoded, row: int, n_image: int) -> Grid:
    """Qwen-VL: the whole image resized onto ``image_grid_thw``, merged ``merge x merge``."""
    _, h, w = (int(x) for x in encoded["image_grid_thw"][row])
    merge = int(getattr(model.config.vision_config, "spatial_merge_size", 2))
    return (h // merge, w // merge), None


def _square_grid(per_tile: Callable[[object, object], int]) -> Callable[..., Grid]:
    """Families whose single tile is resized whole onto a square token grid; ``per_tile``
    gives the tokens of one tile. Tiled inputs (several tiles per image) are refused."""

    def grid(model, processor, encoded, row: int, n_image: int) -> Grid:
        n = per_tile(model, processor)
        side = math.isqrt(n)
        if n_image != n or side * side != n:
            raise ValueError(
                f"{n_image} image tokens but one tile has {n}: tiled images (several crops "
                "per image) are not mapped to the patch grid"
            )
        return (side, side), None

    return grid


# --------------------------------------------------------------------------- per-image inputs


def _rows_pixel_values(encoded: dict[str, Tensor], rows: list[int], config) -> dict[str, Tensor]:
    """One ``pixel_values`` entry per row (LLaVA, Gemma 3, InternVL untiled; Idefics3's
    [R, n_tiles, C, H, W] with its ``pixel_attention_mask``)."""
    out = {"pixel_values": encoded["pixel_values"][rows]}
    for key in ("image_sizes", "pixel_attention_mask"):
        if key in encoded:
            out[key] = encoded[key][rows]
    return out


def _packed_pixel_values(encoded: dict[str, Tensor], rows: list[int], config) -> dict[str, Tensor]:
    """Qwen-VL's packed patches [sum patches, D], split per image by ``image_grid_thw``."""
    grid = encoded["image_grid_thw"]
    chunks = torch.split(encoded["pixel_values"], grid.prod(-1).tolist())
    return {"pixel_values": torch.cat([chunks[r] for r in rows]), "image_grid_thw": grid[rows]}


def _tiles_per_row(encoded: dict[str, Tensor], config) -> list[int]:
    # InternVL's processor drops its per-image tile counts; each tile is image_seq_length
    # image tokens, so the row's image tokens say how many tiles it has.
    n = (encoded["input_ids"] == image_token_id(config)).sum(-1)
    return (n // int(config.image_seq_length)).tolist()


def _tiled_pixel_values(encoded: dict[str, Tensor], rows: list[int], config) -> dict[str, Tensor]:
    """InternVL: ``pixel_values`` [sum tiles, C, H, W] (one tile per image when untiled)."""
    chunks = torch.split(encoded["pixel_values"], _tiles_per_row(encoded, config))
    return {"pixel_values": torch.cat([chunks[r] for r in rows])}


# --------------------------------------------------------------------------- features


def _unpack_pooled(out, encoded, rows, config) -> list[ImageFeatures]:
    return [ImageFeatures(f.reshape(-1, f.shape[-1])) for f in out.pooler_output]


def _unpack_tiles(out, encoded, rows, config) -> list[ImageFeatures]:
    # One [tiles * image_seq_length, H] entry per image, its tiles in order.
    tiles = _tiles_per_row(encoded, config)
    flat = out.pooler_output.reshape(-1, out.pooler_output.shape[-1])
    sizes = [tiles[r] * int(config.image_seq_length) for r in rows]
    return [ImageFeatures(f) for f in torch.split(flat, sizes)]


def _unpack_deepstack(out, encoded, rows, config) -> list[ImageFeatures]:
    # Qwen3-VL: deepstack_features = per layer, a tuple of per-image tensors.
    layers = [list(layer) for layer in out.deepstack_features]
    return [
        ImageFeatures(f, tuple(layer[i] for layer in layers))
        for i, f in enumerate(out.pooler_output)
    ]


def _pack_list(feats: Sequence[ImageFeatures]):
    return BaseModelOutputWithPooling(pooler_output=[f.pooled for f in feats])


def _pack_tensor(feats: Sequence[ImageFeatures]):
    # Gemma 3 / InternVL call .to() on pooler_output: one [N, H] tensor, scattered in order.
    return BaseModelOutputWithPooling(pooler_output=torch.cat([f.pooled for f in feats]))


def _pack_deepstack(feats: Sequence[ImageFeatures]):
    from transformers.models.qwen3_vl.modeling_qwen3_vl import (
        BaseModelOutputWithDeepstackFeatures,
    )

    n_layers = len(feats[0].deepstack)
    return BaseModelOutputWithDeepstackFeatures(
        pooler_output=[f.pooled for f in feats],
        deepstack_features=[[f.deepstack[k] for f in feats] for k in range(n_layers)],
    )


# --------------------------------------------------------------------------- the registry


@dataclass(frozen=True)
class Family:
    """One vision-language family (see the module docstring).

    Attributes:
        name: registry key.
        model_types: ``config.model_type`` values of the family.
        processors: processor class names of the family (the processor alone must say how it
            takes images: ``encode_batch`` sees no model).
        language_model: module path of the language model (decoder layers + embeddings) inside
            the transformers model; LoRA ``scope: language_model`` adapts only modules below it.
        vision: module paths of the vision tower and projector (frozen under that scope).
        nested_images: the processor wants one list of images per sample.
        select_image_inputs: ``(encoded, rows, config) -> forward kwargs`` of those rows'
            images (``get_image_features`` and the per-row forward take them).
        unpack_features: ``(get_image_features output, encoded, rows, config)`` -> one
            :class:`ImageFeatures` per row of ``rows``.
        pack_features: per-row :class:`ImageFeatures` -> the ``mm_encoder_outputs["image"]``
            value the model's forward takes.
        image_grid: ``(model, processor, encoded, row, n_image_tokens) -> ((gh, gw), crop)``:
            the image tokens of a row in row-major order of a ``gh x gw`` grid over the image;
            ``crop`` = ``(shortest_edge, crop_h, crop_w)`` for resize-then-centre-crop, else None.
        grid_inputs: per-row inputs the forward needs even with precomputed features
            (Qwen-VL's M-RoPE positions come from ``image_grid_thw``).
    """

    name: str
    model_types: tuple[str, ...]
    processors: tuple[str, ...]
    language_model: str
    vision: tuple[str, ...]
    nested_images: bool
    select_image_inputs: Callable[[dict[str, Tensor], list[int], object], dict[str, Tensor]]
    unpack_features: Callable[..., list[ImageFeatures]]
    pack_features: Callable[[Sequence[ImageFeatures]], object]
    image_grid: Callable[..., Grid]
    grid_inputs: tuple[str, ...] = field(default=())

    def processor_images(self, images: Sequence[Image.Image]) -> list:
        """The ``images=`` argument of the processor for one image per sample."""
        return [[im] for im in images] if self.nested_images else list(images)


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in (
        Family(
            name="llava",
            model_types=("llava",),
            processors=("LlavaProcessor",),
            language_model="model.language_model",
            vision=("model.vision_tower", "model.multi_modal_projector"),
            nested_images=False,
            select_image_inputs=_rows_pixel_values,
            unpack_features=_unpack_pooled,
            pack_features=_pack_list,
            image_grid=_clip_grid,
        ),
        Family(
            name="qwen_vl",
            model_types=("qwen2_vl", "qwen2_5_vl"),
            processors=("Qwen2VLProcessor", "Qwen2_5_VLProcessor"),
            language_model="model.language_model",
            vision=("model.visual",),  # the patch merger (projector) is inside `visual`
            nested_images=False,
            select_image_inputs=_packed_pixel_values,
            unpack_features=_unpack_pooled,
            pack_features=_pack_list,
            image_grid=_qwen_grid,
            grid_inputs=("image_grid_thw",),
        ),
        Family(
            name="qwen3_vl",
            model_types=("qwen3_vl",),
            processors=("Qwen3VLProcessor",),
            language_model="model.language_model",
            vision=("model.visual",),
            nested_images=False,
            select_image_inputs=_packed_pixel_values,
            unpack_features=_unpack_deepstack,
            pack_features=_pack_deepstack,
            image_grid=_qwen_grid,
            grid_inputs=("image_grid_thw",),
        ),
        Family(
            name="gemma3",
            model_types=("gemma3",),
            processors=("Gemma3Processor",),
            language_model="model.language_model",
            vision=("model.vision_tower", "model.multi_modal_projector"),
            nested_images=True,
            select_image_inputs=_rows_pixel_values,
            unpack_features=_unpack_pooled,
            pack_features=_pack_tensor,
            image_grid=_square_grid(lambda m, p: int(m.config.mm_tokens_per_image)),
        ),
        Family(
            name="idefics3",
            model_types=("idefics3", "smolvlm"),
            processors=("Idefics3Processor", "SmolVLMProcessor"),
            language_model="model.text_model",
            vision=("model.vision_model", "model.connector"),
            nested_images=True,
            select_image_inputs=_rows_pixel_values,
            unpack_features=_unpack_pooled,
            pack_features=_pack_list,
            image_grid=_square_grid(lambda m, p: int(p.image_seq_len)),
        ),
        Family(
            name="internvl",
            model_types=("internvl",),
            processors=("InternVLProcessor",),
            language_model="model.language_model",
            vision=("model.vision_tower", "model.multi_modal_projector"),
            nested_images=False,
            select_image_inputs=_tiled_pixel_values,
            unpack_features=_unpack_tiles,
            pack_features=_pack_tensor,
            image_grid=_square_grid(lambda m, p: int(m.config.image_seq_length)),
        ),
    )
}
_BY_MODEL_TYPE = {t: f for f in FAMILIES.values() for t in f.model_types}
_BY_PROCESSOR = {c: f for f in FAMILIES.values() for c in f.processors}


def processor_family(processor) -> Family | None:
    """The family of a processor by its class name (an image-only variant keeps the name), or
    None for a processor of no known family (then images are passed flat)."""
    return _BY_PROCESSOR.get(type(processor).__name__)


def family_of(model_or_config) -> Family:
    """The :class:`Family` of a model (peft-wrapped or not), a config, or a ``model_type``.

    Raises:
        ValueError: the model_type is in no family (names it and the known ones).
    """
    obj = model_or_config
    if not isinstance(obj, str):
        get = getattr(obj, "get_base_model", None)
        obj = get() if callable(get) else obj
        obj = getattr(obj, "config", obj)
        obj = getattr(obj, "model_type", None)
    if obj not in _BY_MODEL_TYPE:
        raise ValueError(
            f"model_type {obj!r} is in no vision-language family of "
            "fire_mpo_core.models.families (known: "
            f"{', '.join(sorted(_BY_MODEL_TYPE))}); add one Family entry for it"
        )
    return _BY_MODEL_TYPE[obj]
