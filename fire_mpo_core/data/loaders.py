"""Load real medical VQA / report datasets from a local folder into :class:`VQARecord`s.

One entry point for every format, with per-record rejects instead of crashes::

    from fire_mpo_core.data.loaders import load_dataset_records

    ds = load_dataset_records("slake", Path("data/Slake1.0"), "test")
    ds.records      # list[VQARecord]; image / mask paths relative to ds.root
    ds.rejects      # list[(record id, reason)]: missing image, empty answer, bad field, ...
    img = open_image(ds.root, ds.records[0].image)

Formats (``kind``) and the folder layouts they read (the datasets' own, unmodified):

* ``slake``: SLAKE 1.0. ``<root>/{train,validate,test}.json`` (``split`` "val" reads
  ``validate.json``); images ``<root>/imgs/xmlab<N>/source.jpg``; the lesion / organ mask
  ``imgs/xmlab<N>/mask.png`` is attached when present. English only by default (``lang``).
* ``vqarad``: VQA-RAD in the ``data_RAD`` layout. ``<root>/{trainset,testset}.json``, images in
  ``<root>/images/``; quirks (``"CLOSED "``, integer answers) are normalised by the converter.
* ``iuxray``: IU X-Ray in R2Gen's annotation format, ``<root>/annotation.json`` (or the only
  ``*annotation*.json`` of the folder, or ``annotation=``), images under ``<root>/images/``.
  ``XXXX`` de-identification tokens are removed from the answer (the raw report stays in
  ``reference``). The Open-i variant without a ``split`` key and with bare file names also reads.
* ``hf_disk``: a ``datasets`` dataset saved with ``save_to_disk`` (a ``DatasetDict`` with the
  split, or one ``Dataset``). Columns ``question``, ``answer``, ``image`` (an ``Image`` feature or a
  path relative to ``root``), optional ``id`` / ``qid``, ``answer_type``, ``question_type`` /
  ``content_type``, ``mask``. Embedded images are written to ``<export_dir>/images/`` (required
  then), which becomes ``ds.root``.
* ``jsonl``: plain JSONL, ``<root>/<split>.jsonl`` or ``<root>/data.jsonl`` filtered by its
  ``split`` field; each line a :class:`VQARecord` (``answer_type`` may be left out: yes/no answers
  are closed, others open; ``question_type`` defaults to "other").

Images are checked to exist inside ``root`` (``resolve_in_root`` refuses paths that escape it);
set ``check_images=False`` to keep records whose image files are not on this machine (e.g. to
judge text only).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from fire_mpo_core.data.converters import (
    iuxray_records,
    normalise_split,
    slake_records,
    vqarad_records,
)
from fire_mpo_core.data.io import ImageError, open_image, resolve_in_root
from fire_mpo_core.data.records import VQARecord

DatasetKind = Literal["slake", "vqarad", "iuxray", "hf_disk", "jsonl"]
KINDS: tuple[str, ...] = ("slake", "vqarad", "iuxray", "hf_disk", "jsonl")

_SLAKE_FILES = {"train": "train.json", "val": "validate.json", "test": "test.json"}
_VQARAD_FILES = {"train": "trainset.json", "test": "testset.json"}
# Open-i de-identification: "XXXX" runs, possibly with punctuation glued on ("XXXX-XXXX").
_DEID = re.compile(r"\bX{2,}\b(?:[-/]\bX{2,}\b)*")
_HF_SPLITS = {"train": ("train",), "val": ("validation", "validate", "val"), "test": ("test",)}


@dataclass
class LoadedDataset:
    """Records of one split, the rejects, and the folder their relative paths resolve in."""

    records: list[VQARecord]
    rejects: list[tuple[str, str]] = field(default_factory=list)
    root: Path = Path(".")


def strip_deid(text: str) -> str:
    """Remove ``XXXX`` de-identification tokens and the whitespace / stray punctuation left.

    >>> strip_deid("XXXX XXXX and lateral chest examination. Aortic XXXX appear normal.")
    'and lateral chest examination. Aortic appear normal.'
    """
    if not _DEID.search(text):
        return text
    out = _DEID.sub(" ", text)
    out = re.sub(r"\s+([.,;:])", r"\1", out)
    return " ".join(out.split()).strip(" ,;:")


def load_dataset_records(
    kind: DatasetKind,
    root: Path,
    split: str,
    *,
    lang: str | None = "en",
    annotation: str | None = None,
    export_dir: Path | None = None,
    check_images: bool = True,
    max_records: int | None = None,
    on_reject: Callable[[str, str], None] | None = None,
) -> LoadedDataset:
    """Load one split of a local dataset folder (formats: see the module docstring).

    Args:
        kind: ``slake``, ``vqarad``, ``iuxray``, ``hf_disk`` or ``jsonl``.
        root: the dataset folder.
        split: ``train``, ``val`` (``validate`` / ``validation``) or ``test``.
        lang: SLAKE question language kept (None: all).
        annotation: IU X-Ray annotation file name inside ``root`` (default: auto).
        export_dir: where ``hf_disk`` writes embedded images (becomes the returned ``root``).
        check_images: reject records whose image file is missing (default) or not.
        max_records: stop after this many accepted records.
        on_reject: also called with ``(id, reason)`` for each reject (e.g. a stage writer's).

    Returns:
        :class:`LoadedDataset` with records (ids ``<dataset>-<qid>``), rejects and the root.

    Raises:
        ValueError: an unknown kind / split, or a split the dataset does not have.
        FileNotFoundError: the split's annotation file is missing (a config error, not a record's).
    """
    root = Path(root)
    want = normalise_split(split)
    rejects: list[tuple[str, str]] = []

    def reject(rid: str, reason: str) -> None:
        rejects.append((rid, reason))
        if on_reject is not None:
            on_reject(rid, reason)

    if kind == "slake":
        path = _need(root, _SLAKE_FILES, want, "SLAKE")
        items = _json_list(path)
        recs = _convert(items, lambda it: slake_records([it], want, lang=lang), "slake", reject)
        recs = [_slake_paths(r, root) for r in recs]
        out_root = root
    elif kind == "vqarad":
        path = _need(root, _VQARAD_FILES, want, "VQA-RAD")
        recs = _convert(_json_list(path), lambda it: vqarad_records([it], want), "vqarad", reject)
        recs = [r.model_copy(update={"image": f"images/{r.image}"}) for r in recs]
        out_root = root
    elif kind == "iuxray":
        recs = _iuxray(root, want, annotation, reject)
        out_root = root
    elif kind == "hf_disk":
        recs, out_root = _hf_disk(root, want, export_dir, reject)
    elif kind == "jsonl":
        recs = _jsonl(root, want, reject)
        out_root = root
    else:
        raise ValueError(f"unknown dataset kind {kind!r}; known: {', '.join(KINDS)}")

    kept: list[VQARecord] = []
    for r in recs:
        if max_records is not None and len(kept) >= max_records:
            break
        reason = _check_paths(r, out_root, check_images)
        if reason:
            reject(r.id, reason)
        else:
            kept.append(r)
    return LoadedDataset(kept, rejects, out_root)


def _need(root: Path, files: Mapping[str, str], split: str, name: str) -> Path:
    if split not in files:
        raise ValueError(f"{name} has no {split!r} split; it has {sorted(files)}")
    path = root / files[split]
    if not path.is_file():
        raise FileNotFoundError(f"{name} annotation file not found: {path}")
    return path


def _json_list(path: Path) -> list[Any]:
    data = json.loads(path.read_text(encoding="utf-8-sig"))  # -sig: a BOM is not data
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of records, got {type(data).__name__}")
    return data


def _item_id(dataset: str, it: Any, index: int) -> str:
    if isinstance(it, Mapping):
        for k in ("qid", "id"):
            if it.get(k) is not None:
                return f"{dataset}-{it[k]}"
    return f"{dataset}-#{index}"


def _convert(
    items: Iterable[Any],
    convert: Callable[[Any], list[VQARecord]],
    dataset: str,
    reject: Callable[[str, str], None],
) -> list[VQARecord]:
    """Run a judge converter one item at a time, so a bad item is one reject."""
    out = []
    for i, it in enumerate(items):
        rid = _item_id(dataset, it, i)
        if not isinstance(it, Mapping):
            reject(rid, f"not a JSON object: {type(it).__name__}")
            continue
        try:
            got = convert(it)
        except KeyError as e:
            reject(rid, f"missing field {e.args[0]!r}")
            continue
        except (ValueError, TypeError) as e:  # pydantic's ValidationError is a ValueError
            reject(rid, f"invalid record: {_one_line(e)}")
            continue
        if not got:
            # Converters skip silently; a record of the wanted language with no answer is a
            # data fault worth reporting (other languages are a filter, not a fault).
            wanted = dataset != "slake" or it.get("q_lang") in (None, "en")
            if wanted and not str(it.get("answer", "")).strip():
                reject(rid, "empty answer")
            continue
        out.extend(got)
    return out


def _slake_paths(r: VQARecord, root: Path) -> VQARecord:
    image = f"imgs/{r.image}"
    mask = f"{image.rsplit('/', 1)[0]}/mask.png"
    try:
        has_mask = resolve_in_root(root, mask).is_file()
    except ValueError:
        has_mask = False
    return r.model_copy(update={"image": image, "mask": mask if has_mask else None})


def _find_annotation(root: Path, annotation: str | None) -> Path:
    if annotation is not None:
        return resolve_in_root(root, annotation)
    if (root / "annotation.json").is_file():
        return root / "annotation.json"
    found = sorted(p for p in root.glob("*annotation*.json") if p.is_file())
    if len(found) != 1:
        raise FileNotFoundError(
            f"IU X-Ray: no annotation.json in {root} and {len(found)} *annotation*.json files; "
            "pass annotation="
        )
    return found[0]


def _iuxray(
    root: Path, split: str, annotation: str | None, reject: Callable[[str, str], None]
) -> list[VQARecord]:
    path = _find_annotation(root, annotation)
    data = json.loads(path.read_text(encoding="utf-8-sig"))
    if not isinstance(data, Mapping):
        raise ValueError(f"{path}: expected R2Gen's {{split: [records]}} mapping")
    out = []
    for split_name, items in data.items():
        try:
            if normalise_split(split_name) != split:
                continue
        except ValueError:
            continue  # a key that is not a split (metadata)
        for i, it in enumerate(items):
            rid = _item_id("iuxray", it, i)
            try:
                got = iuxray_records({split_name: [it]})
            except (KeyError, ValueError, TypeError) as e:
                reject(rid, f"invalid record: {_one_line(e)}")
                continue
            if not got:
                reject(rid, "empty report or no image path")
                continue
            r = got[0]
            clean = strip_deid(r.answer)
            if not clean:
                reject(rid, "report is only de-identification tokens")
                continue
            out.append(
                r.model_copy(
                    update={
                        "image": f"images/{r.image}",
                        "answer": clean,
                        "reference": r.answer if clean != r.answer else None,
                    }
                )
            )
    return out


def _closed_or_open(answer: str) -> str:
    return "closed" if answer.strip().lower().rstrip(".") in ("yes", "no") else "open"


def _row_record(row: Mapping[str, Any], rid: str, split: str, dataset: str) -> VQARecord:
    answer = str(row.get("answer", "")).strip()
    at = row.get("answer_type")
    return VQARecord(
        id=rid,
        image=str(row.get("image", "")),
        mask=row.get("mask") or None,
        question=str(row.get("question", "")).strip(),
        answer=answer,
        reference=row.get("reference"),
        answer_type=str(at).strip().lower() if at else _closed_or_open(answer),
        question_type=str(row.get("question_type") or row.get("content_type") or "other"),
        split=split,
        modality=row.get("modality"),
        dataset=str(row.get("dataset") or dataset),
    )


def _jsonl(root: Path, split: str, reject: Callable[[str, str], None]) -> list[VQARecord]:
    per_split = root / f"{split}.jsonl"
    path = per_split if per_split.is_file() else root / "data.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"JSONL dataset: neither {per_split} nor {root / 'data.jsonl'}")
    out = []
    # utf-8-sig: a byte order mark (Windows editors, spreadsheet exports) cost the first record.
    with path.open(encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            rid = f"{path.name}:{lineno}"
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError(f"not a JSON object: {type(row).__name__}")
                rid = str(row.get("id") or rid)
                if path == per_split:
                    row.setdefault("split", split)
                if normalise_split(str(row.get("split", ""))) != split:
                    continue
                answer = str(row.get("answer", ""))
                row = {"answer_type": _closed_or_open(answer), "question_type": "other", **row}
                out.append(VQARecord.model_validate({**row, "id": rid, "split": split}))
            except (ValueError, ValidationError) as e:
                reject(rid, f"invalid record: {_one_line(e)}")
    return out


def _hf_disk(
    root: Path, split: str, export_dir: Path | None, reject: Callable[[str, str], None]
) -> tuple[list[VQARecord], Path]:
    import datasets  # heavy; only for this format

    loaded = datasets.load_from_disk(str(root))
    if isinstance(loaded, datasets.DatasetDict):
        name = next((n for n in _HF_SPLITS[split] if n in loaded), None)
        if name is None:
            raise ValueError(f"saved dataset {root} has splits {sorted(loaded)}, none is {split!r}")
        ds = loaded[name]
    else:
        ds = loaded
    missing = {"question", "answer", "image"} - set(ds.column_names)
    if missing:
        raise ValueError(f"saved dataset {root} lacks column(s) {sorted(missing)}")
    embedded = isinstance(ds.features["image"], datasets.Image)
    out_root = root
    if embedded:
        if export_dir is None:
            raise ValueError("hf_disk with embedded images needs export_dir to write them to")
        out_root = Path(export_dir)
        (out_root / "images").mkdir(parents=True, exist_ok=True)
        ds = ds.cast_column("image", datasets.Image(decode=False))
    out = []
    for i, row in enumerate(ds):
        rid = _item_id("hf", row, i)
        try:
            if embedded:
                row = dict(row, image=_export_image(row["image"], out_root, rid))
            out.append(_row_record(row, rid, split, "hf"))
        except (ValueError, OSError, ValidationError) as e:
            reject(rid, f"invalid record: {_one_line(e)}")
    return out, out_root


def _export_image(cell: Mapping[str, Any] | None, out_root: Path, rid: str) -> str:
    """Write an embedded image cell ({bytes, path}) as ``images/<id>.<ext>``, return its path."""
    if not cell or not cell.get("bytes"):
        raise ValueError("no image bytes")
    ext = Path(str(cell.get("path") or "")).suffix.lower() or ".png"
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", rid)
    rel = f"images/{safe}{ext}"
    (out_root / rel).write_bytes(cell["bytes"])
    return rel


def _check_paths(r: VQARecord, root: Path, check_images: bool) -> str | None:
    for what, rel in (("image", r.image), ("mask", r.mask)):
        if rel is None:
            continue
        try:
            p = resolve_in_root(root, rel)
        except ValueError as e:
            return str(e)
        if not check_images:
            continue
        if not p.is_file():
            hint = ""
            if "\\" in rel:  # a path written on Windows: the separator is part of the name here
                fixed = rel.replace("\\", "/")
                there = " (that file exists)" if (Path(root) / fixed).is_file() else ""
                hint = f"; it has Windows-style backslashes: write it as {fixed!r}{there}"
            return f"{what} file not found: {rel}{hint}"
        if what == "image":  # an empty or broken image: caught here, not in every later stage
            try:
                open_image(root, rel)
            except ImageError as e:
                return str(e)
    return None


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= 300 else text[:297] + "..."
