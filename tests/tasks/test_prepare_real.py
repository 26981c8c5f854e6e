"""`prepare` on real dataset folders (../shared/realdata): the store contract SynthLesion follows.

VQA-RAD here has 30 real test images and none for train, so most records are per-record rejects
(missing image) and the 30 images' questions are kept; the flow test builds a two-split JSONL
dataset from those real images and runs `prepare` (tiny model included) through Prefect.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from fire_mpo_core.config import ConfigError, DataConfig, load_config
from fire_mpo_core.data.io import load_records, open_image
from fire_mpo_core.data.prepare_real import prepare_real_dataset
from fire_mpo_core.store import read_manifest


def test_vqarad_keeps_records_with_images_and_rejects_the_rest(realdata, tmp_path):
    rejects: list[tuple[str, str]] = []
    cfg = DataConfig(dataset="vqarad", path=realdata / "vqarad")
    counts = prepare_real_dataset(cfg, tmp_path, on_reject=lambda i, r: rejects.append((i, r)))
    have = {p.name for p in (realdata / "vqarad" / "images").iterdir()}
    total, kept = 0, 0
    for split, name in (("train", "trainset.json"), ("test", "testset.json")):
        items = json.loads((realdata / "vqarad" / name).read_text())
        expected = sum(it["image_name"] in have for it in items)
        assert counts[split] == expected > 0
        total, kept = total + len(items), kept + expected
    assert counts["splits_missing"] == 1  # VQA-RAD has no val split
    records = load_records(tmp_path)
    assert len(records) == kept == counts["records"]
    # Every kept image is inside the stage folder and decodes; quirks are normalised.
    for r in records:
        assert r.image.startswith("raw/images/") and open_image(tmp_path, r.image).size[0] > 0
        assert r.answer_type in ("closed", "open")
    assert counts["images"] == len(have)
    # Nothing silently dropped: every other record is a reject naming its id and the image.
    assert len(rejects) == total - kept
    assert all(i.startswith("vqarad-") and "image" in why for i, why in rejects)


def test_real_dataset_config_needs_a_path(tmp_path):
    with pytest.raises(ConfigError, match=r"data\.path is required"):
        load_config(None, {"data.dataset": "slake"})
    with pytest.raises(ConfigError, match=r"data\.dataset"):
        load_config(None, {"data.dataset": "mimic"})


def test_prepare_stage_on_a_real_jsonl_dataset(prefect_harness, realdata, tmp_path):
    from flows.full_cycle import fire_mpo
    from testing_support.flow_runs import SMALL

    test = json.loads((realdata / "vqarad" / "testset.json").read_text())
    have = {p.name for p in (realdata / "vqarad" / "images").iterdir()}
    rows = [it for it in test if it["image_name"] in have]
    ds = tmp_path / "ds"
    (ds / "img").mkdir(parents=True)
    lines = []
    for i, it in enumerate(rows):
        name = it["image_name"]
        (ds / "img" / name).write_bytes((realdata / "vqarad" / "images" / name).read_bytes())
        split = "train" if i % 3 else "test"
        lines.append(
            {
                "id": f"q{it['qid']}",
                "split": split,
                "image": f"img/{name}",
                "question": it["question"],
                "answer": str(it["answer"]),
            }
        )
    lines.append(
        {
            "id": "broken",
            "split": "train",
            "image": "img/nope.jpg",
            "question": "q?",
            "answer": "yes",
        }
    )
    (ds / "data.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    cfg = {**SMALL, "store": str(tmp_path / "store"), "data": {"dataset": "jsonl", "path": str(ds)}}
    path = tmp_path / "real.yaml"
    path.write_text(yaml.safe_dump(cfg))
    fire_mpo(config=str(path), stages=["prepare"])
    (out,) = (tmp_path / "store" / "t" / "round-0" / "prepare").glob("[!.]*")
    m = read_manifest(out)
    assert m["counts"]["records"] == len(rows) and m["counts"]["rejects"] == 1
    assert (out / "model" / "model.safetensors").is_file()  # tokenizer from the real texts
    rejects = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rejects] == ["jsonl-broken"] or rejects[0]["id"].endswith("broken")
    # An edited dataset file gives prepare a new key (the fingerprint is part of it).
    (ds / "data.jsonl").write_text((ds / "data.jsonl").read_text().replace("q?", "q2?"))
    fire_mpo(config=str(path), stages=["prepare"])
    assert len(list((tmp_path / "store" / "t" / "round-0" / "prepare").glob("[!.]*"))) == 2
    assert Path(out).is_dir()


def test_jsonl_bom_empty_images_backslashes_and_one_reject_per_record(tmp_path):
    """What a hand-made dataset folder brings: a BOM, a 0-byte or broken image, a Windows path,
    a line that is not JSON. Each bad record is one reject, written once, in `prepare`."""
    from PIL import Image

    ds = tmp_path / "ds"
    (ds / "img").mkdir(parents=True)
    Image.new("RGB", (16, 16), (40, 80, 120)).save(ds / "img" / "ok.png")
    (ds / "img" / "empty.png").write_bytes(b"")
    (ds / "img" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    rows = [
        {"id": "first", "split": "train", "image": "img/ok.png", "question": "q?", "answer": "yes"},
        {"id": "t1", "split": "test", "image": "img/ok.png", "question": "q?", "answer": "no"},
        {"id": "zero", "split": "train", "image": "img/empty.png", "question": "q?", "answer": "a"},
        {"id": "bad", "split": "test", "image": "img/broken.png", "question": "q?", "answer": "a"},
        {"id": "win", "split": "train", "image": "img\\ok.png", "question": "q?", "answer": "a"},
    ]
    text = "\n".join(json.dumps(r) for r in rows) + "\n{not json\n"
    (ds / "data.jsonl").write_bytes(b"\xef\xbb\xbf" + text.encode())  # as Notepad saves it
    rejects: list[tuple[str, str]] = []
    cfg = DataConfig(dataset="jsonl", path=ds)
    counts = prepare_real_dataset(
        cfg, tmp_path / "out", on_reject=lambda i, r: rejects.append((i, r))
    )
    assert counts["train"] == 1 and counts["test"] == 1  # the BOM did not cost record "first"
    by_id = dict(rejects)
    assert sorted(by_id) == ["bad", "data.jsonl:6", "win", "zero"]
    assert len(rejects) == len(by_id)  # the bad line is in every split's pass, written once
    assert "empty (0 bytes)" in by_id["zero"]
    assert "cannot be decoded" in by_id["bad"]
    assert (
        "Windows-style backslashes" in by_id["win"]
        and "'img/ok.png' (that file exists)" in by_id["win"]
    )


def _folder_with_missing_images(root: Path, n_ok: int, n_missing: int) -> Path:
    from PIL import Image

    (root / "img").mkdir(parents=True)
    rows = []
    for i in range(n_ok + n_missing):
        if i < n_ok:
            Image.new("RGB", (16, 16), (i * 9 % 255, 60, 90)).save(root / "img" / f"{i}.png")
        split = "test" if i % 4 == 0 else "train"
        rows.append(
            {
                "id": f"r{i}",
                "split": split,
                "image": f"img/{i}.png",
                "question": "q?",
                "answer": "yes",
            }
        )
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def test_real_dataset_reject_budget_and_warning(prefect_harness, tmp_path):
    """Most images missing fails `prepare` with the reasons and first ids; a few rejects pass
    with one warning line that counts them."""
    import logging

    class Keep(logging.Handler):
        def __init__(self) -> None:
            super().__init__(logging.INFO)
            self.lines: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.lines.append(record.getMessage())

    keep = Keep()  # Prefect's run loggers (its console handler may write to another stream)
    for name in ("prefect.task_runs", "prefect.flow_runs"):
        logging.getLogger(name).addHandler(keep)
    from fire_mpo_core.store import TooManyRejects
    from flows.full_cycle import fire_mpo
    from testing_support.flow_runs import SMALL

    def config(ds: Path, name: str) -> str:
        cfg = {
            **SMALL,
            "store": str(tmp_path / name),
            "data": {"dataset": "jsonl", "path": str(ds)},
        }
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        return str(path)

    mostly_missing = _folder_with_missing_images(tmp_path / "bad", n_ok=3, n_missing=21)
    with pytest.raises(TooManyRejects) as e:
        fire_mpo(config=config(mostly_missing, "s1"), stages=["prepare"])
    msg = str(e.value)
    assert "21 of 24 records rejected (87.5% > max_reject_fraction 50.0%)" in msg
    assert "21 x image file not found" in msg and "first ids: r3, r5, r6" in msg
    assert not [ln for ln in keep.lines if "Retry" in ln]  # same data, same failure: no retry

    few_missing = _folder_with_missing_images(tmp_path / "ok", n_ok=20, n_missing=2)
    keep.lines.clear()
    fire_mpo(config=config(few_missing, "s2"), stages=["prepare"])
    for name in ("prefect.task_runs", "prefect.flow_runs"):
        logging.getLogger(name).removeHandler(keep)
    lines = [ln for ln in keep.lines if "records rejected" in ln]
    assert len(lines) == 1 and lines[0].startswith("prepare-r0: 2 of 22 records rejected (9%)")
    assert "2 x image file not found" in lines[0]
