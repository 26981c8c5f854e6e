"""The loop's continue / stop decision (fire_mpo_core/loop/decide.py), every branch by hand.

OMP_NUM_THREADS=1 python -m pytest -q tests/core/test_loop_decide.py
"""

from __future__ import annotations

import json

import pytest

from fire_mpo_core.config import ConfigError, load_config
from fire_mpo_core.loop.config import LoopConfig
from fire_mpo_core.loop.decide import LoopDecision, RoundScore, decide, scores_from_history


def hist(*values: float | None) -> list[RoundScore]:
    return [RoundScore(round=k, value=v) for k, v in enumerate(values)]


def test_first_round_is_an_improvement_with_nothing_to_compare():
    d = decide(hist(0.41), LoopConfig())
    assert (d.round, d.value, d.previous, d.change) == (0, 0.41, None, None)
    assert (d.best_round, d.best_value, d.improved) == (0, 0.41, True)
    assert (d.rounds_without_improvement, d.action) == (0, "continue")
    assert d.reason == "first value of grounded_accuracy: 0.41 in round 0"


def test_improvement_over_the_margin_continues():
    d = decide(hist(0.41, 0.45), LoopConfig(min_improvement=0.01))
    # 0.45 > 0.41 + 0.01; change = 0.45 - 0.41 = 0.04
    assert d.improved and d.action == "continue" and d.rounds_without_improvement == 0
    assert (d.previous, d.change, d.best_round, d.best_value) == (0.41, 0.04, 1, 0.45)
    assert d.reason == "improved 0.41 -> 0.45 (+0.04 > margin 0.01)"


def test_gain_within_the_margin_is_no_improvement_but_the_best_still_moves():
    # 0.415 > 0.41 but not > 0.41 + 0.01: not improved; patience 2 leaves one round to go.
    d = decide(hist(0.41, 0.415), LoopConfig(min_improvement=0.01, patience=2))
    assert not d.improved and d.action == "continue" and d.rounds_without_improvement == 1
    assert (d.best_round, d.best_value, d.change) == (1, 0.415, 0.005)
    assert d.reason == (
        "no improvement: 0.41 -> 0.415 (+0.005 <= margin 0.01); 1 of 2 rounds of patience used"
    )


def test_patience_reached_stops():
    # Round 1 improves (0.5 > 0.4); rounds 2 (0.45) and 3 (0.5, a tie with the best) do not.
    d = decide(hist(0.4, 0.5, 0.45, 0.5), LoopConfig(patience=2))
    assert (d.improved, d.rounds_without_improvement, d.action) == (False, 2, "stop")
    assert (d.previous, d.change) == (0.45, 0.05)
    assert (d.best_round, d.best_value) == (1, 0.5)  # the tie keeps the earlier round
    assert d.reason == (
        "no improvement: 0.5 -> 0.5 (+0 <= margin 0); no improvement for 2 rounds (patience 2)"
    )


def test_a_tie_is_no_improvement():
    d = decide(hist(0.5, 0.5), LoopConfig())
    assert not d.improved and d.best_round == 0 and d.action == "stop"
    assert d.reason.endswith("no improvement for 1 round (patience 1)")


def test_improvement_resets_the_streak():
    # 0.5, 0.4 (miss), 0.6 (improves on 0.5): the streak is 0 again.
    d = decide(hist(0.5, 0.4, 0.6), LoopConfig(patience=2))
    assert d.improved and d.rounds_without_improvement == 0 and d.action == "continue"


def test_max_rounds_stops_even_after_an_improvement():
    d = decide(hist(0.1, 0.2, 0.3), LoopConfig(max_rounds=2))
    assert d.improved and d.action == "stop"
    assert d.reason == "improved 0.2 -> 0.3 (+0.1 > margin 0); reached max_rounds 2"


def test_a_missing_value_counts_as_no_improvement():
    d = decide(hist(0.4, None), LoopConfig(patience=2))
    assert (d.value, d.change, d.improved, d.rounds_without_improvement) == (None, None, False, 1)
    assert (d.best_round, d.best_value, d.action) == (0, 0.4, "continue")
    assert d.reason == (
        "grounded_accuracy missing in round 1 (counts as no improvement); "
        "1 of 2 rounds of patience used"
    )
    # The round after a missing one has no previous value, but is compared with the best.
    d = decide(hist(0.4, None, 0.5), LoopConfig(patience=2))
    assert (d.previous, d.change, d.improved, d.best_round) == (None, None, True, 2)


def test_no_value_at_all_has_no_best():
    d = decide(hist(None), LoopConfig())
    assert (d.best_round, d.best_value, d.improved, d.action) == (None, None, False, "stop")


def test_decision_is_json_and_reads_back():
    d = decide(hist(0.41, 0.45), LoopConfig())
    assert LoopDecision.model_validate(json.loads(d.model_dump_json())) == d


def test_history_must_be_ordered():
    with pytest.raises(ValueError, match="increasing"):
        decide([RoundScore(round=1, value=0.1), RoundScore(round=0, value=0.2)], LoopConfig())
    with pytest.raises(ValueError, match="at least one"):
        decide([], LoopConfig())


def test_scores_from_history_rows():
    rows = [{"round": 0, "val_grounded_accuracy": 0.4, "grounded_accuracy": 0.9}, {"round": 1}]
    assert scores_from_history(rows, "grounded_accuracy") == hist(0.4, None)


def test_loop_config_checks(tmp_path):
    with pytest.raises(ValueError, match="'blind_accuracy' is not a ranking metric"):
        LoopConfig(metric="blind_accuracy")
    with pytest.raises(ValueError, match="patience"):
        LoopConfig(patience=0)
    cfg = load_config(overrides={"loop.reference": "previous_round", "rounds": 2})
    assert cfg.loop.reference == "previous_round" and cfg.loop.max_rounds == 5
    with pytest.raises(ConfigError, match=r"rounds 6 exceeds loop\.max_rounds 5"):
        load_config(overrides={"rounds": 6})
    with pytest.raises(ConfigError, match=r"loop\.reference .previous_round.*train\.strategy"):
        load_config(
            overrides={
                "loop.reference": "previous_round",
                "train.strategy": "fsdp",
                "train.num_processes": 2,
            }
        )
