"""Convert public medical VQA / report annotations into :class:`VQARecord`s for judging.

The rules judge needs a record's answer, answer type and question type; these converters read
the datasets' original JSON layouts (as parsed lists / dicts) and keep their quirks in check:

* SLAKE (``train.json`` / ``validate.json`` / ``test.json``): keys ``qid, img_name, question,
  answer, q_lang, answer_type, content_type, modality``; only ``q_lang == "en"`` is kept by
  default; ``content_type`` (Organ, Position, Abnormality, ...) is the question type.
* VQA-RAD (``data_RAD`` layout, ``trainset.json`` / ``testset.json``): keys ``qid, image_name,
  answer, answer_type, question_type, question``; ``answer_type`` may carry a trailing space
  (``"CLOSED "``) and ``answer`` may be an integer (``4``): both are normalised.
* IU X-Ray (R2Gen's annotation: ``{"train": [{"id", "report", "image_path", "split"}], ...}``):
  one ``report`` record per study, the first view as its image.

Usage::

    recs = slake_records(json.load(open("slake/test.json")), split="test")
    recs = vqarad_records(json.load(open("vqarad/testset.json")), split="test")
    recs = iuxray_records(json.load(open("iuxray/r2gen_iu_xray_annotation_sample.json")))
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from fire_mpo_core.data.records import Split, VQARecord

_SPLITS: dict[str, Split] = {
    "train": "train", "validate": "val", "validation": "val", "val": "val", "test": "test",
}  # fmt: skip
REPORT_QUESTION = "Describe the findings in this chest X-ray."


def normalise_split(name: str) -> Split:
    try:
        return _SPLITS[name.strip().lower()]
    except KeyError:
        raise ValueError(f"unknown split {name!r}; known: {sorted(_SPLITS)}") from None


def _answer_type(raw: Any) -> str:
    at = str(raw).strip().lower()
    if at not in {"closed", "open"}:
        raise ValueError(f"unknown answer_type {raw!r}")
    return at


def slake_records(
    items: Iterable[Mapping[str, Any]], split: str, *, lang: str | None = "en"
) -> list[VQARecord]:
    """SLAKE question records (one language by default); empty answers are skipped."""
    out = []
    for it in items:
        if lang is not None and it.get("q_lang") != lang:
            continue
        answer = str(it["answer"]).strip()
        if not answer:
            continue
        out.append(
            VQARecord(
                id=f"slake-{it['qid']}",
                image=str(it["img_name"]),
                question=str(it["question"]).strip(),
                answer=answer,
                answer_type=_answer_type(it["answer_type"]),
                question_type=str(it.get("content_type") or "other"),
                split=normalise_split(split),
                modality=it.get("modality"),
                dataset="slake",
            )
        )
    return out


def vqarad_records(items: Iterable[Mapping[str, Any]], split: str) -> list[VQARecord]:
    """VQA-RAD question records; ``"CLOSED "`` and integer answers are normalised."""
    out = []
    for it in items:
        answer = str(it["answer"]).strip()
        if not answer:
            continue
        out.append(
            VQARecord(
                id=f"vqarad-{it['qid']}",
                image=str(it["image_name"]),
                question=str(it["question"]).strip(),
                answer=answer,
                answer_type=_answer_type(it["answer_type"]),
                question_type=str(it.get("question_type") or "other"),
                split=normalise_split(split),
                dataset="vqarad",
            )
        )
    return out


def iuxray_records(annotation: Mapping[str, Iterable[Mapping[str, Any]]]) -> list[VQARecord]:
    """IU X-Ray report records from R2Gen's annotation dict (all splits in it)."""
    out = []
    for split, items in annotation.items():
        for it in items:
            report = " ".join(str(it["report"]).split())
            paths = it.get("image_path") or []
            if not report or not paths:
                continue
            out.append(
                VQARecord(
                    id=f"iuxray-{it['id']}",
                    image=str(paths[0]),
                    question=REPORT_QUESTION,
                    answer=report,
                    answer_type="report",
                    question_type="report",
                    split=normalise_split(split),
                    modality="x-ray",
                    dataset="iuxray",
                )
            )
    return out
