"""Pair batches for preference training: the branch layout and the shared-image forward.

A FiRe-MPO pair is scored on up to four branches (image x response)::

    clean_chosen (v, y+)  clean_rejected (v, y-)  corrupt_chosen (v', y+)  corrupt_rejected (v', y-)

:func:`build_branch_batch` lays the branches of B pairs out as the rows of ONE padded batch (right
padding, one length), so a single forward pass scores all of them::

    rows [0, B)            clean_chosen of pairs 0..B-1
    rows [B, 2B)           clean_rejected
    rows [2B, 2B+C)        corrupt_chosen of the C pairs that have a corrupted image
    rows [2B+C, 2B+2C)     corrupt_rejected of the same C pairs

``BranchBatch.rows[branch]`` maps pair b to its row (-1 where pair b has no v'). Character spans
``chosen_spans`` / ``rejected_spans`` become the token mask ``span_mask`` through
:func:`~fire_mpo_core.models.encode_batch` (a token is marked when its characters overlap a span);
a response longer than ``max_length`` is cut at the end, never the prompt or its image tokens.

Image encoding: every distinct image of a batch goes through the vision tower once (the clean
image serves both clean branches, v' both corrupt ones, and questions about the same scan share
it), via :func:`encode_images`; :func:`forward_hidden` then scatters those features into any
subset of rows through the models' ``mm_encoder_outputs`` argument (transformers 5; every family
of :mod:`fire_mpo_core.models.families`, which knows each one's pixel layout, feature form and
Qwen3-VL's deepstack features). A model without that argument falls back to encoding each row's
image (4 encodes per pair with v' instead of 2), measured equal to the shared path.

Usage::

    pairs = load_pairs(pairs_path, on_reject=rejects.append)
    images = ImageCache(image_root, corrupt_root)
    batch = build_branch_batch(processor, pairs[:8], images, max_length=256)
    feats = encode_images(model, batch)                     # one tensor per distinct image
    hidden = forward_hidden(model, batch, image_features=feats)   # [R, T, H]

Length grouping: :func:`length_grouped_permutation` orders an epoch so that each micro-batch
holds pairs of similar :func:`pair_length` (``TrainConfig.group_by_length``); every batch is
padded only to its own longest row, so grouping cuts the padded tokens the model computes on.
"""

from __future__ import annotations

import inspect
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from fire_mpo_core.data.io import open_image, resolve_in_root
from fire_mpo_core.data.records import PreferencePair
from fire_mpo_core.losses.base import BRANCHES
from fire_mpo_core.models import IGNORE_INDEX, encode_batch
from fire_mpo_core.models.families import ImageFeatures, family_of
from fire_mpo_core.store import DATA, read_jsonl

__all__ = [
    "BRANCHES",
    "BranchBatch",
    "ImageCache",
    "build_branch_batch",
    "encode_images",
    "forward_hidden",
    "hf_model",
    "length_grouped_permutation",
    "load_pairs",
    "missing_image",
    "pair_length",
    "pair_problem",
    "select_image_inputs",
    "shifted_targets",
    "supports_shared_images",
]

#: encode_batch outputs aligned token by token with input_ids (row-selectable, trimmable).
TEXT_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "token_type_ids")
#: Per-row targets of encode_batch, aligned with input_ids.
TARGET_KEYS = ("labels", "span_mask")


# --------------------------------------------------------------------------- pairs


def pair_problem(pair: PreferencePair) -> str | None:
    """Why a pair cannot be trained on, or None. A span must be non-empty and inside its text."""
    for name, text, spans in (
        ("chosen", pair.chosen, pair.chosen_spans),
        ("rejected", pair.rejected, pair.rejected_spans),
    ):
        for start, end in spans:
            if start >= end:
                return f"{name}_spans holds the empty span ({start}, {end})"
            if start < 0 or end > len(text):
                return f"{name}_spans ({start}, {end}) lies outside the {len(text)}-char {name}"
    return None


def missing_image(pair: PreferencePair, image_root: Path, corrupt_root: Path | None) -> str | None:
    """Why a pair's image or corrupted image cannot be read, or None."""
    checks = [("image", image_root, pair.image)]
    if pair.corrupted_image is not None:
        checks.append(("corrupted_image", corrupt_root, pair.corrupted_image))
    for field, root, rel in checks:
        if root is None:
            return f"{field} {rel!r} is set but no folder to resolve it in was given"
        try:
            if not resolve_in_root(root, rel).is_file():
                return f"{field} {rel!r} not found under {root}"
        except ValueError as e:
            return str(e)
    return None


def load_pairs(
    path: str | Path,
    on_reject: Callable[[str, str], None] | None = None,
    image_root: Path | None = None,
    corrupt_root: Path | None = None,
    visual_gate: bool = False,
) -> list[PreferencePair]:
    """Validated pairs of a ``data.jsonl`` (or of a stage folder holding one).

    A record that fails validation, :func:`pair_problem` or (when ``image_root`` is given)
    :func:`missing_image` goes to ``on_reject(id, reason)`` (or raises ValueError when no
    callback is given). Duplicate ids raise ValueError. ``visual_gate`` (``LossConfig``) keeps
    v' only for pairs whose ``reverses_on_removal`` is true: the others get no visual term and
    no corrupt rows (the reference stage and the trainer gate alike).
    """
    path = Path(path)
    if path.is_dir():
        path = path / DATA
    out: list[PreferencePair] = []
    seen: set[str] = set()
    for pair in read_jsonl(path, PreferencePair, on_reject):
        reason = pair_problem(pair)
        if reason is None and image_root is not None:
            reason = missing_image(pair, Path(image_root), corrupt_root)
        if reason is not None:
            if on_reject is None:
                raise ValueError(f"{path}: pair {pair.id}: {reason}")
            on_reject(pair.id, reason)
            continue
        if pair.id in seen:
            raise ValueError(f"{path}: duplicate pair id {pair.id!r}")
        seen.add(pair.id)
        if visual_gate and pair.corrupted_image is not None and not pair.reverses_on_removal:
            pair = pair.model_copy(update={"corrupted_image": None})
        out.append(pair)
    return out


class ImageCache:
    """RGB images of clean (``image_root``) and corrupted (``corrupt_root``) paths, decoded once.

    Keys are ``("clean", rel)`` or ``("corrupt", rel)``; the ``max_items`` most recently used
    images are kept (a 512 px RGB image is 0.8 MB).
    """

    def __init__(self, image_root: Path, corrupt_root: Path | None, max_items: int = 4096):
        self.roots = {"clean": Path(image_root), "corrupt": corrupt_root}
        self.max_items = max_items
        self._cache: OrderedDict[tuple[str, str], Image.Image] = OrderedDict()

    def get(self, key: tuple[str, str]) -> Image.Image:
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        root = self.roots[key[0]]
        if root is None:
            raise ValueError(f"corrupted image {key[1]!r} but no corrupt_root was given")
        img = open_image(root, key[1])
        self._cache[key] = img
        if len(self._cache) > self.max_items:
            self._cache.popitem(last=False)
        return img


# --------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class BranchBatch:
    """B pairs laid out as R = 2B + 2C rows of one padded batch (see the module docstring).

    Attributes:
        pair_ids: the B pair ids.
        encoded: :func:`~fire_mpo_core.models.encode_batch` output for all R rows:
            ``input_ids`` / ``attention_mask`` [R, T], ``labels`` [R, T] (-100 off the response,
            unshifted), ``span_mask`` [R, T] bool, ``response_truncated`` [R] bool, plus the
            processor's image inputs (``pixel_values``, ``image_grid_thw``, ...).
        rows: branch -> [B] long, the row of each pair's branch, -1 where it has none.
        has_corrupted: [B] bool, whether pair b has a corrupted image v'.
        row_pair: [R] long, the pair of each row.
        row_image: [R] long, the distinct image of each row (index into ``image_keys``).
        image_keys: the distinct images, ``("clean" | "corrupt", relative path)``.
        image_first_row: per distinct image, the first row that shows it.
    """

    pair_ids: list[str]
    encoded: dict[str, Tensor]
    rows: dict[str, Tensor]
    has_corrupted: Tensor
    row_pair: Tensor
    row_image: Tensor
    image_keys: list[tuple[str, str]]
    image_first_row: list[int]

    @property
    def num_pairs(self) -> int:
        return len(self.pair_ids)

    @property
    def num_rows(self) -> int:
        return int(self.row_pair.shape[0])

    def to(self, device: torch.device | str) -> BranchBatch:
        return replace(
            self,
            encoded={k: v.to(device) for k, v in self.encoded.items()},
            rows={k: v.to(device) for k, v in self.rows.items()},
            has_corrupted=self.has_corrupted.to(device),
            row_pair=self.row_pair.to(device),
            row_image=self.row_image.to(device),
        )

    def present(self, branch: str) -> tuple[Tensor, Tensor]:
        """(rows [k], pairs [k]) of the pairs that have ``branch``, in pair order."""
        r = self.rows[branch]
        pairs = (r >= 0).nonzero().squeeze(1)
        return r[pairs], pairs

    def branches(self) -> list[str]:
        """Branches with at least one row: the clean two, plus the corrupt two if any v'."""
        return [b for b in BRANCHES if bool((self.rows[b] >= 0).any())]


def build_branch_batch(
    processor,
    pairs: Sequence[PreferencePair],
    images: ImageCache,
    max_length: int | None,
    use_corrupted: bool = True,
) -> BranchBatch:
    """Encode B pairs into one :class:`BranchBatch` (all branches, one padded length).

    Args:
        processor: the model's multimodal processor.
        pairs: B validated pairs (see :func:`pair_problem`).
        images: where the images are read from.
        max_length: per-sequence cap; only responses are cut.
        use_corrupted: False leaves the corrupt branches out even for pairs with v' (losses
            without a visual term never read them).
    """
    if not pairs:
        raise ValueError("build_branch_batch needs at least one pair")
    corrupt = [i for i, p in enumerate(pairs) if use_corrupted and p.corrupted_image is not None]
    keys, row_pair, responses, spans = _branch_rows(pairs, corrupt)
    distinct, first_row, row_image = _distinct_images(keys)
    encoded = encode_batch(
        processor,
        [images.get(k) for k in keys],
        [pairs[i].question for i in row_pair],
        responses=responses,
        response_spans=spans,
        max_length=max_length,
        padding_side="right",
    )
    rows, has_corrupted = _branch_index(len(pairs), corrupt)
    return BranchBatch(
        pair_ids=[p.id for p in pairs],
        encoded=encoded,
        rows=rows,
        has_corrupted=has_corrupted,
        row_pair=torch.tensor(row_pair, dtype=torch.long),
        row_image=torch.tensor(row_image, dtype=torch.long),
        image_keys=list(distinct),
        image_first_row=first_row,
    )


def _branch_rows(
    pairs: Sequence[PreferencePair], corrupt: list[int]
) -> tuple[list[tuple[str, str]], list[int], list[str], list[list[tuple[int, int]]]]:
    """The batch's rows in branch order (clean_chosen, clean_rejected over every pair, then
    corrupt_chosen, corrupt_rejected over the pairs ``corrupt``): per row its image key, pair,
    response and response spans."""
    keys: list[tuple[str, str]] = []
    row_pair: list[int] = []
    responses: list[str] = []
    spans: list[list[tuple[int, int]]] = []
    for i, p in enumerate(pairs):  # clean_chosen
        keys.append(("clean", p.image))
        row_pair.append(i)
        responses.append(p.chosen)
        spans.append(list(p.chosen_spans))
    for i, p in enumerate(pairs):  # clean_rejected
        keys.append(("clean", p.image))
        row_pair.append(i)
        responses.append(p.rejected)
        spans.append(list(p.rejected_spans))
    for chosen in (True, False):  # corrupt_chosen, corrupt_rejected
        for i in corrupt:
            p = pairs[i]
            keys.append(("corrupt", p.corrupted_image))
            row_pair.append(i)
            responses.append(p.chosen if chosen else p.rejected)
            spans.append(list(p.chosen_spans if chosen else p.rejected_spans))
    return keys, row_pair, responses, spans


def _distinct_images(
    keys: list[tuple[str, str]],
) -> tuple[dict[tuple[str, str], int], list[int], list[int]]:
    """Distinct image keys in first-use order, the first row of each, and each row's image."""
    distinct: dict[tuple[str, str], int] = {}
    first_row: list[int] = []
    row_image: list[int] = []
    for r, key in enumerate(keys):
        if key not in distinct:
            distinct[key] = len(distinct)
            first_row.append(r)
        row_image.append(distinct[key])
    return distinct, first_row, row_image


def _branch_index(b: int, corrupt: list[int]) -> tuple[dict[str, Tensor], Tensor]:
    """Per branch, each pair's row in the batch (-1: the pair has no such row), and which pairs
    have v' rows."""
    c = len(corrupt)
    none = torch.full((b,), -1, dtype=torch.long)
    rows = {
        "clean_chosen": torch.arange(b),
        "clean_rejected": torch.arange(b, 2 * b),
        "corrupt_chosen": none.clone(),
        "corrupt_rejected": none.clone(),
    }
    idx = torch.tensor(corrupt, dtype=torch.long)
    rows["corrupt_chosen"][idx] = torch.arange(2 * b, 2 * b + c)
    rows["corrupt_rejected"][idx] = torch.arange(2 * b + c, 2 * b + 2 * c)
    has_corrupted = torch.zeros(b, dtype=torch.bool)
    has_corrupted[idx] = True
    return rows, has_corrupted


# --------------------------------------------------------------------------- forward


def hf_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a peft wrapper (``get_base_model``), else the model."""
    get = getattr(model, "get_base_model", None)
    return get() if callable(get) else model


def supports_shared_images(model: torch.nn.Module) -> bool:
    """Whether the model's inner multimodal model takes precomputed image features
    (``model.model.get_image_features`` + ``mm_encoder_outputs``; every family of
    :mod:`fire_mpo_core.models.families` in transformers 5)."""
    inner = getattr(hf_model(model), "model", None)
    if inner is None or not hasattr(inner, "get_image_features"):
        return False
    return "mm_encoder_outputs" in inspect.signature(inner.forward).parameters


def select_image_inputs(model, encoded: dict[str, Tensor], rows: Sequence[int] | Tensor) -> dict:
    """The processor's per-image inputs for the images of ``rows``, in row order, in the layout
    of the model's family (LLaVA-style ``pixel_values`` [R, ...] indexed by row; Qwen-VL-style
    packed patches split per image by ``image_grid_thw``; InternVL's tiles; ...)."""
    rows = torch.as_tensor(rows, dtype=torch.long).tolist()
    hf = hf_model(model)
    return family_of(hf).select_image_inputs(encoded, rows, hf.config)


def encode_images(
    model: torch.nn.Module, batch: BranchBatch, rows: Tensor | None = None
) -> list[ImageFeatures | None]:
    """Vision tower + projector once per distinct image of the batch (of ``rows``, if given).

    Returns one entry per ``batch.image_keys``: the image's :class:`ImageFeatures` (pooled
    [n_image_tokens, H_text], plus Qwen3-VL's deepstack features), or None for an image no row
    of ``rows`` shows. Gradients flow when the vision side has trainable parameters and grad
    mode is on.
    """
    wanted = (
        list(range(len(batch.image_keys)))
        if rows is None
        else sorted(set(batch.row_image[rows].tolist()))
    )
    first = [batch.image_first_row[i] for i in wanted]
    hf = hf_model(model)
    family = family_of(hf)
    image_inputs = family.select_image_inputs(batch.encoded, first, hf.config)
    out = hf.model.get_image_features(**image_inputs, return_dict=True)
    feats: list[ImageFeatures | None] = [None] * len(batch.image_keys)
    unpacked = family.unpack_features(out, batch.encoded, first, hf.config)
    for i, f in zip(wanted, unpacked, strict=True):
        feats[i] = f
    return feats


def _text_inputs(batch: BranchBatch, rows: Tensor) -> tuple[dict[str, Tensor], int]:
    """Text-aligned inputs of ``rows``, trimmed to their longest real length (right padding)."""
    enc = batch.encoded
    width = int(enc["attention_mask"][rows].sum(-1).max())
    inputs = {k: enc[k][rows, :width] for k in TEXT_KEYS if k in enc}
    return inputs, width


def forward_hidden(
    model: torch.nn.Module,
    batch: BranchBatch,
    rows: Tensor | None = None,
    image_features: list[ImageFeatures | None] | None = None,
) -> tuple[Tensor, int]:
    """Final (normed) hidden states of ``rows`` (default: all), without computing logits.

    Args:
        model: a transformers image-text-to-text model, optionally under peft.
        batch: the branch batch.
        rows: [r] long row indices; None = all R rows.
        image_features: from :func:`encode_images` (one per distinct image); None makes the
            model encode each row's image itself (the fallback for models without
            ``mm_encoder_outputs``).

    Returns:
        (hidden [r, W, H], W): W is the longest real length among ``rows``; position t scores
        ``labels[rows, t + 1]`` (HF next-token convention).
    """
    if rows is None:
        rows = torch.arange(batch.num_rows, device=batch.row_pair.device)
    inputs, width = _text_inputs(batch, rows)
    hf = hf_model(model)
    family = family_of(hf)
    if image_features is not None:
        # Inputs the forward needs besides the features (Qwen-VL's M-RoPE grid).
        for key in family.grid_inputs:
            inputs[key] = batch.encoded[key][rows]
        feats = [image_features[i] for i in batch.row_image[rows].tolist()]
        mm = {"image": family.pack_features(feats)}
        out = hf.model(**inputs, mm_encoder_outputs=mm, use_cache=False)
        return out.last_hidden_state, width
    inputs.update(family.select_image_inputs(batch.encoded, rows.tolist(), hf.config))
    out = hf(**inputs, output_hidden_states=True, use_cache=False)
    return out.hidden_states[-1], width


def shifted_targets(batch: BranchBatch, rows: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """(labels [r, W-1], span_mask [r, W-1]) of ``rows`` aligned with ``hidden[:, :-1]``:
    position t scores token t + 1. Span marks outside the response are cleared."""
    labels = batch.encoded["labels"][rows, 1:width]
    span = batch.encoded["span_mask"][rows, 1:width] & (labels != IGNORE_INDEX)
    return labels, span


# --------------------------------------------------------------------------- length grouping


def pair_length(pair: PreferencePair) -> int:
    """A cheap proxy of a pair's padded row length: question plus the longer response, in
    characters (the image tokens are the same for every row of a model, so they do not sort)."""
    return len(pair.question) + max(len(pair.chosen), len(pair.rejected))


def length_grouped_permutation(
    lengths: Sequence[int],
    batch_size: int,
    generator: torch.Generator,
    mega_batches: int = 50,
) -> list[int]:
    """A random order whose consecutive ``batch_size`` slices hold pairs of similar length.

    As ``transformers``' ``LengthGroupedSampler``: shuffle, cut into mega-batches of
    ``mega_batches * batch_size`` items, sort each by length (longest first), then shuffle the
    order of the resulting batches (the first batch stays the longest, so an out-of-memory shows
    at step 1). Each batch pads to its own longest row, so grouping removes most of the padding
    that a random order puts into every batch. Deterministic for a generator state.

    Args:
        lengths: [N] per-item lengths (e.g. :func:`pair_length`).
        batch_size: items per batch.
        generator: the seeded source of randomness (the data order's).
        mega_batches: batches per sorted group; larger groups pad less and shuffle less.

    Returns:
        A permutation of ``range(N)``.
    """
    n = len(lengths)
    perm = torch.randperm(n, generator=generator).tolist()
    mega = max(1, mega_batches * batch_size)
    groups = [sorted(perm[i : i + mega], key=lambda j: -lengths[j]) for i in range(0, n, mega)]
    batches = [g[i : i + batch_size] for g in groups for i in range(0, len(g), batch_size)]
    if len(batches) > 1:
        order = torch.randperm(len(batches) - 1, generator=generator).add(1).tolist()
        batches = [batches[0], *(batches[i] for i in order)]
    return [i for b in batches for i in b]
