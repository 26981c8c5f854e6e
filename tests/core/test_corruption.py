"""Tests of fire_mpo_core.corruption: the `corrupt` contract, mask sources (incl. a hand-checked
COCO RLE decoder), the classical segmenter and QA -> prompt rule, the paper's fallbacks, the
parallel batch, and a pass over real public lesion data (skipped when ../shared/realdata is absent).

Expected statistics are derived in the comments next to each assertion.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image
from pydantic import ValidationError

from fire_mpo_core.corruption import (
    CHANGES_OUTSIDE_MASK,
    CORRUPTIONS,
    SEGMENTERS,
    ClassicalSegmenter,
    CorruptConfig,
    CorruptItem,
    Segmenter,
    box_mask,
    corrupt,
    corrupt_for_record,
    corrupt_many,
    corruption_quality,
    decode_rle,
    derive_seed,
    encode_rle,
    fit_mask,
    get_segmenter,
    load_image,
    load_mask,
    make_executor,
    mask_from_source,
    prompt_from_qa,
)
from fire_mpo_core.corruption.masks import counts_to_rle_string, rle_string_to_counts
from fire_mpo_core.corruption.ops import crop_window, dilate_mask
from fire_mpo_core.corruption.segmenter import parse_prompt, region_contains

KINDS = sorted(CORRUPTIONS)
KEEPS_OUTSIDE = [k for k in KINDS if k not in CHANGES_OUTSIDE_MASK]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def disc(shape: tuple[int, int], cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def textured(
    shape: tuple[int, ...], seed: int = 0, level: float = 110, amp: float = 20
) -> np.ndarray:
    """Smooth random texture around `level` (uint8), the same in every channel if RGB."""
    rng = np.random.default_rng(seed)
    t = cv2.GaussianBlur(rng.normal(0, 1, shape[:2]), (0, 0), 2.0)
    t = level + amp * t / t.std()
    img = np.clip(np.rint(t), 0, 255).astype(np.uint8)
    return np.repeat(img[..., None], 3, axis=2) if len(shape) == 3 else img


def scan(
    size: int = 64,
    seed: int = 0,
    blobs: tuple[tuple[float, float, float, float], ...] = (),
    texture: float = 6.0,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """A SynthLesion-like grey scan: an elliptical body (grey 110, correlated texture) on dark
    air (10), plus discs (cy, cx, r, delta) of intensity 110 + delta, plus pixel noise 3."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size].astype(float)
    body = ((yy - size / 2) / (0.45 * size)) ** 2 + ((xx - size / 2) / (0.42 * size)) ** 2 <= 1
    tex = cv2.GaussianBlur(rng.normal(0, 1, (size, size)), (0, 0), 1.5)
    img = np.full((size, size), 10.0)
    img[body] = 110 + texture * (tex / tex.std())[body]
    masks = []
    for cy, cx, r, delta in blobs:
        m = disc((size, size), cy, cx, r)
        img[m] += delta
        masks.append(m)
    img += rng.normal(0, 3, img.shape)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), masks


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


@pytest.fixture(params=["grey", "rgb"])
def image_and_mask(request) -> tuple[np.ndarray, np.ndarray]:
    shape = (48, 64) if request.param == "grey" else (48, 64, 3)
    img = textured(shape, seed=1)
    if img.ndim == 3:  # make the channels differ, so per-channel handling is exercised
        img[..., 1] = np.clip(img[..., 1].astype(int) + 30, 0, 255)
    return img, disc((48, 64), 20, 40, 9)


# --------------------------------------------------------------------------------------------
# the corrupt contract
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_shape_and_dtype_preserved(image_and_mask, kind):
    img, mask = image_and_mask
    out = corrupt(img, mask, kind, seed=3)
    assert out.shape == img.shape and out.dtype == np.uint8
    if kind != "inpaint":  # inpaint needs a mask
        out = corrupt(img, None, kind, seed=3)
        assert out.shape == img.shape and out.dtype == np.uint8


@pytest.mark.parametrize("kind", KEEPS_OUTSIDE)
def test_outside_mask_bit_identical(image_and_mask, kind):
    img, mask = image_and_mask
    before = img.copy()
    out = corrupt(img, mask, kind, seed=11)
    np.testing.assert_array_equal(out[~mask], img[~mask])
    assert not np.array_equal(out[mask], img[mask]), "the lesion must change"
    np.testing.assert_array_equal(img, before)  # the input is never modified


@pytest.mark.parametrize("kind", KINDS)
def test_deterministic_for_a_seed(image_and_mask, kind):
    img, mask = image_and_mask
    np.testing.assert_array_equal(corrupt(img, mask, kind, 5), corrupt(img, mask, kind, 5))


@pytest.mark.parametrize("kind", ["noise", "crop"])
def test_seeded_kinds_differ_across_seeds(kind):
    img, mask = textured((64, 64), seed=2), disc((64, 64), 10, 10, 5)
    if kind == "noise":
        outs = [corrupt(img, mask, kind, s) for s in range(3)]
    else:  # without a mask the crop window's position is drawn from the seed
        outs = [corrupt(img, None, kind, s) for s in range(3)]
    assert not np.array_equal(outs[0], outs[1]) and not np.array_equal(outs[1], outs[2])


def test_noise_std_inside_mask_is_45_on_mid_grey():
    img = np.full((256, 256), 128, np.uint8)
    mask = disc((256, 256), 128, 128, 60)
    n = int(mask.sum())  # about pi * 60^2 = 11,310 pixels
    d = corrupt(img, mask, "noise", seed=0).astype(float) - 128
    # x' = clip(round(128 + 45 z)): clipping cuts the tails beyond c = 127/45 = 2.82 sigma
    # (top) and 128/45 = 2.84 sigma (bottom). Var(clip(Z, +-c)) = 1 - 2Q(c) - 2c phi(c)
    # + 2c^2 Q(c) = 0.9915 at c = 2.83 -> std 45 * sqrt(0.9915) = 44.81; rounding adds 1/12
    # to the variance (negligible). Standard error of a sample std: sigma / sqrt(2n) = 0.30;
    # tolerance 4 SE = 1.2. Mean: 0 +- 4 * 45 / sqrt(n) = 1.7.
    assert abs(d[mask].std() - 44.81) < 1.2
    assert abs(d[mask].mean()) < 4 * 45 / math.sqrt(n)
    assert np.all(d[~mask] == 0)


def test_whole_image_noise_sigma_12_and_independent_channels():
    img = np.full((256, 256, 3), 128, np.uint8)
    d = corrupt(img, None, "noise", seed=1).astype(float) - 128
    # 128 is 10.7 sigma from either clip, so std = sqrt(12^2 + 1/12) = 12.003; n = 3 * 65536,
    # SE = 12 / sqrt(2n) = 0.019; tolerance 0.1. Channels are drawn independently: the sample
    # correlation of two channels has SE 1 / sqrt(65536) = 0.004.
    assert abs(d.std() - 12.003) < 0.1
    assert abs(np.corrcoef(d[..., 0].ravel(), d[..., 1].ravel())[0, 1]) < 0.02


def test_noise_sigma_override():
    img = np.full((128, 128), 128, np.uint8)
    d = corrupt(img, None, "noise", seed=2, sigma=5.0).astype(float) - 128
    # sqrt(25 + 1/12) = 5.008; SE 5 / sqrt(2 * 16384) = 0.028.
    assert abs(d.std() - 5.008) < 0.12


def test_noise_clips_instead_of_wrapping():
    bright = np.full((128, 128), 250, np.uint8)
    out = corrupt(bright, None, "noise", seed=3, sigma=45.0)
    # P(round(250 + 45z) >= 255) = P(z >= 4.5 / 45) = Q(0.1) = 0.460; SE sqrt(.25/16384) = .004.
    assert abs((out == 255).mean() - 0.460) < 0.02
    # With uint8 wrap-around the ~46% overflowing pixels would land near 0..40; clipped noise
    # goes under 100 only for z < -3.33 (P = 0.0004).
    assert (out < 100).mean() < 0.003
    dark = np.full((128, 128), 5, np.uint8)
    out = corrupt(dark, None, "noise", seed=4, sigma=45.0)
    # P(round(5 + 45z) <= 0) = P(z <= -4.5 / 45) = 0.460.
    assert abs((out == 0).mean() - 0.460) < 0.02
    assert (out > 160).mean() < 0.003


def test_inpaint_removes_a_bright_blob():
    img = textured((96, 96), seed=3, level=100, amp=6)
    lesion = disc((96, 96), 40, 50, 8)
    img[lesion] = 200
    ring = dilate_mask(lesion, 8) & ~dilate_mask(lesion, 3)
    before = img[lesion].mean() - img[ring].mean()  # about 100 grey levels
    assert before > 90
    for method in ("telea", "ns", "biharmonic"):
        out = corrupt(img, lesion, "inpaint", 0, method=method)
        after = out[lesion].mean() - out[ring].mean()
        # The fill comes from texture of std 6 around 100: the blob's 100-level contrast must
        # fall to within a few texture stds of 0.
        assert abs(after) < 10, (method, after)
        np.testing.assert_array_equal(out[~lesion], img[~lesion])


def test_black_and_blur_inside_the_mask():
    img = ((np.indices((40, 40)).sum(axis=0) % 2) * 200 + 20).astype(np.uint8)  # checkerboard
    mask = disc((40, 40), 20, 20, 10)
    black = corrupt(img, mask, "black", 0)
    assert np.all(black[mask] == 0)
    blurred = corrupt(img, mask, "blur", 0, sigma=2.0)
    # A 1-px checkerboard of +-100 around 120 is removed by a sigma-2 Gaussian: its gain at
    # half a cycle per pixel is exp(-2 pi^2 sigma^2 / 4) = 3e-9 per axis.
    assert blurred[mask].std() < 2 and abs(blurred[mask].mean() - 120) < 2
    assert img[mask].std() > 99
    # Blurring only the mask's padded box equals blurring the whole image, also at the border.
    for m in (mask, disc((40, 40), 2, 37, 6)):
        full = cv2.GaussianBlur(img, (17, 17), 2.0)  # the op's kernel reaches 4 sigma
        np.testing.assert_array_equal(corrupt(img, m, "blur", 0, sigma=2.0)[m], full[m])


def test_crop_zooms_to_a_lesion_free_window():
    img = textured((60, 80, 3), seed=4)
    mask = disc((60, 80), 30, 20, 6)
    rng = np.random.default_rng(9)
    y0, y1, x0, x1 = crop_window(img.shape, mask, rng, margin_px=2)
    assert not mask[y0:y1, x0:x1].any()
    # The window keeps the image's aspect ratio: height = 0.75 * width to within a pixel.
    assert abs((y1 - y0) - 0.75 * (x1 - x0)) < 1
    out = corrupt(img, mask, "crop", 9, margin_px=2)
    window = np.ascontiguousarray(img[y0:y1, x0:x1])
    expected = cv2.resize(window, (80, 60), interpolation=cv2.INTER_LINEAR)
    np.testing.assert_array_equal(out, expected)
    # Without a mask: mDPO's random crop keeping keep_fraction of the area.
    y0, y1, x0, x1 = crop_window((100, 100), None, np.random.default_rng(0), keep_fraction=0.25)
    assert (y1 - y0, x1 - x0) == (50, 50)
    np.testing.assert_array_equal(corrupt(img, np.zeros((60, 80), bool), "crop", 0), img)
    with pytest.raises(ValueError, match="no lesion-free window"):
        corrupt(img, np.ones((60, 80), bool), "crop", 0)


def test_input_validation_messages():
    img = np.zeros((8, 8), np.uint8)
    with pytest.raises(ValueError, match="known kinds: black, blur, crop, inpaint, noise"):
        corrupt(img, None, "salt", 0)
    with pytest.raises(ValueError, match="uint8"):
        corrupt(img.astype(np.float32), None, "noise", 0)
    with pytest.raises(ValueError, match="HxW"):
        corrupt(np.zeros((8, 8, 4), np.uint8), None, "noise", 0)
    with pytest.raises(ValueError, match="does not match image"):
        corrupt(img, np.zeros((8, 9), bool), "noise", 0)
    with pytest.raises(ValueError, match="dtype bool"):
        corrupt(img, np.zeros((8, 8), np.uint8), "noise", 0)
    with pytest.raises(ValueError, match="seed"):
        corrupt(img, None, "noise", -1)
    with pytest.raises(ValueError, match="needs a mask"):
        corrupt(img, None, "inpaint", 0)
    with pytest.raises(ValueError, match="unexpected keyword"):
        corrupt(img, None, "black", 0, sigma=3)


# --------------------------------------------------------------------------------------------
# mask sources
# --------------------------------------------------------------------------------------------


def test_rle_hand_made_examples():
    # 3x3 with only the centre: column-major index 4 -> runs 4 zeros, 1 one, 4 zeros.
    centre = np.zeros((3, 3), bool)
    centre[1, 1] = True
    assert rle_string_to_counts("414") == [4, 1, 4]
    np.testing.assert_array_equal(decode_rle({"size": [3, 3], "counts": "414"}), centre)
    np.testing.assert_array_equal(decode_rle({"size": [3, 3], "counts": [4, 1, 4]}), centre)
    # 1x8 row 0 1 1 0 1 1 0 0: counts [1, 2, 1, 2, 2]; from index 3 on the string stores the
    # difference to the count two before: 2 - 2 = 0 -> '0', 2 - 1 = 1 -> '1'.
    row = np.array([[0, 1, 1, 0, 1, 1, 0, 0]], bool)
    assert counts_to_rle_string([1, 2, 1, 2, 2]) == "12101"
    np.testing.assert_array_equal(decode_rle({"size": [1, 8], "counts": "12101"}), row)
    # A negative difference: 1x10 row 0 1 1 1 1 1 0 1 1 0 -> counts [1, 5, 1, 2, 1]; index 3
    # stores 2 - 5 = -3: 5-bit group -3 & 31 = 29 (sign bit 0x10 set, no more bit) -> chr(77) 'M'.
    row = np.array([[0, 1, 1, 1, 1, 1, 0, 1, 1, 0]], bool)
    assert counts_to_rle_string([1, 5, 1, 2, 1]) == "151M0"
    np.testing.assert_array_equal(decode_rle({"size": [1, 10], "counts": b"151M0"}), row)
    # Multi-character count: 99 = 3 + 3 * 32 -> (3 | 0x20) + 48 = 'S', then 3 + 48 = '3'.
    last = np.zeros((10, 10), bool)
    last[9, 9] = True
    assert counts_to_rle_string([99, 1]) == "S31"
    np.testing.assert_array_equal(decode_rle({"size": [10, 10], "counts": "S31"}), last)
    # 16 needs a second character because its 0x10 bit would read as a sign: '`' then '0'.
    assert counts_to_rle_string([16]) == "`0" and rle_string_to_counts("`0") == [16]
    # A mask starting with a 1 has a leading zero-length run: column-major 1 1 0 0.
    first_col = np.array([[1, 0], [1, 0]], bool)
    assert encode_rle(first_col, compress=False)["counts"] == [0, 2, 2]
    assert encode_rle(first_col)["counts"] == "022"


def test_rle_round_trip_and_errors():
    rng = np.random.default_rng(0)
    for _ in range(20):
        h, w = rng.integers(1, 40, size=2)
        m = cv2.GaussianBlur(rng.normal(size=(h, w)), (0, 0), 2) > 0.1
        for compress in (True, False):
            np.testing.assert_array_equal(decode_rle(encode_rle(m, compress=compress)), m)
    with pytest.raises(ValueError, match="sum to 8"):
        decode_rle({"size": [3, 3], "counts": [4, 4]})
    with pytest.raises(ValueError, match="invalid character"):
        decode_rle({"size": [3, 3], "counts": "4 4"})
    with pytest.raises(ValueError, match="'size'"):
        decode_rle({"size": [3], "counts": "414"})


def test_load_mask_png_1bit_grey_threshold_and_jpeg(tmp_path):
    m = disc((50, 60), 25, 30, 12)
    Image.fromarray(m).convert("1").save(tmp_path / "one bit (1).png")
    np.testing.assert_array_equal(load_mask(tmp_path / "one bit (1).png"), m)
    grey = np.array([[127, 128], [0, 255]], np.uint8)
    Image.fromarray(grey).save(tmp_path / "g.png")
    np.testing.assert_array_equal(load_mask(tmp_path / "g.png"), [[False, True], [False, True]])
    Image.fromarray(m.astype(np.uint8) * 255).save(tmp_path / "m.jpg", quality=40)
    raw = np.asarray(Image.open(tmp_path / "m.jpg"))
    assert len(np.unique(raw)) > 2  # JPEG ringing around the edge
    loaded = load_mask(tmp_path / "m.jpg")
    assert iou(loaded, m) > 0.97
    # 0/1 label masks: "> 127" would be empty; every non-zero pixel counts instead.
    Image.fromarray(m.astype(np.uint8)).save(tmp_path / "labels.png")
    np.testing.assert_array_equal(load_mask(tmp_path / "labels.png"), m)
    np.testing.assert_array_equal(mask_from_source(m.astype(np.float32), m.shape), m)
    with pytest.raises(FileNotFoundError):
        load_mask(tmp_path / "missing.png")


def test_boxes_sources_and_resizing():
    box = box_mask([1.5, 2, 4, 5], (6, 6))  # columns 1..3 (1.5 rounds out), rows 2..4
    expected = np.zeros((6, 6), bool)
    expected[2:5, 1:4] = True
    np.testing.assert_array_equal(box, expected)
    assert box_mask([-3, -3, 2, 2], (6, 6)).sum() == 4  # clipped to the image
    with pytest.raises(ValueError, match="x1 > x0"):
        box_mask([3, 0, 1, 2], (6, 6))
    small = np.array([[1, 0], [0, 1]], bool)
    with pytest.raises(ValueError, match="resize=True"):
        fit_mask(small, (4, 4))
    np.testing.assert_array_equal(
        fit_mask(small, (4, 4), resize=True), np.kron(small, np.ones((2, 2), bool))
    )
    rle = encode_rle(small)
    np.testing.assert_array_equal(mask_from_source(rle, (2, 2)), small)
    np.testing.assert_array_equal(mask_from_source(small.astype(np.uint8) * 255, (2, 2)), small)
    np.testing.assert_array_equal(mask_from_source([0, 0, 1, 1], (2, 2)), [[1, 0], [0, 0]])
    assert mask_from_source(None, (2, 2)) is None
    with pytest.raises(TypeError, match="unsupported mask source"):
        mask_from_source(3.5, (2, 2))


# --------------------------------------------------------------------------------------------
# segmenter and prompts
# --------------------------------------------------------------------------------------------


def test_prompt_words_use_the_radiological_convention():
    loc = parse_prompt("hyperdense lesion in the upper left")
    assert (loc.vertical, loc.side, loc.polarity) == ("upper", "left", 1)
    # Patient left = image right: a point in the image's upper-right quadrant.
    assert region_contains(loc, 10, 50, 64, 64)
    assert not region_contains(loc, 10, 10, 64, 64)
    assert parse_prompt("bilateral lesions").side is None
    assert parse_prompt("hypodense mass").polarity == -1


@pytest.mark.parametrize(
    ("vertical", "side", "delta"),
    [
        ("upper", "left", 60),
        ("lower", "right", 50),
        ("upper", "right", -55),
        ("lower", "left", -45),
    ],
)
def test_segmenter_finds_the_disc_in_the_named_quadrant(vertical, side, delta):
    size = 64
    # Patient left = image right: the target's column is in the right half for "left".
    cy = 0.3 * size if vertical == "upper" else 0.7 * size
    cx = 0.68 * size if side == "left" else 0.32 * size
    # A distractor of the same polarity, brighter/darker, in the diagonally opposite quadrant.
    img, (target, _) = scan(
        size, seed=7, blobs=((cy, cx, 6, delta), (size - cy, size - cx, 6, 1.2 * delta))
    )
    seg = ClassicalSegmenter()
    found = seg.segment(img, f"lesion in the {vertical} {side}")
    assert found is not None and iou(found, target) > 0.7
    # Unprompted, the more salient distractor wins; a quadrant with nothing gives None.
    assert iou(seg.segment(img, None), target) < 0.1
    other_side = "right" if side == "left" else "left"
    assert seg.segment(img, f"lesion in the {vertical} {other_side}") is None
    # The intensity word filters polarity: the opposite one finds nothing.
    wrong = "hypodense" if delta > 0 else "hyperdense"
    assert seg.segment(img, f"{wrong} lesion in the {vertical} {side}") is None
    rgb = np.repeat(img[..., None], 3, axis=2)
    np.testing.assert_array_equal(seg.segment(rgb, f"lesion in the {vertical} {side}"), found)


def test_segmenter_returns_none_without_a_lesion():
    seg = get_segmenter("classical")
    assert isinstance(seg, Segmenter)
    assert seg.segment(np.full((64, 64), 100, np.uint8), "lesion in the upper left") is None
    clean, _ = scan(64, seed=3)
    assert seg.segment(clean, "lesion") is None
    big = cv2.resize(
        scan(64, 5, ((20, 44, 6, 60),))[0], (256, 256), interpolation=cv2.INTER_NEAREST
    )
    found = seg.segment(big, "lesion in the upper left")  # worked at 128 px, mask at 256 px
    assert found is not None and found.shape == (256, 256)
    assert iou(found, disc((256, 256), 20 * 4 + 1.5, 44 * 4 + 1.5, 24)) > 0.7
    with pytest.raises(ValueError, match="known segmenters: classical"):
        get_segmenter("sam9")
    assert "classical" in SEGMENTERS


@pytest.mark.parametrize(
    ("question", "answer", "prompt"),
    [
        ("Where is the lesion?", "upper left", "lesion in the upper left"),
        ("Which side is the lesion on?", "left", "lesion on the left side"),
        ("Is the lesion hyperdense or hypodense?", "hypodense", "hypodense lesion"),
        ("Is the lesion on the left or the right?", "right", "lesion on the right side"),
        ("Is there a lesion in the lower right?", "yes", "lesion in the lower right"),
        ("How many lesions are there?", "2", "lesion"),
        ("Is there a left apical pneumothorax?", "Yes", "pneumothorax in the upper left"),
        ("Is the liver normal?", "no", "abnormality of the liver"),
        ("Where is the pleural effusion located?", "Right side", "effusion on the right side"),
        ("Is there a lesion?", "no", None),
        ("How many lesions are there?", "0", None),
        ("Is the liver normal?", "yes", None),
        ("What modality is this?", "CT", None),
        ("Which plane is this image taken?", "PA", None),
        ("What is the patient's gender?", "Female", None),
        ("Is this a normal x ray?", "No", None),
    ],
)
def test_prompt_from_qa(question, answer, prompt):
    assert prompt_from_qa(question, answer) == prompt


# --------------------------------------------------------------------------------------------
# the paper's fallbacks and the batch
# --------------------------------------------------------------------------------------------


def _lesion_scan():
    img, (lesion,) = scan(64, seed=11, blobs=((19, 44, 6, 60),))  # patient upper left
    return img, lesion


def test_fallback_dataset_mask_wins():
    img, lesion = _lesion_scan()
    cfg = CorruptConfig(num_workers=0)
    out, info = corrupt_for_record(
        img, lesion, "lesion in the lower right", get_segmenter("classical"), cfg, seed=1
    )
    assert info["path"] == "dataset_mask" and info["kind"] == "noise" and info["sigma"] == 45
    np.testing.assert_array_equal(out[~lesion], img[~lesion])
    assert (
        info["quality"]["frac_changed_outside"] == 0.0
        and info["quality"]["frac_changed_inside"] > 0.9
    )
    assert info["mask_pixels"] == int(lesion.sum())
    json.dumps(info)  # info goes into data.jsonl as is


def test_fallback_no_prompt_is_whole_image_noise():
    img, _ = _lesion_scan()
    out, info = corrupt_for_record(
        img, None, None, get_segmenter("classical"), CorruptConfig(), seed=1
    )
    assert (info["path"], info["kind"], info["sigma"], info["mask_fraction"]) == (
        "no_prompt",
        "noise",
        12,
        1.0,
    )
    np.testing.assert_array_equal(out, corrupt(img, None, "noise", 1, sigma=12.0))


def test_fallback_segmenter_found_and_not_found():
    img, lesion = _lesion_scan()
    seg = get_segmenter("classical")
    cfg = CorruptConfig(kind="black")
    out, info = corrupt_for_record(img, None, "lesion in the upper left", seg, cfg, seed=2)
    assert info["path"] == "segmenter" and info["kind"] == "black"
    region = out != img
    assert iou(region, lesion) > 0.6  # blacked out where the segmenter found the lesion
    # Prompt but nothing found there: whole-image noise with sigma 12, whatever the kind.
    out, info = corrupt_for_record(img, None, "lesion in the lower right", seg, cfg, seed=2)
    assert (info["path"], info["kind"], info["sigma"]) == ("not_found", "noise", 12)
    np.testing.assert_array_equal(out, corrupt(img, None, "noise", 2, sigma=12.0))
    out, info = corrupt_for_record(img, None, "lesion", None, cfg, seed=2)
    assert info["path"] == "no_segmenter" and info["sigma"] == 12


def test_fallback_empty_mask_and_whole_region():
    img, _ = _lesion_scan()
    seg = get_segmenter("classical")
    _, info = corrupt_for_record(
        img, np.zeros((64, 64), bool), "lesion in the upper left", seg, CorruptConfig(), seed=0
    )
    assert info["empty_mask"] and info["path"] == "segmenter"
    _, info = corrupt_for_record(img, np.zeros((64, 64), bool), None, seg, CorruptConfig(), seed=0)
    assert info["empty_mask"] and info["path"] == "no_prompt"
    out, info = corrupt_for_record(
        img, None, None, seg, CorruptConfig(kind="black", region="whole"), seed=0
    )
    assert info["path"] == "whole_config" and not out.any()


def test_config_validation():
    with pytest.raises(ValidationError, match="known kinds"):
        CorruptConfig(kind="salt")
    with pytest.raises(ValidationError, match="extra"):
        CorruptConfig(sigma=3)
    with pytest.raises(ValidationError, match="inpaint"):
        CorruptConfig(kind="inpaint", region="whole")
    with pytest.raises(ValidationError, match="sigma_mask"):
        CorruptConfig(params={"sigma": 3})
    assert all(f.description for f in CorruptConfig.model_fields.values())


def test_derive_seed_is_stable_blake2b():
    # Re-derived independently: BLAKE2b-64 of "<seed>:<id>", top 63 bits.
    digest = hashlib.blake2b(b"7:rec-1", digest_size=8).digest()
    assert derive_seed(7, "rec-1") == int.from_bytes(digest, "big") >> 1
    assert derive_seed(7, "rec-1") != derive_seed(7, "rec-2") != derive_seed(8, "rec-1")


def _items(n: int = 10) -> list[CorruptItem]:
    items = []
    for i in range(n):
        img, masks = scan(64, seed=i, blobs=((19, 44, 6, 60),))
        if i % 3 == 0:
            items.append(CorruptItem(id=f"r{i}", image=img, mask=masks[0]))
        elif i % 3 == 1:
            items.append(CorruptItem(id=f"r{i}", image=img, prompt="lesion in the upper left"))
        else:
            items.append(CorruptItem(id=f"r{i}", image=img))
    return items


def test_corrupt_many_order_errors_and_worker_independence(tmp_path):
    items = _items(9)
    Image.fromarray(items[0].image).save(tmp_path / "scan (0).png")
    items.append(CorruptItem(id="from-file", image=tmp_path / "scan (0).png", mask=items[0].mask))
    items.append(CorruptItem(id="bad", image=items[0].image, mask=np.zeros((10, 10), bool)))
    items.append({"id": "dict", "image": items[1].image, "prompt": None})
    serial = corrupt_many(items, CorruptConfig(num_workers=0, chunk_size=4))
    assert [r.id for r in serial] == [
        it.id if isinstance(it, CorruptItem) else it["id"] for it in items
    ]
    assert [r.info.get("path") for r in serial[:3]] == ["dataset_mask", "segmenter", "no_prompt"]
    bad = serial[-2]
    assert bad.image is None and "resize=True" in bad.error
    # A record's corruption depends on its id and cfg.seed only: file vs array input agree...
    assert serial[9].info["seed"] == derive_seed(0, "from-file")
    # ...and thread and process pools with other chunk sizes give the same bytes, also on a
    # pool made once and reused.
    with make_executor(CorruptConfig(num_workers=2)) as pool:
        for _ in range(2):
            res = corrupt_many(items, CorruptConfig(num_workers=2, chunk_size=2), executor=pool)
            assert all(
                np.array_equal(a.image, b.image) for a, b in zip(serial, res) if a.image is not None
            )
    for cfg in (
        CorruptConfig(num_workers=2, pool="thread", chunk_size=3),
        CorruptConfig(num_workers=2, pool="process", chunk_size=5),
    ):
        res = corrupt_many(items, cfg)
        assert [r.id for r in res] == [r.id for r in serial]
        for a, b in zip(serial, res):
            assert (a.error is None) == (b.error is None)
            if a.image is not None:
                np.testing.assert_array_equal(a.image, b.image)
                assert a.info == b.info


def test_quality_hand_computed():
    img = np.full((4, 4), 100, np.uint8)
    mask = np.zeros((4, 4), bool)
    mask[:2, :2] = True
    out = img.copy()
    out[0, 0] = 140  # inside: 1 of 4 changed by 40
    out[3, 3] = 90  # outside: 1 of 12 changed by 10
    q = corruption_quality(img, out, mask)
    assert q.frac_changed_inside == 0.25 and q.frac_changed_outside == pytest.approx(1 / 12)
    assert q.mean_abs_change == pytest.approx(50 / 16) and q.mean_abs_change_inside == 10.0
    assert q.ssim_inside is None  # a 2x2 box is below SSIM's 3 px window
    big = textured((32, 32))
    q = corruption_quality(big, big, disc((32, 32), 16, 16, 8))
    assert q.ssim_inside == pytest.approx(1.0) and q.frac_changed_inside == 0.0
    q = corruption_quality(big, corrupt(big, None, "noise", 0), None)
    assert q.frac_changed_outside is None and q.mask_fraction == 1.0


# --------------------------------------------------------------------------------------------
# real public data (../shared/realdata)
# --------------------------------------------------------------------------------------------


def _lesion_pairs(realdata: Path) -> list[dict]:
    with open(realdata / "lesions" / "manifest.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_real_lesions_every_kind(realdata):
    rows = _lesion_pairs(realdata)
    assert len(rows) == 8
    for row in rows:
        img = load_image(realdata / row["image"])  # names with spaces and parentheses
        mask = load_mask(realdata / row["mask"])  # 1-bit PNG (BUSI) or noisy JPEG (MSD)
        assert img.shape[:2] == (int(row["height"]), int(row["width"])) == mask.shape
        # The binarised foreground matches the manifest's fraction (4 decimals).
        assert abs(mask.mean() - float(row["mask_fg_fraction"])) < 1e-4
        n = int(mask.sum())
        for kind in KINDS:
            out = corrupt(img, mask, kind, seed=derive_seed(0, row["image"]))
            assert out.shape == img.shape and out.dtype == np.uint8
            q = corruption_quality(img, out, mask)
            if kind in CHANGES_OUTSIDE_MASK:
                continue
            np.testing.assert_array_equal(out[~mask], img[~mask])
            assert q.frac_changed_outside == 0.0
            if kind == "noise":
                # A pixel keeps its value only if round(45z) = 0 (P = 0.009) or the noise pushes
                # it into a clip it already sits on: at worst (value 0 or 255) P(unchanged) =
                # 0.504, so >= 0.496 change; binomial slack 4 * sqrt(0.25 / n).
                assert q.frac_changed_inside >= 0.496 - 4 * math.sqrt(0.25 / n)
                # E|change| is 45 sqrt(2/pi) = 35.9 unclipped and 45 phi(0) = 17.95 for a pixel
                # at a clip; std of either is under 30, slack 4 * 30 / sqrt(n) (per channel).
                slack = 4 * 30 / math.sqrt(n)
                assert 17.95 - slack <= q.mean_abs_change_inside <= 35.9 + slack
    # Inpainting removes the BUSI masses (dark, well-defined): the mean-intensity gap between
    # the mask and a ring 3-8 px outside it falls from 50-120 grey levels to a few.
    for row in rows:
        if row["source"] != "busi":
            continue
        img, mask = load_image(realdata / row["image"]), load_mask(realdata / row["mask"])
        out = corrupt(img, mask, "inpaint", 0)
        ring = dilate_mask(mask, 8) & ~dilate_mask(mask, 3)
        gap_before = abs(float(img[mask].mean()) - float(img[ring].mean()))
        gap_after = abs(float(out[mask].mean()) - float(out[ring].mean()))
        assert gap_after < 0.25 * gap_before, (row["image"], gap_before, gap_after)


def test_real_vqarad_images_through_the_fallbacks(realdata):
    images = sorted((realdata / "vqarad" / "images").glob("*.jpg"))
    assert len(images) == 30
    qa = json.loads((realdata / "vqarad" / "testset.json").read_text())
    prompts: dict[str, str | None] = {}
    for r in qa:
        if prompts.get(r["image_name"]) is None:
            prompts[r["image_name"]] = prompt_from_qa(r["question"], str(r["answer"]))
    seg = get_segmenter("classical")
    cfg = CorruptConfig(quality=True)
    paths = set()
    for p in images:
        img = load_image(p)
        h, w = img.shape[:2]
        out, info = corrupt_for_record(img, None, prompts.get(p.name), seg, cfg, record_id=p.name)
        assert out.shape == img.shape and out.dtype == np.uint8
        paths.add(info["path"])
        q = info["quality"]
        if info["path"] == "segmenter":
            assert q["frac_changed_outside"] == 0.0 and 0 < info["mask_fraction"] < 0.3
        else:
            assert info["path"] in ("no_prompt", "not_found") and info["sigma"] == 12
            # Whole-image sigma 12 on pixels 5 sigma from either clip: std sqrt(144 + 1/12)
            # (first channel; the noise is i.i.d. over channels).
            c0, o0 = img.reshape(h, w, -1)[..., 0], out.reshape(h, w, -1)[..., 0]
            mid = (c0 >= 60) & (c0 <= 195)
            if mid.sum() > 10_000:
                assert abs((o0[mid].astype(np.int16) - c0[mid]).std() - 12.003) < 0.3
        # A central box (a tenth of each side): every kind but crop keeps the rest of the image.
        box = box_mask([0.45 * w, 0.45 * h, 0.55 * w, 0.55 * h], (h, w))
        outside = ~box if img.ndim == 2 else ~box[..., None]
        for kind in KEEPS_OUTSIDE:
            assert not ((corrupt(img, box, kind, 1) != img) & outside).any(), kind
    assert "segmenter" in paths and len(paths) >= 2


def test_ssim_matches_scikit_image():
    from skimage.metrics import structural_similarity

    from fire_mpo_core.corruption.quality import ssim

    for shape, win in (((40, 50), 7), ((33, 21, 3), 5), ((9, 9), 3)):
        a = textured(shape, seed=5)
        for kind in ("noise", "blur", "black"):
            m = disc(shape[:2], shape[0] / 2, shape[1] / 2, min(shape[:2]) / 3)
            b = corrupt(a, m, kind, 0)
            ref = structural_similarity(
                a, b, win_size=win, data_range=255, channel_axis=-1 if a.ndim == 3 else None
            )
            assert ssim(a, b, win_size=win) == pytest.approx(ref, abs=1e-6)


@pytest.mark.parametrize("method", ["telea", "ns"])
def test_inpaint_on_a_crop_equals_inpaint_on_the_full_image(method):
    # `inpaint` works on a padded crop around the hole; the result must equal OpenCV's on the
    # whole image with the same dilated hole, written back inside the mask.
    rng = np.random.default_rng(4)
    img = cv2.GaussianBlur(rng.integers(0, 256, (90, 120, 3), dtype=np.uint8), (9, 9), 3)
    for cy, cx, r in ((45, 60, 12), (3, 5, 6), (88, 118, 9)):  # middle, corners (clipped crops)
        mask = disc((90, 120), cy, cx, r)
        hole = dilate_mask(mask, 2).astype(np.uint8)
        flag = cv2.INPAINT_TELEA if method == "telea" else cv2.INPAINT_NS
        full = cv2.inpaint(img, hole, 3.0, flag)
        expected = img.copy()
        expected[mask] = full[mask]
        np.testing.assert_array_equal(corrupt(img, mask, "inpaint", 0, method=method), expected)
