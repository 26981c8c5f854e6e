"""Tests of the SynthLesion generator: determinism, record contracts, labels checked against the
saved masks (radiological convention), size classes, the train-only language prior, modality
styles and report facts."""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter, defaultdict
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from fire_mpo_core.config import DataConfig
from fire_mpo_core.data.records import VQARecord
from fire_mpo_core.data.synthlesion import (
    QUADRANTS,
    LesionSpec,
    generate_synthlesion,
    image_rng,
    load_records,
    quadrant_of,
    render_scan,
    scan_plan,
    side_of,
    size_class,
    vertical_of,
)

S = 64
CFG = DataConfig(
    image_size=S,
    n_train_images=240,
    n_val_images=12,
    n_test_images=240,
    questions_per_image=4,
    report_fraction=0.5,
    language_prior=0.8,
    seed=3,
)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, int], list]:
    root = tmp_path_factory.mktemp("synthlesion")
    counts = generate_synthlesion(CFG, root)
    return root, counts, load_records(root)


def _png(root: Path, rel: str) -> np.ndarray:
    with Image.open(root / rel) as im:
        assert im.mode == "L"
        return np.array(im)


def _centroid(mask: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    return float(xs.mean()), float(ys.mean())


def _scans(records: list[VQARecord]) -> dict[str, list[VQARecord]]:
    by_image: dict[str, list[VQARecord]] = defaultdict(list)
    for r in records:
        by_image[r.image].append(r)
    return by_image


# ------------------------------------------------------------------------------------------------
# Conventions (hand-derived)
# ------------------------------------------------------------------------------------------------


def test_patient_frame_convention_by_hand() -> None:
    # 64 px: midline at 31.5. Column 40 is on the image's right = the patient's LEFT.
    assert side_of(40, 64) == "left"
    assert side_of(20, 64) == "right"
    assert vertical_of(10, 64) == "upper" and vertical_of(50, 64) == "lower"
    assert quadrant_of(40, 10, 64) == "upper left"
    assert quadrant_of(20, 50, 64) == "lower right"


def test_size_class_thresholds_by_hand() -> None:
    # 64 px: small < 0.053 * 64 = 3.392 <= medium < 0.075 * 64 = 4.8 <= large.
    assert size_class(3.3, 64) == "small"
    assert size_class(3.4, 64) == "medium"
    assert size_class(4.79, 64) == "medium"
    assert size_class(4.8, 64) == "large"
    assert size_class(9.0, 128) == "medium"  # 0.075 * 128 = 9.6


def test_render_scan_places_lesion_in_requested_quadrant() -> None:
    rng = np.random.default_rng(0)
    spec = [LesionSpec("upper left", "large", "hyperdense", "round")]
    img, lesions = render_scan(rng, "ct", S, spec)
    assert img.dtype == np.uint8 and img.shape == (S, S)
    (le,) = lesions
    cx, _ = _centroid(le.mask)
    assert cx > (S - 1) / 2  # patient left = image right
    assert le.quadrant == "upper left" and le.size == "large"
    # Hyperdense: brighter inside the mask than in a ring just around it.
    ring = cv2.dilate(le.mask.astype(np.uint8), np.ones((5, 5), np.uint8)).astype(bool) & ~le.mask
    assert img[le.mask].mean() > img[ring].mean() + 10
    with pytest.raises(ValueError, match="distinct quadrants"):
        render_scan(rng, "ct", S, spec * 2)
    with pytest.raises(ValueError, match="unknown modality"):
        render_scan(rng, "pet", S, [])


# ------------------------------------------------------------------------------------------------
# Determinism
# ------------------------------------------------------------------------------------------------


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_deterministic_byte_identical(tmp_path: Path) -> None:
    cfg = DataConfig(image_size=S, n_train_images=12, n_val_images=3, n_test_images=9, seed=7)
    a, b = tmp_path / "a", tmp_path / "b"
    counts_a, counts_b = generate_synthlesion(cfg, a), generate_synthlesion(cfg, b)
    assert counts_a == counts_b
    ha, hb = _hashes(a), _hashes(b)
    assert ha == hb
    assert len([k for k in ha if k.startswith("images/")]) == 24
    assert "data.jsonl" in ha and not any(k.endswith(".tmp") for k in ha)
    # Another seed gives other scans.
    c = tmp_path / "c"
    generate_synthlesion(cfg.model_copy(update={"seed": 8}), c)
    assert _hashes(c)["images/train-00000.png"] != ha["images/train-00000.png"]


def test_each_image_reproducible_alone(dataset) -> None:
    root, _, _ = dataset
    for split, i in (("train", 17), ("test", 101)):
        rng = image_rng(CFG.seed, split, i)
        modality, specs = scan_plan(rng, CFG.seed, split, i, CFG.language_prior)
        img, lesions = render_scan(rng, modality, S, specs)
        np.testing.assert_array_equal(img, _png(root, f"images/{split}-{i:05d}.png"))
        for j, le in enumerate(lesions):
            saved = _png(root, f"masks/{split}-{i:05d}-l{j}.png")
            np.testing.assert_array_equal(saved > 0, le.mask)


# ------------------------------------------------------------------------------------------------
# Record contract
# ------------------------------------------------------------------------------------------------


def test_records_validate_and_counts_match(dataset) -> None:
    root, counts, records = dataset
    lines = (root / "data.jsonl").read_text().splitlines()
    assert len(lines) == len(records) == counts["records"]
    for line in lines:
        VQARecord.model_validate_json(line)
        assert json.loads(line)["dataset"] == "synthlesion"
    ids = [r.id for r in records]
    assert len(set(ids)) == len(ids)
    by_split = Counter(r.split for r in records)
    by_type = Counter(r.answer_type for r in records)
    for split in ("train", "val", "test"):
        assert counts[split] == by_split[split]
    for at in ("closed", "open", "report"):
        assert counts[at] == by_type[at]
    scans = _scans(records)
    assert counts["images"] == len(scans) == 240 + 12 + 240
    for image, recs in scans.items():
        stem = Path(image).stem
        split = stem.split("-")[0]
        assert image == f"images/{stem}.png" and (root / image).is_file()
        assert {r.split for r in recs} == {split}
        assert len({r.modality for r in recs}) == 1 and recs[0].modality in ("ct", "mri", "x-ray")
        vqa = [r for r in recs if r.answer_type != "report"]
        assert [r.id for r in vqa] == [f"{stem}-q{k}" for k in range(CFG.questions_per_image)]
        assert len({r.question for r in vqa}) == len(vqa)  # distinct questions
        reports = [r for r in recs if r.answer_type == "report"]
        assert [r.id for r in reports] in ([], [f"{stem}-report"])
        for r in recs:
            assert not Path(r.image).is_absolute()
            if r.answer_type == "report":
                assert r.answer[0].isupper() and r.answer.endswith(".")
            else:
                assert r.answer == r.answer.lower()  # canonical short answers are lowercase
            assert r.reference and r.reference != r.answer
    # About half closed, half open; report_fraction of the scans have a report.
    assert 0.4 < by_type["closed"] / (by_type["closed"] + by_type["open"]) < 0.6
    assert abs(by_type["report"] / len(scans) - CFG.report_fraction) < 0.08


# ------------------------------------------------------------------------------------------------
# Labels from the masks
# ------------------------------------------------------------------------------------------------


def _mask_quadrant(mask: np.ndarray) -> str:
    cx, cy = _centroid(mask)
    mid = (S - 1) / 2
    side = "left" if cx > mid else "right"  # radiological: image right = patient left
    return f"{'upper' if cy < mid else 'lower'} {side}"


def test_masks_and_lesion_labels(dataset) -> None:
    root, _, records = dataset
    mid = (S - 1) / 2
    for image, recs in _scans(records).items():
        r0 = recs[0]
        stem = Path(image).stem
        if not r0.lesions:
            assert r0.mask is None and not (root / f"masks/{stem}.png").exists()
            continue
        union = _png(root, r0.mask)
        assert set(np.unique(union)) <= {0, 255}
        n_cc, _ = cv2.connectedComponents((union > 0).astype(np.uint8), connectivity=8)
        assert n_cc - 1 == len(r0.lesions)  # lesions never touch
        acc = np.zeros((S, S), bool)
        for j, le in enumerate(r0.lesions):
            assert le.mask == f"masks/{stem}-l{j}.png"
            m = _png(root, le.mask) > 0
            assert not (acc & m).any()
            acc |= m
            # Labels from the mask's centroid; the whole mask lies in that one quadrant.
            assert le.quadrant == _mask_quadrant(m) == f"{le.vertical} {le.side}"
            ys, xs = np.nonzero(m)
            assert len({("upper" if y < mid else "lower", x > mid) for x, y in zip(xs, ys)}) == 1
            cx, cy = _centroid(m)
            assert abs(le.center_xy[0] - cx) <= 0.5 and abs(le.center_xy[1] - cy) <= 0.5
            # Size class from the radius; the radius is the mask's equivalent radius.
            assert le.radius_px == pytest.approx(math.sqrt(m.sum() / math.pi), abs=1e-3)
            assert le.size == size_class(le.radius_px, S)
        np.testing.assert_array_equal(acc, union > 0)
        assert len({le.quadrant for le in r0.lesions}) == len(r0.lesions)


def _param(pattern: str, text: str) -> str:
    m = re.search(pattern, text)
    assert m, text
    return m.group(0)


def test_answers_match_masks(dataset) -> None:
    root, _, records = dataset
    checked: Counter[str] = Counter()
    for r in records:
        if r.answer_type == "report":
            continue
        masks = [_png(root, le.mask) > 0 for le in r.lesions]
        quads = {_mask_quadrant(m) for m in masks}
        n_cc = 0
        if r.mask:
            n_cc = cv2.connectedComponents((_png(root, r.mask) > 0).astype(np.uint8))[0] - 1
        qt, q, a = r.question_type, r.question, r.answer
        if qt in ("side", "size", "shape", "intensity"):
            assert len(r.lesions) == 1, r.id  # "the lesion" only when there is exactly one
        if r.answer_type == "closed":
            assert a in ("yes", "no")
            assert r.reference.startswith("Yes" if a == "yes" else "No")
            if qt == "presence":
                expect = n_cc > 0
            elif qt == "side":
                expect = _param(r"\b(left|right)\b", q) == _mask_quadrant(masks[0]).split()[1]
            elif qt == "quadrant":
                expect = _param(r"(upper|lower) (left|right)", q) in quads
            elif qt == "count":
                expect = (2 if "two" in q else 1) == n_cc
            elif qt == "size":
                expect = _param(r"small|medium|large", q) == size_class(
                    math.sqrt(masks[0].sum() / math.pi), S
                )
            elif qt == "modality":
                named = _param(r"CT|MRI|X-ray", q).lower()
                expect = named == r.modality
            elif qt == "intensity":
                expect = ("hyperdense" in q or "brighter" in q) == (
                    r.lesions[0].intensity == "hyperdense"
                )
            else:
                raise AssertionError(f"unexpected closed type {qt}")
            assert a == ("yes" if expect else "no"), (r.id, q, a)
        else:
            if qt == "location":
                assert a == " and ".join(sorted(quads, key=QUADRANTS.index))
            elif qt == "side":
                assert a == _mask_quadrant(masks[0]).split()[1]
                assert f"patient's {a} side" in r.reference
            elif qt == "count":
                assert a == ("none", "one", "two")[n_cc]
            elif qt == "size":
                assert a == size_class(math.sqrt(masks[0].sum() / math.pi), S)
            elif qt == "modality":
                assert a == r.modality
            elif qt == "abnormality":
                want = [f"{le.intensity} {le.shape} lesion" for le in r.lesions] or ["none"]
                assert set(a.split(" and ")) == set(want)
            elif qt == "shape":
                assert a == r.lesions[0].shape
            else:
                raise AssertionError(f"unexpected open type {qt}")
        checked[f"{r.answer_type}:{qt}"] += 1
    # Every question type was exercised.
    assert len(checked) == 14, checked


def test_reference_uses_clinical_word_order(dataset) -> None:
    _, _, records = dataset
    loc = [r for r in records if r.answer_type == "open" and r.question_type == "location"]
    assert loc
    for r in loc:
        for quad in r.answer.split(" and "):
            vertical, side = quad.split()
            assert f"{side} {vertical}" in r.reference  # "left upper quadrant"


# ------------------------------------------------------------------------------------------------
# Language prior (train only) and balance (val/test)
# ------------------------------------------------------------------------------------------------


def _yes_rate(records: list[VQARecord], split: str, qtype: str | None = None) -> tuple[float, int]:
    rs = [
        r
        for r in records
        if r.split == split
        and r.answer_type == "closed"
        and (qtype is None or r.question_type == qtype)
    ]
    return sum(r.answer == "yes" for r in rs) / len(rs), len(rs)


def test_language_prior_in_train_not_in_test(dataset) -> None:
    _, _, records = dataset
    p = CFG.language_prior
    train_presence, n_tp = _yes_rate(records, "train", "presence")
    test_presence, n_sp = _yes_rate(records, "test", "presence")
    assert n_tp > 60 and n_sp > 60
    assert abs(train_presence - p) < 0.1
    assert abs(test_presence - 0.5) < 0.1
    # Quadrant questions carry the prior too; the other closed types stay 50/50 even in train,
    # so a blind "yes" policy beats chance on train only, and only partly.
    train_quad, n_tq = _yes_rate(records, "train", "quadrant")
    assert n_tq > 30 and abs(train_quad - p) < 0.12
    assert abs(_yes_rate(records, "train", "side")[0] - 0.5) < 0.12
    assert 0.55 < _yes_rate(records, "train")[0] < p
    assert abs(_yes_rate(records, "test")[0] - 0.5) < 0.06
    # Lesion rate per split follows the prior (low-discrepancy sequence: tight).
    scans = _scans(records)
    for split, rate in (("train", p), ("test", 0.5)):
        has = [bool(v[0].lesions) for k, v in scans.items() if v[0].split == split]
        assert abs(np.mean(has) - rate) < 0.03

    # Location prior: train CT lesions sit in the upper left far more than test ones.
    def ul_share(split: str) -> float:
        first = [
            v[0].lesions[0].quadrant
            for v in scans.values()
            if v[0].split == split and v[0].modality == "ct" and v[0].lesions
        ]
        return sum(q == "upper left" for q in first) / len(first)

    assert ul_share("train") > 0.55
    assert ul_share("test") < 0.45


def test_prior_strength_half_means_no_prior(tmp_path: Path) -> None:
    cfg = CFG.model_copy(
        update={"n_train_images": 200, "n_val_images": 0, "n_test_images": 1, "language_prior": 0.5}
    )
    generate_synthlesion(cfg, tmp_path)
    records = load_records(tmp_path)
    rate, _ = _yes_rate(records, "train")
    assert abs(rate - 0.5) < 0.07


# ------------------------------------------------------------------------------------------------
# Images and modality styles
# ------------------------------------------------------------------------------------------------


def test_images_uint8_and_modality_styles_differ(dataset) -> None:
    root, _, records = dataset
    stats: dict[str, list[tuple[float, float, float]]] = defaultdict(list)
    for image, recs in list(_scans(records).items())[:90]:
        img = _png(root, image)
        assert img.dtype == np.uint8 and img.shape == (S, S)
        lap = np.abs(cv2.Laplacian(img.astype(np.float64), cv2.CV_64F)).mean()
        stats[recs[0].modality].append((img.mean(), (img > 200).mean(), lap))
    mean = {m: np.mean(v, axis=0) for m, v in stats.items()}
    assert set(mean) == {"ct", "mri", "x-ray"}
    # X-ray: a bright, full-field chest; CT brighter than MRI with bone (>200) that MRI lacks.
    assert mean["x-ray"][0] > mean["ct"][0] + 20 > mean["mri"][0] + 25
    assert mean["ct"][1] > 0.01 > 0.001 > mean["mri"][1]
    # MRI is smoother than CT (less high-frequency energy).
    assert mean["ct"][2] > 1.2 * mean["mri"][2]


# ------------------------------------------------------------------------------------------------
# Reports
# ------------------------------------------------------------------------------------------------


def test_reports_carry_the_clinical_facts(dataset) -> None:
    _, _, records = dataset
    reports = [r for r in records if r.answer_type == "report"]
    assert len(reports) > 50
    for r in reports:
        sentences = [s for s in r.answer.split(". ") if s]
        assert 2 <= len(sentences) <= 4, r.answer
        if not r.lesions:
            assert "No focal lesion is seen." in r.answer
            assert "lesion is noted" not in r.reference
        for le in r.lesions:
            vertical, side = le.quadrant.split()
            fact = f"{le.size} {le.intensity} {le.shape} lesion"
            assert f"{fact} in the {le.quadrant} region" in r.answer
            assert f"{fact} is noted in the {side} {vertical} quadrant" in r.reference
        # Clinical sentences come with filler: at least one sentence mentions no lesion at all.
        assert any("lesion" not in s for s in sentences)
        assert r.reference != r.answer and r.question_type == "report"
