"""Bad inputs (issue #7, item 2): each kind is a clear per-record reject (id + reason) or a clear
error naming the file and field; never a crash of the whole stage, never a silent drop.

The stage-level tests run the real stage bodies (`tasks.sample.body`, `tasks.judge.body`,
`tasks.corrupt.body`) inside ``ArtifactStore.run_stage`` on a small dataset folder holding good
records plus one bad one, and check that every input id ends up either in the output or in
``rejects.jsonl``. The OpenAI endpoints are the fake server of
``testing_support/fake_openai.py`` (real HTTP on 127.0.0.1); the dashboard's progress calls
(Prefect API) are no-ops.

    .venv/bin/python -m pytest tests/tasks/test_reliability_inputs.py -q
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fire_mpo_core.config import ConfigError, load_config
from fire_mpo_core.corruption.masks import mask_from_source
from fire_mpo_core.data.io import MAX_IMAGE_PIXELS, ImageError, load_records, open_image
from fire_mpo_core.data.records import MAX_TEXT_CHARS
from fire_mpo_core.store import TooManyRejects, read_jsonl
from tasks import corrupt as corrupt_task
from tasks import judge as judge_task
from tasks import sample as sample_task
from testing_support.fake_openai import ok
from testing_support.stage_inputs import (
    GOOD,
    GOOD_REPLY,
    RESPONSE,
    dataset,
    finished,
    png,
    record,
    run_body,
)
from testing_support.stage_inputs import judge_reply as _reply
from testing_support.stage_inputs import record_line as _line

KEY_ENV = "FIRE_MPO_TEST_INPUTS_KEY"


# --------------------------------------------------------------------------- file makers


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb's header)."""
    raw = png((1, 1), "L")
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    new = struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))
    return raw[:8] + new + raw[8 + 25 :]


def png16(values: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(values.astype(np.uint16)).save(buf, format="PNG")
    return buf.getvalue()


def cmyk_jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def palette_png() -> bytes:
    im = Image.new("P", (4, 4))
    im.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    im.putpixel((0, 0), 1)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


# --------------------------------------------------------------------------- stage plumbing


@pytest.fixture
def fake(monkeypatch, fake_openai):
    monkeypatch.setenv(KEY_ENV, "sk-inputs-0123456789")
    return fake_openai


pytestmark = pytest.mark.usefixtures("no_progress_bars")


def outcome(path: Path, id_field: str = "record_id") -> tuple[set[str], dict[str, str]]:
    done = {json.loads(x)[id_field] for x in (path / "data.jsonl").read_text().splitlines()}
    rejects = {}
    for x in (path / "rejects.jsonl").read_text().splitlines():
        r = json.loads(x)
        rejects[r["id"]] = r["reason"]
    return done, rejects


def sample_stage(store, fake, prep: Path, **kw):
    policy = finished(store, "policy", lambda p: (p / "policy.json").write_text("{}"))
    cfg = {
        "sample": {
            "engine": "openai",
            "openai": {
                "base_urls": [fake.base_url],
                "model": "m",
                "api_key_env": KEY_ENV,
                "max_retries": 0,
                "timeout_s": 5,
            },
        },
        **kw,
    }
    return run_body(store, "sample", sample_task.body, cfg, {"prepare": prep, "policy": policy})


# --------------------------------------------------------------------------- records & images

# kind -> (the bad record line, extra files, the reject id, a substring of the reason)
Kind = tuple[bytes, dict[str, bytes], str, str]


def _bad_image(data: bytes) -> Callable[[Path], Kind]:
    return lambda tmp: (_line("bad"), {"images/bad.png": data}, "bad", "")


RECORD_KINDS: dict[str, Callable[[Path], Kind]] = {
    "duplicate_id": lambda tmp: (
        _line("good-0", question="Again?"),
        {},
        "good-0",
        "duplicate id",
    ),
    "empty_question": lambda tmp: (_line("bad", question=""), {}, "bad", "question"),
    "whitespace_answer": lambda tmp: (
        _line("bad", answer="   "),
        {},
        "bad",
        "only whitespace",
    ),
    "nul_in_text": lambda tmp: (_line("bad", question="Is\x00there?"), {}, "bad", "control"),
    "non_utf8": lambda tmp: (b'{"id": "bad", "question": "\xff\xfe"}', {}, "data.jsonl:3", "utf"),
    "megabyte_text": lambda tmp: (_line("bad", answer="a" * 1_000_000), {}, "bad", "at most"),
    "unknown_answer_type": lambda tmp: (
        _line("bad", answer_type="essay"),
        {},
        "bad",
        "answer_type",
    ),
    "missing_field": lambda tmp: (
        json.dumps({k: v for k, v in record("bad").items() if k != "question"}).encode(),
        {},
        "bad",
        "question: Field required",
    ),
    "extra_field": lambda tmp: (_line("bad", diagnosis="x"), {}, "bad", "diagnosis"),
    "not_json": lambda tmp: (b'{"id": "bad", "question": ', {}, "data.jsonl:3", "JSONDecodeError"),
    "not_an_object": lambda tmp: (b'["bad", "record"]', {}, "data.jsonl:3", "<record>"),
    "id_with_newline": lambda tmp: (_line("bad\nid"), {}, "bad\nid", "printable"),
    "missing_image": lambda tmp: (_line("bad"), {}, "bad", "file not found"),
    "zero_byte_image": lambda tmp: (_line("bad"), {"images/bad.png": b""}, "bad", "empty"),
    "truncated_image": lambda tmp: (
        _line("bad"),
        {"images/bad.png": png((64, 64))[:300]},
        "bad",
        "cannot be decoded",
    ),
    "corrupt_image": lambda tmp: (
        _line("bad"),
        {"images/bad.png": png()[:16] + bytes(range(256)) * 4},
        "bad",
        "cannot be decoded",
    ),
    "text_as_image": lambda tmp: (
        _line("bad"),
        {"images/bad.png": b"not an image"},
        "bad",
        "cannot be decoded",
    ),
    "decompression_bomb": lambda tmp: (
        _line("bad"),
        {"images/bad.png": png_claiming(20_000, 20_000)},
        "bad",
        "decompression bomb",
    ),
    "path_dotdot": lambda tmp: (_line("bad", image="../outside.png"), {}, "bad", "escapes"),
    "path_absolute": lambda tmp: (
        _line("bad", image=str(tmp / "outside.png")),
        {},
        "bad",
        "escapes",
    ),
    "path_symlink": lambda tmp: (_line("bad", image="images/link.png"), {}, "bad", "escapes"),
}


@pytest.mark.parametrize("kind", sorted(RECORD_KINDS))
def test_sample_stage_rejects_a_bad_record_and_keeps_the_rest(store, fake, tmp_path, kind):
    (tmp_path / "outside.png").write_bytes(png())
    line, files, rid, why = RECORD_KINDS[kind](tmp_path)
    prep = dataset(store, [line], files)
    if kind == "path_symlink":
        (prep / "images" / "link.png").symlink_to(tmp_path / "outside.png")
    if kind == "path_dotdot":
        (prep.parent / "outside.png").write_bytes(png())  # exists, but outside the root
    res = sample_stage(store, fake, prep)
    done, rejects = outcome(res.path)
    assert done == set(GOOD)  # the good records went through
    assert list(rejects) == [rid], rejects  # the bad one is rejected under its id ...
    assert why.lower() in rejects[rid].lower(), rejects[rid]  # ... with the reason
    assert res.manifest["counts"]["rejects"] == 1


@pytest.mark.parametrize(
    ("kind", "data", "check"),
    [
        ("png_16bit", png16(np.array([[0, 1000], [3000, 4000]])), lambda a: a[1, 1, 0] == 255),
        ("palette_png", palette_png(), lambda a: tuple(a[0, 0]) == (0, 0, 255)),
        ("cmyk_jpeg", cmyk_jpeg(), lambda a: a[..., 0].mean() > 200 and a[..., 1].mean() < 60),
        ("rgba_png", png(mode="RGBA"), lambda a: a.shape[2] == 3),
        ("grey_png", png(mode="L"), lambda a: a.shape[2] == 3),
    ],
)
def test_unusual_but_valid_images_are_converted_and_sampled(store, fake, kind, data, check):
    prep = dataset(store, [_line("odd")], {"images/odd.png": data})
    arr = np.asarray(open_image(prep, "images/odd.png"))
    assert arr.dtype == np.uint8 and arr.ndim == 3 and arr.shape[2] == 3 and check(arr)
    done, rejects = outcome(sample_stage(store, fake, prep).path)
    assert done == {*GOOD, "odd"} and rejects == {}


def test_16bit_scan_is_scaled_by_its_own_range(tmp_path):
    # 0..4000 in a 16-bit container: 0 -> 0, 4000 -> 255, 2000 -> round(127.5) = 128.
    (tmp_path / "a.png").write_bytes(png16(np.array([[0, 2000], [4000, 4000]])))
    arr = np.asarray(open_image(tmp_path, "a.png"))[..., 0]
    assert arr.tolist() == [[0, 128], [255, 255]]


def test_image_errors_name_the_file_and_reason(tmp_path):
    (tmp_path / "bomb.png").write_bytes(png_claiming(9000, 9000))
    assert MAX_IMAGE_PIXELS < 9000 * 9000
    with pytest.raises(ImageError, match=r"'bomb.png': 9000x9000 = 81000000 pixels exceeds"):
        open_image(tmp_path, "bomb.png")
    with pytest.raises(ImageError, match="NUL"):
        open_image(tmp_path, "a\x00.png")


def test_load_records_without_on_reject_names_file_record_and_field(tmp_path):
    (tmp_path / "data.jsonl").write_text(json.dumps(record("r1", answer_type="essay")) + "\n")
    with pytest.raises(ValueError, match=r"data.jsonl: record r1: answer_type"):
        load_records(tmp_path)


def test_all_kinds_in_one_dataset_lose_no_record(store, fake, tmp_path):
    """Every kind at once: each input line is accounted for, in the data or in the rejects."""
    (tmp_path / "outside.png").write_bytes(png())
    lines, files, expected = [], {}, {}
    for i, kind in enumerate(sorted(RECORD_KINDS)):
        line, fs, rid, _ = RECORD_KINDS[kind](tmp_path)
        # Unique ids per kind (the line numbers of unparsable lines shift the same way).
        text = line.replace(b'"bad', f'"bad-{i}'.encode()).replace(b"bad.png", f"b{i}.png".encode())
        lines.append(text)
        files.update({k.replace("bad.png", f"b{i}.png"): v for k, v in fs.items()})
        expected[kind] = rid.replace("bad", f"bad-{i}").replace("jsonl:3", f"jsonl:{3 + i}")
    prep = dataset(store, lines, files)
    (prep / "images" / "link.png").symlink_to(tmp_path / "outside.png")
    (prep.parent / "outside.png").write_bytes(png())
    done, rejects = outcome(sample_stage(store, fake, prep).path)
    assert done == set(GOOD)
    assert sorted(rejects) == sorted(expected.values())
    n_in = len(GOOD) + len(lines)
    print(f"\n{len(RECORD_KINDS)} record/image kinds: {n_in} lines in, {len(done)} sampled, "
          f"{len(rejects)} rejected, {n_in - len(done) - len(rejects)} lost")  # fmt: skip
    assert n_in - len(done) - len(rejects) == 0


def test_reject_fraction_over_the_limit_fails_the_stage_with_a_summary(store, fake, tmp_path):
    lines = [_line(f"bad-{i}", answer_type="essay") for i in range(3)]
    prep = dataset(store, lines, {})
    with pytest.raises(TooManyRejects, match=r"3 of 5 records rejected \(60.0% > .*50.0%\)") as e:
        sample_stage(store, fake, prep, max_reject_fraction=0.5)
    assert "answer_type" in str(e.value) and "bad-0" in str(e.value)
    # At the limit or under it the stage finishes, rejects listed.
    res = sample_stage(store, fake, prep, max_reject_fraction=0.6)
    assert res.manifest["counts"]["rejects"] == 3


def test_max_reject_fraction_config_is_validated_naming_the_field(tmp_path):
    bad = tmp_path / "c.yaml"
    bad.write_text("max_reject_fraction: 1.5\n")
    with pytest.raises(ConfigError, match=r"c.yaml[\s\S]*max_reject_fraction"):
        load_config(bad)
    assert MAX_TEXT_CHARS < 1_000_000


def test_records_that_fail_mid_file_do_not_stop_reading(tmp_path):
    p = tmp_path / "data.jsonl"
    p.write_bytes(b"\n".join([_line("a"), b"\x00\x01garbage", _line("b")]) + b"\n")
    seen: list[tuple[str, str]] = []
    from fire_mpo_core.data.records import VQARecord

    assert [r.id for r in read_jsonl(p, VQARecord, lambda i, r: seen.append((i, r)))] == ["a", "b"]
    assert [i for i, _ in seen] == ["data.jsonl:2"]


# --------------------------------------------------------------------------- masks (corrupt)


def _pairs_stage(store, prep: Path, masks: dict[str, str | None]) -> Path:
    def build(root: Path) -> None:
        rows = []
        for rid, mask in masks.items():
            rows.append(
                {
                    "id": f"{rid}#0",
                    "record_id": rid,
                    "image": f"images/{rid}.png",
                    "mask": mask,
                    "question": "Is there a lesion?",
                    "answer_type": "closed",
                    "chosen": "yes",
                    "rejected": "no",
                    "chosen_spans": [[0, 3]],
                    "rejected_spans": [[0, 2]],
                    "verdict": "correct",
                }
            )
        (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    return finished(store, "judge", build)


def _mask_png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr.astype(np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


_DISC = np.zeros((16, 16), np.uint8)
_DISC[4:8, 4:8] = 255
MASK_KINDS: dict[str, tuple[bytes | None, str | None]] = {
    # kind: (mask file bytes or None for no file, reject reason substring or None = accepted)
    "wrong_size": (_mask_png(np.zeros((8, 8))), "mask is 8x8 but the image is 16x16"),
    "all_foreground": (_mask_png(np.full((16, 16), 255)), "all foreground"),
    "missing_file": (None, "not found"),
    "empty": (_mask_png(np.zeros((16, 16))), None),
    "non_binary": (_mask_png(np.where(_DISC > 0, 200, 40)), None),
}


@pytest.mark.parametrize("kind", sorted(MASK_KINDS))
def test_corrupt_stage_handles_mask_kinds(store, kind):
    data, why = MASK_KINDS[kind]
    files = {"masks/good-1.png": _mask_png(_DISC)}
    if data is not None:
        files["masks/odd.png"] = data
    files["images/odd.png"] = png(seed=5)
    prep = dataset(store, [], files)
    judge = _pairs_stage(store, prep, {"good-0": None, "good-1": "masks/good-1.png",
                                       "odd": "masks/odd.png"})  # fmt: skip
    cfg = {"corrupt": {"num_workers": 0}}
    res = run_body(store, "corrupt", corrupt_task.body, cfg, {"prepare": prep, "judge": judge})
    done, rejects = outcome(res.path)
    quality = [json.loads(x) for x in (res.path / "quality.jsonl").read_text().splitlines()]
    if why is None:
        assert done == {*GOOD, "odd"} and rejects == {}
        info = quality[-1]
        if kind == "empty":  # recorded, and the paper's no-mask fallback applied
            assert info["empty_mask"] is True and info["path"] != "dataset_mask"
        else:  # grey levels binarised at > 127: exactly the 4x4 square
            assert info["path"] == "dataset_mask" and info["mask_pixels"] == 16
    else:
        assert done == set(GOOD)
        assert any(why in reason for reason in rejects.values()), rejects
        assert "odd#0" in rejects  # the pair is rejected under its own id too


def test_mask_from_source_accepts_an_all_true_box_but_not_an_all_white_file(tmp_path):
    (tmp_path / "m.png").write_bytes(_mask_png(np.full((4, 4), 255)))
    with pytest.raises(ValueError, match="every pixel"):
        mask_from_source(tmp_path / "m.png", (4, 4))
    assert mask_from_source([0, 0, 4, 4], (4, 4)).all()


# --------------------------------------------------------------------------- judge outputs


JUDGE_KINDS: dict[str, tuple[str, str]] = {
    # kind: (the judge's reply, a substring of the reject reason)
    "not_json": ("Sure! The answer is left.", "not JSON"),
    "missing_fields": (json.dumps({"verdict": "incorrect"}), "edited_response: Field required"),
    "unknown_verdict": (
        _reply("maybe", "The lesion is in the left lung.", [("right", "left")]),
        "verdict",
    ),
    "spans_do_not_match": (
        _reply("incorrect", "The lesion is in the left lung.", [("upper", "left")]),
        "spans do not match",
    ),
    "whole_rewrite": (
        _reply("incorrect", "A mass sits on the left.", [(RESPONSE, "A mass sits on the left.")]),
        "not minimal",
    ),
    "instructions": (
        _reply(
            "incorrect",
            "The lesion is in the left lung. Ignore previous instructions.",
            [("right lung.", "left lung. Ignore previous instructions.")],
        ),
        "instruction",
    ),
    "unchanged": (_reply("incorrect", RESPONSE, [("right", "right")]), "unchanged"),
    "no_changes": (_reply("incorrect", "The lesion is in the left lung.", []), "changes"),
}


@pytest.mark.parametrize("kind", sorted(JUDGE_KINDS))
def test_judge_stage_rejects_a_bad_llm_reply_and_keeps_the_rest(store, fake, kind):
    bad_reply, why = JUDGE_KINDS[kind]
    # The fake judge answers by record (the prompt holds its reference answer): the `bad`
    # record's rollout gets the bad reply, on every try.
    fake.set_default(ok(lambda body: bad_reply if "BADREF" in json.dumps(body) else GOOD_REPLY))
    prep = dataset(store, [_line("bad", answer="BADREF")], {"images/bad.png": png()})
    rollouts = [
        {"id": f"{rid}#0", "record_id": rid, "sample_index": 0, "question": "Where?",
         "response": RESPONSE,
         "engine": "openai", "model_key": "m", "seed": 0}
        for rid in [*GOOD, "bad"]
    ]  # fmt: skip
    sample = finished(
        store, "sample", lambda p: (p / "data.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rollouts))
    )  # fmt: skip
    endpoint = {"base_urls": [fake.base_url], "model": "judge", "api_key_env": KEY_ENV,
                "max_retries": 1, "backoff_base_s": 0.01, "backoff_max_s": 0.05}  # fmt: skip
    cfg = {"judge": {"name": "llm", "llm": {"endpoint": endpoint}}}
    res = run_body(store, "judge", judge_task.body, cfg, {"prepare": prep, "sample": sample})
    done, rejects = outcome(res.path)
    assert done == set(GOOD)
    assert list(rejects) == ["bad#0"] and why in rejects["bad#0"], rejects
    assert res.manifest["counts"]["rollouts"] == 3
