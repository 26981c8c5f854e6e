"""Issue 18, item 6, done-when: a deliberately hacking configuration trips the length-gap
warning, through the real judge -> corrupt -> reference -> train stage bodies on the tiny world.

The hacking configuration is a real one: `judge.style: gt_style` (the paper's ground-truth-style
ablation) makes the chosen side the dataset's verbose reference ("Yes, a focal lesion is
present.") while the rejected side is the policy's short wrong answer ("no"), so every pair
rewards saying more. The rollouts are the tiny world's wrong answers (a policy that is always
wrong), written as a finished `sample` folder; the same rollouts judged `on_policy` (minimal
edits) are the control. With `train.health.fail` the train stage fails with the reason before
any training step.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/tasks/test_health_stage.py
"""

from __future__ import annotations

import json
import logging
import re
import shutil

import pytest

from fire_mpo_core.data.records import Rollout
from fire_mpo_core.policy import PolicyRef, write_policy
from fire_mpo_core.store import ArtifactStore, write_jsonl
from fire_mpo_core.training.config import ReferenceConfig, TrainConfig
from fire_mpo_core.training.health import HEALTH_FILE, HealthCheckFailed
from tasks import corrupt as corrupt_task
from tasks import judge as judge_task
from tasks import reference as reference_task
from tasks import train as train_task
from testing_support.stage_inputs import finished, run_body, wrong_answers

#: The trainer's tiny model on a world with 4 questions per scan (more question types, so more
#: records with a wrong answer of their kind to give).
WORLD = {
    "data": {"image_size": 32, "n_train_images": 8, "questions_per_image": 4},
    "models": {
        "base": {
            "hidden_size": 64,
            "num_heads": 2,
            "vocab_size": 300,
            "vision_hidden_size": 32,
            "vision_layers": 1,
        }
    },
}
TRAIN = {"max_steps": 2, "batch_size": 4, "save_every": None, "logging_every": 1}
GAP_WARNING = (
    r"round 1 health: chosen answers are \d+\.\d words longer than rejected \(threshold 3\.0\): "
    r"the judge or the data may be teaching length, not correctness"
)


pytestmark = pytest.mark.usefixtures("no_progress_bars")


@pytest.fixture(scope="module")
def setup(tiny_world, tmp_path_factory):
    """A store with finished prepare (the world's data), policy (its tiny base) and sample
    (every record's wrong answers) folders."""
    world = tiny_world(**WORLD)
    store = ArtifactStore(tmp_path_factory.mktemp("health") / "store")
    prep = finished(
        store, "prepare", lambda p: shutil.copytree(world["data"], p, dirs_exist_ok=True)
    )
    policy = finished(
        store, "policy", lambda p: write_policy(p, PolicyRef(base=str(world["base"])))
    )
    records = world["records"]
    rollouts = [
        Rollout(id=f"{r.id}#{k}", record_id=r.id, sample_index=k, question=r.question,
                response=a, engine="hf", model_key="m", seed=0)
        for r, wrong in zip(records, wrong_answers(records), strict=True)
        for k, a in enumerate(dict.fromkeys(wrong))
    ]  # fmt: skip
    sample = finished(store, "sample", lambda p: write_jsonl(p / "data.jsonl", rollouts))
    return store, {"prepare": prep, "policy": policy, "sample": sample}


def round_inputs(setup, style: str, train: dict) -> dict:
    """judge (with `style`) -> corrupt -> reference: the train stage's inputs."""
    store, s = setup
    judged = run_body(store, "judge", judge_task.body, {"judge": {"style": style}},
                      {"prepare": s["prepare"], "sample": s["sample"]}).path  # fmt: skip
    corrupt = run_body(store, "corrupt", corrupt_task.body, {"corrupt": {"num_workers": 0}},
                       {"prepare": s["prepare"], "judge": judged}).path  # fmt: skip
    ref_cfg = ReferenceConfig.for_training(TrainConfig(**train)).model_dump(mode="json")
    ref_inputs = {"prepare": s["prepare"], "corrupt": corrupt, "policy": s["policy"]}
    ref = run_body(store, "reference", reference_task.body, {"reference": ref_cfg}, ref_inputs)
    return {**ref_inputs, "reference": ref.path}


def test_gt_style_judge_trips_the_length_gap_warning(setup, caplog):
    store = setup[0]
    inputs = round_inputs(setup, "gt_style", TRAIN)
    with caplog.at_level(logging.WARNING, logger="fire_mpo.train"):
        res = run_body(store, "train", train_task.body, {"train": TRAIN}, inputs, resumable=True)
    warnings = [r.getMessage() for r in caplog.records if r.name == "fire_mpo.train"]
    print("\n".join(warnings))  # what a user sees (pytest -s)
    assert any(re.fullmatch(GAP_WARNING, w) for w in warnings), warnings
    counts = res.manifest["counts"]
    assert counts["health/length_gap_words"] > 3.0
    assert "length_gap" in counts["health/flagged"].split(", ")
    assert counts["health/warnings"] == len(warnings)
    health = json.loads((res.path / HEALTH_FILE).read_text())
    assert health["pairs"]["length_gap_words"] == counts["health/length_gap_words"]
    assert health["training"]["logged_steps"] == 2 and health["by_round"][0]["round"] == 1
    log = [json.loads(x) for x in (res.path / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("kind") for r in log] == [None, None, "health"]  # steps 1, 2, then health


def test_on_policy_pairs_of_the_same_answers_do_not(setup, caplog):
    store = setup[0]
    inputs = round_inputs(setup, "on_policy", TRAIN)
    with caplog.at_level(logging.WARNING, logger="fire_mpo.train"):
        res = run_body(store, "train", train_task.body, {"train": TRAIN}, inputs, resumable=True)
    assert abs(res.manifest["counts"]["health/length_gap_words"]) < 1.0  # minimal edits
    assert "length_gap" not in res.manifest["counts"]["health/flagged"]
    assert not any("words longer" in r.getMessage() for r in caplog.records)


def test_fail_fails_the_train_stage_with_the_reason_before_training(setup):
    store = setup[0]
    train = {**TRAIN, "health": {"fail": True}}
    inputs = round_inputs(setup, "gt_style", train)
    with pytest.raises(HealthCheckFailed, match=GAP_WARNING) as err:
        run_body(store, "train", train_task.body, {"train": train}, inputs, resumable=True)
    assert "train.health.fail is set" in str(err.value)
    # No compute was spent: the working folder holds no training log, no adapter.
    partial = next((store.root / "r" / "round-1" / "train").glob(".partial-*"))
    assert not (partial / "metrics.jsonl").exists() and not (partial / "adapter").exists()
    # And Prefect does not retry it (a retry would fail the same way).
    state = type("State", (), {"data": err.value})()
    assert train_task._worth_retrying(None, None, state) is False
