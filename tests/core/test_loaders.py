"""Dataset loaders on the real records of ../shared/realdata (SLAKE, VQA-RAD, IU X-Ray), plus
HF-datasets-on-disk and JSONL folders built from them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fire_mpo_core.corruption import load_mask
from fire_mpo_core.data.io import open_image, resolve_in_root
from fire_mpo_core.data.loaders import load_dataset_records, strip_deid


def test_slake_english_split_without_images_is_all_rejects(realdata):
    items = json.loads((realdata / "slake" / "test.json").read_text())
    english = [it for it in items if it["q_lang"] == "en" and str(it["answer"]).strip()]
    ds = load_dataset_records("slake", realdata / "slake", "test")
    # The sample ships no images: every English record is a per-record reject, no crash.
    assert ds.records == [] and len(ds.rejects) == len(english) == 1061
    rid, reason = ds.rejects[0]
    assert rid == f"slake-{english[0]['qid']}"
    assert reason == f"image file not found: imgs/{english[0]['img_name']}"

    seen: list[tuple[str, str]] = []
    text_only = load_dataset_records(
        "slake", realdata / "slake", "val", check_images=False, on_reject=lambda *a: seen.append(a)
    )
    assert not seen and {r.split for r in text_only.records} == {"val"}  # validate.json
    assert {r.answer_type for r in text_only.records} == {"open", "closed"}  # "OPEN" / "CLOSED"
    assert all(r.image.startswith("imgs/xmlab") and r.dataset == "slake" for r in text_only.records)
    every_lang = load_dataset_records(
        "slake", realdata / "slake", "val", lang=None, check_images=False
    )
    assert len(every_lang.records) > len(text_only.records)


def test_slake_with_an_image_and_mask_attached(realdata, tmp_path):
    root = tmp_path / "Slake1.0"
    root.mkdir()
    shutil.copy(realdata / "slake" / "test.json", root / "test.json")
    items = json.loads((root / "test.json").read_text())
    first = next(it for it in items if it["q_lang"] == "en")
    folder = root / "imgs" / Path(first["img_name"]).parent
    folder.mkdir(parents=True)
    # A real scan and its real lesion mask (BUSI) stand in for the SLAKE files.
    Image.open(realdata / "lesions/busi/images/benign (2).png").convert("RGB").save(
        folder / "source.jpg"
    )
    shutil.copy(realdata / "lesions/busi/masks/benign (2)_mask.png", folder / "mask.png")
    ds = load_dataset_records("slake", root, "test")
    same_image = [
        it for it in items if it["q_lang"] == "en" and it["img_name"] == first["img_name"]
    ]
    assert len(ds.records) == len(same_image) and len(ds.rejects) == 1061 - len(same_image)
    r = ds.records[0]
    assert r.mask == f"{folder.relative_to(root)}/mask.png"
    assert open_image(ds.root, r.image).size == (557, 473)
    assert load_mask(resolve_in_root(ds.root, r.mask)).any()


def test_vqarad_quirks_and_missing_images(realdata):
    ds = load_dataset_records("vqarad", realdata / "vqarad", "test")
    items = json.loads((realdata / "vqarad" / "testset.json").read_text())
    have = {p.name for p in (realdata / "vqarad" / "images").iterdir()}
    assert len(ds.records) == sum(it["image_name"] in have for it in items) == 129
    assert len(ds.records) + len(ds.rejects) == len(items) == 451
    assert all(reason.startswith("image file not found") for _, reason in ds.rejects)
    for r in ds.records:
        assert open_image(ds.root, r.image).mode == "RGB"

    train = load_dataset_records("vqarad", realdata / "vqarad", "train", check_images=False)
    by_id = {r.id: r for r in train.records}
    assert by_id["vqarad-2392"].answer == "4"  # an integer answer in the JSON
    assert by_id["vqarad-3371"].answer_type == "closed"  # "CLOSED " with a trailing space
    assert len(train.records) == 3064
    with pytest.raises(ValueError, match="no 'val' split"):
        load_dataset_records("vqarad", realdata / "vqarad", "val")


def test_iuxray_r2gen_and_deidentified_variant(realdata, tmp_path):
    ds = load_dataset_records(
        "iuxray",
        realdata / "iuxray",
        "test",
        annotation="r2gen_iu_xray_annotation_sample.json",
        check_images=False,
    )
    assert len(ds.records) == 50 and all(r.answer_type == "report" for r in ds.records)
    assert ds.records[0].image == "images/CXR3030_IM-1405/0.png"
    # Without images on disk, every study is a reject.
    missing = load_dataset_records(
        "iuxray", realdata / "iuxray", "test", annotation="r2gen_iu_xray_annotation_sample.json"
    )
    assert missing.records == [] and len(missing.rejects) == 50

    raw = json.loads((realdata / "iuxray" / "mrg_rl_iu_xray_annotation_sample.json").read_text())
    # One *annotation*.json in the folder: found without naming it.
    (tmp_path / "mrg_annotation.json").write_text(json.dumps(raw))
    mrg = load_dataset_records("iuxray", tmp_path, "train", check_images=False)
    assert len(mrg.records) == len(raw["train"]) == 60
    assert not any("XXXX" in r.answer for r in mrg.records)
    assert sum("XXXX" in (r.reference or "") for r in mrg.records) == sum(
        "XXXX" in it["report"] for it in raw["train"]
    )
    assert strip_deid("XXXX XXXX and lateral chest examination. Aortic XXXX appear normal.") == (
        "and lateral chest examination. Aortic appear normal."
    )
    assert strip_deid("No change. .") == "No change. ."  # untouched without XXXX


def test_hf_dataset_saved_to_disk(realdata, tmp_path):
    datasets = pytest.importorskip("datasets")
    items = json.loads((realdata / "vqarad" / "testset.json").read_text())
    have = {p.name for p in (realdata / "vqarad" / "images").iterdir()}
    rows = [it for it in items if it["image_name"] in have][:4]
    data = {
        "qid": [it["qid"] for it in rows] + [999],
        "question": [it["question"] for it in rows] + ["Is there a mass?"],
        "answer": [str(it["answer"]) for it in rows] + ["yes"],
        "image": [str(realdata / "vqarad" / "images" / it["image_name"]) for it in rows] + [None],
    }
    ds = datasets.Dataset.from_dict(data).cast_column("image", datasets.Image())
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "hf"))
    with pytest.raises(ValueError, match="export_dir"):
        load_dataset_records("hf_disk", tmp_path / "hf", "test")
    got = load_dataset_records("hf_disk", tmp_path / "hf", "test", export_dir=tmp_path / "out")
    assert [r.id for r in got.records] == [f"hf-{it['qid']}" for it in rows]
    assert got.rejects == [("hf-999", "invalid record: no image bytes")]
    assert got.root == tmp_path / "out"
    for r, it in zip(got.records, rows):
        assert r.answer_type == ("closed" if str(it["answer"]).lower() in ("yes", "no") else "open")
        original = np.asarray(Image.open(realdata / "vqarad" / "images" / it["image_name"]))
        exported = np.asarray(Image.open(resolve_in_root(got.root, r.image)))
        assert np.array_equal(original, exported)  # the embedded bytes, written back unchanged


def test_jsonl_folder_rejects_bad_lines(realdata, tmp_path):
    shutil.copytree(realdata / "vqarad" / "images", tmp_path / "images")
    name = sorted(p.name for p in (tmp_path / "images").iterdir())[0]
    lines = [
        {"id": "ok-1", "image": f"images/{name}", "question": "Is this a CT?", "answer": "no"},
        {"id": "ok-2", "image": f"images/{name}", "question": "Which organ?", "answer": "chest",
         "question_type": "organ"},
        {"id": "bad-type", "image": f"images/{name}", "question": "q", "answer": "a",
         "answer_type": "maybe"},
        {"id": "escape", "image": "../../etc/passwd", "question": "q", "answer": "a"},
        {"id": "gone", "image": "images/missing.jpg", "question": "q", "answer": "a"},
    ]  # fmt: skip
    (tmp_path / "test.jsonl").write_text(
        "".join(json.dumps(x) + "\n" for x in lines) + "not json\n"
    )
    ds = load_dataset_records("jsonl", tmp_path, "test")
    assert [(r.id, r.answer_type, r.question_type) for r in ds.records] == [
        ("ok-1", "closed", "other"),
        ("ok-2", "open", "organ"),
    ]
    reasons = dict(ds.rejects)
    assert set(reasons) == {"bad-type", "escape", "gone", "test.jsonl:6"}
    assert "answer_type" in reasons["bad-type"] and "escapes" in reasons["escape"]
    assert reasons["gone"] == "image file not found: images/missing.jpg"
    with pytest.raises(ValueError, match="unknown dataset kind"):
        load_dataset_records("coco", tmp_path, "test")  # type: ignore[arg-type]
