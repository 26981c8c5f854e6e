"""Export preference pairs as a Hugging Face ``datasets`` dataset that TRL trains on as it is.

The default is TRL's *conversational vision* preference format, which ``trl.DPOTrainer`` (1.16)
reads without any ``.map``: ``images`` (a list of images), ``prompt`` = one user turn whose content
is an image placeholder then the question, ``chosen`` / ``rejected`` = one assistant turn each.
TRL renders these with the processor's chat template, so the prompt gets the model's own image
token(s); a bare question string gave "Found total 0 <image> tokens and N images". The plain texts
are kept as ``question``, ``chosen_text`` and ``rejected_text``. We add our own columns so the
span-level losses can be rebuilt: ``id``, ``chosen_spans`` / ``rejected_spans`` (``[start, end)``
character offsets into ``chosen_text`` / ``rejected_text``), ``verdict``, ``style``,
``answer_type``, ``record_id`` and ``corrupted_image`` (the relative path from the `corrupt`
stage, or None)::

    ds = export_hf_dataset(pairs, image_root=Path("store/.../prepare/<key>"), out_dir=Path("hf"))
    ds = datasets.load_from_disk("hf")
    ds[0]["images"][0]          # PIL.Image.Image

Images are stored *inside* the dataset (their bytes, under the ``datasets.Image`` feature), so the
exported folder is self-contained. ``conversational=False`` writes the older flat layout instead
(``prompt`` / ``chosen`` / ``rejected`` as plain strings), which TRL only trains on after the
prompt has been rendered with the model's chat template.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import datasets

from fire_mpo_core.data.records import PreferencePair


def _features(conversational: bool, with_corrupted: bool) -> datasets.Features:
    span = datasets.Sequence(datasets.Sequence(datasets.Value("int64"), length=2))
    if conversational:
        part = {"type": datasets.Value("string"), "text": datasets.Value("string")}
        turn = [{"role": datasets.Value("string"), "content": [part]}]
        prompt, answer = turn, turn
    else:
        prompt = answer = datasets.Value("string")
    feats = {
        "id": datasets.Value("string"),
        "record_id": datasets.Value("string"),
        "images": datasets.Sequence(datasets.Image()),
        "prompt": prompt,
        "chosen": answer,
        "rejected": answer,
        "chosen_spans": span,
        "rejected_spans": span,
        "verdict": datasets.Value("string"),
        "style": datasets.Value("string"),
        "answer_type": datasets.Value("string"),
        "corrupted_image": datasets.Value("string"),
    }
    if conversational:  # the plain texts too, under their own names
        feats |= {k: datasets.Value("string") for k in ("question", "chosen_text", "rejected_text")}
    if with_corrupted:
        feats["corrupted_images"] = datasets.Sequence(datasets.Image())
    return datasets.Features(feats)


def _image(path: Path) -> dict[str, object]:
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    return {"bytes": path.read_bytes(), "path": path.name}


def export_hf_dataset(
    pairs: Iterable[PreferencePair],
    image_root: Path,
    out_dir: Path,
    *,
    conversational: bool = True,
    corrupt_root: Path | None = None,
) -> datasets.Dataset:
    """Write the pairs with ``Dataset.save_to_disk(out_dir)`` and return the dataset.

    Args:
        pairs: the judge's pairs.
        image_root: folder the pairs' relative ``image`` paths resolve against (the `prepare`
            stage's dataset root).
        out_dir: target folder (created; ``save_to_disk`` replaces an existing dataset there).
        conversational: TRL's conversational vision format (default), else plain strings.
        corrupt_root: if given, the folder ``corrupted_image`` paths resolve against; adds a
            ``corrupted_images`` column (one image, or an empty list for pairs without one).

    Raises:
        FileNotFoundError: an image (or corrupted image) is missing.
    """
    image_root = Path(image_root)
    rows: dict[str, list] = {k: [] for k in _features(conversational, corrupt_root is not None)}
    for p in pairs:
        rows["id"].append(p.id)
        rows["record_id"].append(p.record_id)
        rows["images"].append([_image(image_root / p.image)])
        if conversational:
            rows["prompt"].append(
                [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image", "text": None},
                            {"type": "text", "text": p.question},
                        ],
                    }
                ]
            )
            for side, text in (("chosen", p.chosen), ("rejected", p.rejected)):
                rows[side].append(
                    [{"role": "assistant", "content": [{"type": "text", "text": text}]}]
                )
                rows[f"{side}_text"].append(text)
            rows["question"].append(p.question)
        else:
            rows["prompt"].append(p.question)
            rows["chosen"].append(p.chosen)
            rows["rejected"].append(p.rejected)
        rows["chosen_spans"].append([list(s) for s in p.chosen_spans])
        rows["rejected_spans"].append([list(s) for s in p.rejected_spans])
        rows["verdict"].append(p.verdict)
        rows["style"].append(p.style)
        rows["answer_type"].append(p.answer_type)
        rows["corrupted_image"].append(p.corrupted_image)
        if corrupt_root is not None:
            rows["corrupted_images"].append(
                [_image(Path(corrupt_root) / p.corrupted_image)] if p.corrupted_image else []
            )
    ds = datasets.Dataset.from_dict(
        rows, features=_features(conversational, corrupt_root is not None)
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ds.save_to_disk(str(out_dir))
    return ds
