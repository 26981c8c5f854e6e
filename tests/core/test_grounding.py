"""Visual-grounding metrics: hand-worked attention ratios and patch coverage, the grounding
probes (truth on v and on v'), and the measurements on the tiny LLaVA / Qwen2-VL models."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError

from fire_mpo_core.config import EvaluateConfig
from fire_mpo_core.corruption.ops import dilate_mask
from fire_mpo_core.data.io import load_records, open_image
from fire_mpo_core.evaluation.grounding import (
    _mask,
    answer_logprobs,
    attention_ratios,
    evenly,
    lesion_attention_ratio,
    patch_coverage,
    removed_image,
)
from fire_mpo_core.evaluation.probes import build_probes
from fire_mpo_core.evaluation.vqa import evaluate_policy, evaluate_with_selection
from fire_mpo_core.models import encode_batch, load_model, load_processor
from fire_mpo_core.policy import PolicyRef


def test_lesion_attention_ratio_hand_worked():
    # T = 6: image tokens at 1..4 (patch 1 fully inside the lesion, area share 1/4), query 5.
    att0 = torch.zeros(2, 6, 6)
    att0[:, 5] = torch.tensor([0.0, 0.4, 0.1, 0.1, 0.1, 0.3])  # both heads alike
    att1 = torch.zeros(2, 6, 6)
    att1[0, 5] = torch.tensor([0.0, 0.1, 0.1, 0.1, 0.1, 0.6])
    att1[1, 5] = torch.tensor([0.0, 0.3, 0.1, 0.1, 0.1, 0.4])
    cov = torch.tensor([1.0, 0.0, 0.0, 0.0])
    got = lesion_attention_ratio([att0, att1], torch.tensor([5]), torch.arange(1, 5), cov)
    # Layer 0: a = [.4, .1, .1, .1] -> share .4/.7 = 4/7, / (1/4) = 16/7.
    # Layer 1: head mean a = [.2, .1, .1, .1] -> share .2/.5 = 2/5, / (1/4) = 8/5.
    assert got == pytest.approx([16 / 7, 8 / 5])
    # Half of patch 1 and half of patch 2 inside: share (.4*.5 + .1*.5)/.7 = 5/14, area 1/4.
    half = torch.tensor([0.5, 0.5, 0.0, 0.0])
    assert lesion_attention_ratio([att0], torch.tensor([5]), torch.arange(1, 5), half) == (
        pytest.approx([10 / 7])
    )
    # No lesion area: undefined.
    assert math.isnan(
        lesion_attention_ratio([att0], torch.tensor([5]), torch.arange(1, 5), torch.zeros(4))[0]
    )


def test_patch_coverage_whole_image_and_clip_centre_crop():
    m = np.zeros((8, 8), bool)
    m[:2, :2] = True  # a quarter of the top-left 4x4 patch
    assert patch_coverage(m, (2, 2)).tolist() == [0.25, 0.0, 0.0, 0.0]
    m[6:, 4:] = True  # all of the bottom-right 2x4 cell row of a 4x2 grid
    assert patch_coverage(m, (4, 2)).tolist() == [0.5, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    # CLIP: 8x12 image, shortest edge -> 4, centre crop 4x4 = the original's columns 2..9.
    wide = np.zeros((8, 12), bool)
    wide[:, :2] = True  # cut away by the crop
    assert patch_coverage(wide, (2, 2), crop=(4, 4, 4)).tolist() == [0.0] * 4
    wide[:4, 2:6] = True  # the crop's top-left quarter
    assert patch_coverage(wide, (2, 2), crop=(4, 4, 4)).tolist() == [1.0, 0.0, 0.0, 0.0]


def test_evenly():
    assert evenly(list(range(10)), 4) == [0, 2, 5, 7]
    assert evenly([1, 2], 5) == [1, 2]


@pytest.fixture(scope="module")
def tiny(tiny_world):
    """SynthLesion (8 train / 6 test scans) and both tiny architectures, untrained."""
    sizes = {"hidden_size": 64, "num_heads": 2, "vocab_size": 300, "patch_size": 16}
    return tiny_world(
        data={"n_train_images": 8, "n_val_images": 0, "n_test_images": 6},
        data_defaults={},
        data_dir="",
        models={arch: {"arch": arch, **sizes} for arch in ("llava", "qwen2_vl")},
    )["root"]


def test_removed_image_changes_only_the_grown_lesion(tiny):
    rec = next(r for r in load_records(tiny, splits=("test",)) if r.mask)
    before = np.asarray(open_image(tiny, rec.image)).astype(int)
    after = np.asarray(removed_image(tiny, rec.image, [rec.mask], 2, "inpaint")).astype(int)
    inside = _mask(tiny, rec, before.shape[:2])
    grown = dilate_mask(inside, 2)
    assert np.array_equal(before[~grown], after[~grown])
    assert np.abs(before[inside] - after[inside]).mean() > 5  # the lesion is painted over


def test_probes_by_kind_hand_counted(tiny):
    recs = load_records(tiny, splits=("test",))
    scans = {r.image: r for r in recs}
    n1 = sum(len(r.lesions) == 1 for r in scans.values())
    n2 = sum(len(r.lesions) == 2 for r in scans.values())
    n0 = sum(not r.lesions for r in scans.values())
    probes = build_probes(recs)
    kinds = [p.kind for p in probes]
    # Per lesion scan: presence + count + one quadrant probe per lesion; per 2-lesion scan also
    # (presence, count, other quadrant) x 2 keep probes; per lesion-free scan one presence probe.
    assert kinds.count("remove") == 3 * n1 + 4 * n2
    assert kinds.count("keep") == 6 * n2
    assert kinds.count("free") == n0
    for p in probes:
        if p.kind == "remove" and p.question_type == "presence":
            assert (p.truth, p.truth_removed) == ("yes", "no")
            assert set(p.remove) == {le.mask for le in scans[p.image].lesions}
        if p.kind == "keep" and p.question_type == "count":
            assert (p.truth, p.truth_removed, len(p.remove)) == ("two", "one", 1)
        if p.kind == "free":
            assert p.truth == "no" and p.remove == () and p.truth_removed is None
    assert len({p.id for p in probes}) == len(probes)
    assert build_probes([r.model_copy(update={"dataset": "slake"}) for r in recs]) == []


def test_answer_logprobs_match_the_models_own_loss(tiny):
    torch.set_num_threads(1)
    model, proc = load_model(tiny / "llava"), load_processor(tiny / "llava")
    recs = load_records(tiny, splits=("test",))[:3]
    imgs = [open_image(tiny, r.image) for r in recs]
    got = answer_logprobs(
        model, proc, imgs, [r.question for r in recs], [r.answer for r in recs], 2
    )
    for r, img, lp in zip(recs, imgs, got):
        b = encode_batch(proc, [img], [r.question], [r.answer])
        with torch.no_grad():
            loss = model(**{k: v for k, v in b.items() if k not in ("span_mask",
                         "response_truncated")}).loss  # fmt: skip
        n = int((b["labels"] != -100).sum())  # HF: mean NLL over the (shifted) label tokens
        assert lp == pytest.approx(-loss.item() * n, rel=1e-4)


@pytest.mark.parametrize("arch", ["llava", "qwen2_vl"])
def test_attention_ratios_on_tiny_models(tiny, arch, tmp_path):
    torch.set_num_threads(1)
    model, proc = load_model(tiny / arch), load_processor(tiny / arch)
    before = model.config._attn_implementation
    recs = [r for r in load_records(tiny, splits=("test",)) if r.mask][:3]
    got = attention_ratios(model, proc, tiny, recs, bs=2)
    assert model.config._attn_implementation == before  # restored after the eager pass
    layers = model.config.text_config.num_hidden_layers
    assert all(len(x) == layers and all(v > 0 and math.isfinite(v) for v in x) for x in got)
    # A "lesion" covering the whole image: every image token is fully inside -> ratio 1.
    full = tiny / "masks" / "full.png"
    Image.fromarray(np.full((64, 64), 255, np.uint8)).save(full)
    whole = [r.model_copy(update={"mask": "masks/full.png"}) for r in recs]
    for ratios in attention_ratios(model, proc, tiny, whole, bs=2):
        assert ratios == pytest.approx([1.0] * layers)


def test_evaluate_policy_writes_grounding_metrics(tiny, tmp_path):
    torch.set_num_threads(1)
    cfg = EvaluateConfig(max_new_tokens=4, grounding_max_samples=5)
    m = evaluate_policy(PolicyRef(base=str(tiny / "llava")), tiny, cfg, tmp_path / "g")
    on_disk = json.loads((tmp_path / "g" / "metrics.json").read_text())
    assert on_disk == {k: v for k, v in m.items() if k != "samples_per_second"}
    assert all(v is None or isinstance(v, int | float) for v in on_disk.values())  # flat
    for key in (
        "grounded_accuracy",
        "keep_accuracy",
        "blind_accuracy",
        "lesion_attention_ratio_l1",
    ):
        assert key in on_disk
    # Every headline rate carries its n and a 95% interval around it.
    for key in ("grounded_accuracy", "closed_lesion_accuracy", "presence_accuracy_truth_no"):
        n, lo, hi = (on_disk[f"{key}_{s}"] for s in ("n", "ci_low", "ci_high"))
        assert n > 0 and 0.0 <= lo <= on_disk[key] <= hi <= 1.0
    assert 0 < on_disk["n_blind"] <= 5
    rows = [json.loads(x) for x in (tmp_path / "g" / "grounding.jsonl").read_text().splitlines()]
    measures = {r["measure"] for r in rows}
    assert {"probe_remove", "blind", "attention"} <= measures
    # Right on both means right on v and right on v', row by row.
    for r in rows:
        if r["measure"] == "probe_remove":
            assert r["right_both"] == (r["right"] and r["right_removed"])
    off = evaluate_policy(
        PolicyRef(base=str(tiny / "llava")),
        tiny,
        EvaluateConfig(max_new_tokens=4, grounding=False),
        tmp_path / "n",
    )
    assert "grounded_accuracy" not in off and not (tmp_path / "n" / "grounding.jsonl").exists()
    assert off["closed_accuracy"] == m["closed_accuracy"]  # grounding does not touch answers


def test_evaluate_with_selection_scores_val_apart_from_test(tiny_world, tmp_path):
    """The selection pass scores the val split (capped) beside the test metrics; when it is the
    same pass as the main one it is reused, not run twice."""
    torch.set_num_threads(1)
    tiny = tiny_world(
        data={"n_train_images": 8, "n_val_images": 2, "n_test_images": 2},
        data_dir="",
        models={"llava": {"hidden_size": 64, "num_heads": 2, "vocab_size": 300}},
    )["root"]
    policy = PolicyRef(base=str(tiny / "llava"))
    cfg = EvaluateConfig(max_new_tokens=4, grounding=False, selection_max_samples=3)
    test, val = evaluate_with_selection(policy, tiny, cfg, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "val_metrics.json").read_text()) == {
        k: v for k, v in val.items() if k != "samples_per_second"
    }
    val_rows = (tmp_path / "a" / "val" / "data.jsonl").read_text().splitlines()
    assert len(val_rows) == 3 and all(json.loads(r)["id"].startswith("val-") for r in val_rows)
    assert test["n_closed"] + test["n_open"] + test["n_report"] > 3
    same = cfg.model_copy(update={"split": "val", "max_samples": 3})
    main, again = evaluate_with_selection(policy, tiny, same, tmp_path / "b")
    assert again is main and not (tmp_path / "b" / "val").exists()
    off = cfg.model_copy(update={"selection_split": None})
    assert evaluate_with_selection(policy, tiny, off, tmp_path / "c")[1] is None
    assert not (tmp_path / "c" / "val_metrics.json").exists()


def test_evaluate_config_fails_fast_naming_the_field():
    with pytest.raises(ValidationError, match="grounding_max_samples"):
        EvaluateConfig(grounding_max_samples=0)
    with pytest.raises(ValidationError, match="sensitivity_corruption"):
        EvaluateConfig(sensitivity_corruption="noise")
    with pytest.raises(ValidationError, match="llm_judge"):
        EvaluateConfig(llm_judge={"base_urls": ["ftp://x"]})
