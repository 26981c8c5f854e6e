"""Reward-hacking and health diagnostics (fire_mpo_core/training/health.py) and the report's
Health section and plots (fire_mpo_core/report/health.py), on hand-made pairs, training logs
and stage folders; every expected number is derived by hand in the comments.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/core/test_health.py
"""

from __future__ import annotations

import base64
import json
import re

import cv2
import numpy as np
import pytest
from pydantic import ValidationError

from fire_mpo_core.data.records import PreferencePair
from fire_mpo_core.report import cycle_report
from fire_mpo_core.report.health import health_section, write_plots
from fire_mpo_core.store import ArtifactStore, write_jsonl
from fire_mpo_core.training.config import HealthConfig, TrainConfig
from fire_mpo_core.training.health import (
    HEALTH_FILE,
    HealthCheckFailed,
    RoundHealth,
    check,
    pair_diagnostics,
    read_train_log,
    training_diagnostics,
    word_edit_distance,
)


def pair(pid: str, chosen: str, rejected: str, cs, rs) -> PreferencePair:
    return PreferencePair(
        id=pid,
        record_id=pid,
        image="images/a.png",
        question="q?",
        answer_type="open",
        chosen=chosen,
        rejected=rejected,
        chosen_spans=cs,
        rejected_spans=rs,
        verdict="incorrect",
    )


# P1: a minimal edit (7 words each, "left" -> "right": 1 word); "The lesion is in the " = 21 chars.
# P2: a ground-truth-style chosen of 11 words against a bare "no" (nothing in common).
# P3: a bare answer pair, 1 word each.
PAIRS = [
    pair(
        "p1",
        "The lesion is in the left lung.",
        "The lesion is in the right lung.",
        [(21, 25)],
        [(21, 26)],
    ),
    pair(
        "p2", "Yes, a focal lesion is present in the left lower quadrant.", "no", [(0, 3)], [(0, 2)]
    ),
    pair("p3", "yes", "no", [(0, 3)], [(0, 2)]),
]


def test_word_edit_distance_is_levenshtein_over_words():
    assert (
        word_edit_distance(["the", "lesion", "is", "left"], ["the", "lesion", "is", "right"]) == 1
    )
    assert word_edit_distance(["no", "lesion"], ["no", "focal", "lesion"]) == 1  # one insert
    assert word_edit_distance([], ["a", "b"]) == 2
    assert word_edit_distance(list("abc"), list("cba")) == 2  # a<->c substituted, b kept
    assert word_edit_distance(list("kitten"), list("sitting")) == 3  # the classic, per letter


def test_pair_diagnostics_by_hand():
    d = pair_diagnostics(PAIRS, min_words=4)
    assert d["pairs"] == 3
    assert d["length_gap_words"] == round((0 + 10 + 0) / 3, 4)  # 3.3333
    assert d["chosen_longer_share"] == round(1 / 3, 4)
    # Normalised over pairs of >= 4 words (P1: 1/7, P2: 11/11); P3 is a bare answer.
    assert d["edit_distance"] == round((1 / 7 + 1.0) / 2, 4) and d["edit_distance_pairs"] == 2
    assert d["edit_distance_words"] == round((1 + 11 + 1) / 3, 4)
    # Span words: 1 + 1 (P1), 1 + 1 (P2), 1 + 1 (P3) of 14 + 12 + 2 words.
    assert d["span_word_share"] == round(6 / 28, 4)
    assert pair_diagnostics([])["length_gap_words"] is None


def test_pair_checks_warn_with_value_threshold_and_meaning():
    flags = check({"pairs": pair_diagnostics(PAIRS)}, HealthConfig())
    assert [f.name for f in flags] == ["length_gap", "edit_distance"]
    assert flags[0].message == (
        "chosen answers are 3.3 words longer than rejected (threshold 3.0): the judge or the "
        "data may be teaching length, not correctness"
    )
    assert flags[1].value == 0.5714 and flags[1].threshold == 0.5
    # The gap is flagged by its size: rejected answers 4 words longer trip it too.
    short = check({"pairs": {"length_gap_words": -4.0}}, HealthConfig())
    assert "4.0 words shorter than rejected" in short[0].message
    # None switches a check off.
    assert check({"pairs": pair_diagnostics(PAIRS)}, HealthConfig(max_length_gap_words=None,
                 max_edit_distance=None)) == []  # fmt: skip


ROWS = [  # steps 10..80; tail_fraction 0.25 of 8 rows = the last 2 (and the first 2)
    {"step": 10 * (i + 1), "rewards/accuracy": a, "grad_norm": g, "kl/forward": kf,
     "kl/reverse": kr, "rewards/margin": 0.01 * 10 * (i + 1), "loss": 0.6}
    for i, (a, g, kf, kr) in enumerate(zip(
        [0.5, 0.75, 0.9, 1.0, 1.0, 0.995, 1.0, 0.98],
        [4.0, 2.0, 1.0, 0.5, 0.2, 0.1, 0.02, 0.02],
        [0.0, 0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
        [0.0, 0.4, 0.8, 1.5, 2.0, 3.0, 4.0, 4.5],
        strict=True,
    ))
]  # fmt: skip


def test_training_diagnostics_by_hand(tmp_path):
    lines = [json.dumps(r) for r in ROWS] + [json.dumps({"kind": "health", "step": 80})]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    rows = read_train_log(tmp_path)
    assert rows == ROWS  # the health record is not a step row
    d = training_diagnostics(rows, tail_fraction=0.25, saturation_accuracy=0.99)
    assert d["logged_steps"] == 8 and d["final_step"] == 80
    assert d["reward_accuracy_final"] == 0.98
    assert d["accuracy_saturation"] == 0.5  # last two: 1.0 (>= 0.99) and 0.98 (not)
    assert d["kl_forward_final"] == 6.0 and d["kl_forward_growth"] == 6.0
    assert d["kl_reverse_final"] == 4.5 and d["kl_reverse_growth"] == 4.5
    assert d["grad_norm_early"] == 3.0 and d["grad_norm_late"] == 0.02  # (4+2)/2, (.02+.02)/2
    assert d["grad_norm_ratio"] == round(0.02 / 3.0, 6)
    assert d["reward_margin_first"] == 0.1 and d["reward_margin_final"] == 0.8
    assert d["reward_margin_slope"] == pytest.approx(0.01)  # margin = 0.01 * step exactly
    flags = {f.name for f in check({"training": d}, HealthConfig())}
    assert flags == {"kl_forward", "grad_norm_collapse"}  # 6 > 5; 0.0067 < 0.01
    # Trend checks wait for min_logged_steps rows; the final KL does not.
    late = check({"training": d}, HealthConfig(min_logged_steps=9))
    assert [f.name for f in late] == ["kl_forward"]
    # One logged row: early = late, no slope, no growth.
    one = training_diagnostics(ROWS[:1])
    assert one["grad_norm_ratio"] == 1.0 and one["reward_margin_slope"] is None
    assert one["accuracy_saturation"] == 0.0 and one["kl_forward_growth"] == 0.0


def test_health_config_errors_name_the_field():
    with pytest.raises(ValidationError, match="max_edit_distance"):
        TrainConfig(health={"max_edit_distance": 2})
    with pytest.raises(ValidationError, match="max_lenght_gap"):
        TrainConfig(health={"max_lenght_gap": 2})
    assert TrainConfig().health == HealthConfig() and not TrainConfig().health.fail


def _round_dir(tmp_path, name: str, rows: list[dict]) -> object:
    d = tmp_path / name
    d.mkdir()
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_jsonl(d / "pairs.jsonl", PAIRS)
    return d


def test_round_health_files_lineage_and_fail(tmp_path):
    warned: list[str] = []
    r1 = _round_dir(tmp_path, "r1", ROWS)
    h1 = RoundHealth(HealthConfig(), 1, previous=None, warn=warned.append)
    h1.check_pairs(r1 / "pairs.jsonl")
    assert warned == [
        "round 1 health: chosen answers are 3.3 words longer than rejected (threshold 3.0): the "
        "judge or the data may be teaching length, not correctness",
        "round 1 health: chosen and rejected differ in 0.57 of their words (threshold 0.50): the "
        "pairs are rewrites, not minimal edits; style is learned with the facts",
    ]
    counts = h1.finish(r1)
    assert len(warned) == 4  # + KL forward and grad-norm collapse
    assert counts["health/warnings"] == 4
    assert counts["health/flagged"] == "length_gap, edit_distance, kl_forward, grad_norm_collapse"
    assert counts["health/length_gap_words"] == 3.3333 and counts["health/kl_forward_final"] == 6.0
    lines = (r1 / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines[:-1]] == ROWS  # step rows untouched
    record = json.loads(lines[-1])
    assert record["kind"] == "health" and record["step"] == 80 and record["round"] == 1
    assert record["pairs"]["pairs"] == 3 and record["training"]["kl_forward_final"] == 6.0
    h1.finish(r1)  # a retried stage: still one health record, last
    assert (
        sum('"kind": "health"' in x for x in (r1 / "metrics.jsonl").read_text().splitlines()) == 1
    )
    # Round 2 reads round 1's health.json through its policy input (round 1's train folder).
    r2 = _round_dir(tmp_path, "r2", ROWS[:2])
    h2 = RoundHealth(HealthConfig(max_length_gap_words=None), 2, previous=r1, warn=warned.append)
    h2.check_pairs(r2 / "pairs.jsonl")
    h2.finish(r2)
    by_round = json.loads((r2 / HEALTH_FILE).read_text())["by_round"]
    assert [r["round"] for r in by_round] == [1, 2]
    assert by_round[0]["kl_forward_final"] == 6.0 and by_round[1]["kl_forward_final"] == 0.5
    assert "thresholds" not in json.loads((r2 / HEALTH_FILE).read_text())  # values only
    # fail: the pair check raises with the reason, before any training.
    with pytest.raises(HealthCheckFailed, match=r"chosen answers are 3\.3 words longer"):
        RoundHealth(HealthConfig(fail=True), 1).check_pairs(r1 / "pairs.jsonl")


def _train_folder(store: ArtifactStore, k: int, health: dict, rows: list[dict]):
    def build(w):
        (w.path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        write_jsonl(w.path / "pairs.jsonl", PAIRS)
        h = RoundHealth(HealthConfig(**health), k, warn=lambda _: None)
        h.check_pairs(w.path / "pairs.jsonl")
        return h.finish(w.path)

    cfg = {"train": TrainConfig(health=health).model_dump(mode="json")}
    return store.run_stage(
        run="r", round_=k, stage="train", config=cfg, inputs={}, code="t", fn=build
    ).path


def test_report_health_section_and_plots_are_valid_pngs(tmp_path):
    store = ArtifactStore(tmp_path / "store")
    trains = {
        1: _train_folder(store, 1, {}, ROWS),
        2: _train_folder(store, 2, {"max_length_gap_words": 5.0, "max_kl": None}, ROWS[:4]),
    }
    evals = {}
    for k, acc in ((0, 0.5), (1, 0.625), (2, 0.75)):
        d = tmp_path / f"e{k}"
        d.mkdir()
        m = {"closed_accuracy": acc, "closed_accuracy_ci_low": acc - 0.1}
        (d / "metrics.json").write_text(json.dumps({**m, "closed_accuracy_ci_high": acc + 0.1}))
        evals[k] = d
    table = health_section(trains)
    # Each round is flagged under the thresholds its own folder was keyed with (manifest).
    row1 = next(x for x in table.splitlines() if x.startswith("| 1 |"))
    row2 = next(x for x in table.splitlines() if x.startswith("| 2 |"))
    assert "**3.333** ⚠" in row1 and "**6.000** ⚠" in row1  # gap > 3; KL fwd 6 > 5
    assert "| 3.333 |" in row2 and "**2.000** ⚠" not in row2  # gap < 5; no KL check
    assert "- ⚠ round 1: chosen answers are 3.3 words longer than rejected" in table
    pngs = write_plots(trains, evals, tmp_path / "report", ("closed_accuracy",))
    assert sorted(p.name for p in pngs.values()) == [
        "health_by_round.png",
        "metrics_by_round.png",
        "training_curves.png",
    ]
    for path in pngs.values():
        img = cv2.imread(str(path))
        assert img is not None and img.shape[0] > 200 and img.shape[1] > 300
        assert img.std() > 10  # not a blank canvas
    md = cycle_report("demo", evals, trains=trains, plots_dir=tmp_path / "report2")
    assert "## Health" in md and "length gap (words)" in md
    uris = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", md)
    assert len(uris) == 3
    for u in uris:
        png = cv2.imdecode(np.frombuffer(base64.b64decode(u), np.uint8), cv2.IMREAD_COLOR)
        assert png is not None and png.shape[1] > 300
    # No train folders given: no Health section (the report of a run without rounds).
    assert "## Health" not in cycle_report("demo", evals)
