"""Promotion of the best round (fire_mpo_core/loop/promote.py) and its model card, on real store
folders (ArtifactStore.run_stage) with small stand-in contents: no model is needed to decide.

    OMP_NUM_THREADS=1 python -m pytest -q tests/core/test_loop_promote.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

from fire_mpo_core.loop.card import CARD_TITLE
from fire_mpo_core.loop.promote import BEST, BEST_JSON, Candidate, promote, read_best
from fire_mpo_core.store import ArtifactStore, digest_files, read_manifest, stage_key

RUN = "r"
TRAIN_CFG = {"train": {"loss": {"name": "fire_mpo", "beta": 0.1}, "lr": 0.002}}


def _stage(store: Path, round_: int, stage: str, config: dict, inputs: dict, files: dict) -> Path:
    def build(w):
        for rel, text in files.items():
            (w.path / rel).parent.mkdir(parents=True, exist_ok=True)
            (w.path / rel).write_text(text)
        return {"pairs": 6, "steps": 2} if stage == "train" else {}

    res = ArtifactStore(store).run_stage(
        run=RUN, round_=round_, stage=stage, config=config, inputs=inputs, code="c0", fn=build
    )
    return res.path


@pytest.fixture()
def world(tmp_path):
    """prepare, then per round a train folder (a peft-like adapter/ with peft's card) and an
    evaluate folder with val and test metrics; ``round_dirs(k, val, seed)`` builds one round."""
    store = tmp_path / "store"
    prep = _stage(store, 0, "prepare", {"data": {"dataset": "synthlesion"}}, {}, {"x": "1"})
    pairs = _stage(store, 1, "corrupt", {}, {"prepare": prep}, {"data.jsonl": "{}"})

    def round_dirs(k: int, val: float | None, seed: int = 0) -> Candidate:
        adapter = {
            "adapter/adapter_config.json": json.dumps({"base_model_name_or_path": "../../m"}),
            "adapter/adapter_model.safetensors": f"weights {k} {seed}",
            "adapter/README.md": "---\nlibrary_name: peft\n---\n# Model Card for Model ID\n",
        }
        cfg = {**TRAIN_CFG, "seed": seed}
        train = _stage(store, k, "train", cfg, {"prepare": prep, "corrupt": pairs}, adapter)
        vals = {} if val is None else {"grounded_accuracy": val, "grounded_accuracy_n": 20}
        metrics = {
            "val_metrics.json": json.dumps(
                {**vals, "grounded_accuracy_ci_low": 0.1, "grounded_accuracy_ci_high": 0.6}
            ),
            "metrics.json": json.dumps({"grounded_accuracy": 0.3, "grounded_accuracy_n": 30}),
        }
        ev_cfg = {"evaluate": {"split": "test"}, "v": val, "seed": seed}
        ev = _stage(store, k, "evaluate", ev_cfg, {"policy": train}, metrics)
        return Candidate.from_evaluation(k, train, ev, "grounded_accuracy")

    return store, round_dirs


def test_first_promotion_writes_pointer_record_and_card(world):
    store, round_dirs = world
    c1 = round_dirs(1, 0.4)
    p = promote(store, RUN, c1)
    assert (p.action, p.round, p.value) == ("promoted", 1, 0.4)
    assert p.reason == "round 1 (grounded_accuracy 0.4) is the first promoted round"
    link = store / RUN / BEST
    assert link.is_symlink() and not os.path.isabs(os.readlink(link))  # relocatable
    assert link.resolve() == c1.train_dir.resolve()
    rec = json.loads((store / RUN / BEST_JSON).read_text())
    assert rec["round"] == 1 and rec["value"] == 0.4 and rec["metric"] == "grounded_accuracy"
    assert rec["train"] == c1.train_dir.relative_to(store).as_posix()
    assert rec["key"] == read_manifest(c1.train_dir)["key"]
    assert [p.name for p in (store / RUN).iterdir() if p.name.startswith(".")] == []  # no temp

    card = (link / "adapter" / "README.md").read_text()
    assert p.card == str(c1.train_dir.resolve() / "adapter" / "README.md")
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["base_model"] == "../../m" and front["library_name"] == "peft"
    assert {"fire-mpo", "medical", "lora", "dpo"} <= set(front["tags"])
    assert front["datasets"] == ["synthlesion"]
    (val_res, test_res) = front["model-index"][0]["results"]
    assert val_res["dataset"]["split"] == "validation" and test_res["dataset"]["split"] == "test"
    assert val_res["metrics"][0] == {
        "type": "grounded_accuracy",
        "name": "grounded_accuracy (validation)",
        "value": 0.4,
    }
    assert test_res["metrics"][0]["value"] == 0.3
    assert CARD_TITLE in card and "PeftModel.from_pretrained" in card
    assert "| grounded_accuracy | 0.4 | 20 | [0.1, 0.6] | 0.3 | 30 | – |" in card
    assert f"store key `{rec['key']}`, code version `c0`" in card
    assert "loss `fire_mpo`" in card and "lr: 0.002" in card and "2 optimizer steps on 6" in card
    assert (
        f"(stage `corrupt`, key `{read_manifest(c1.train_dir)['inputs']['corrupt']['key']}`)"
        in card
    )


def test_card_moves_no_key(world):
    """The card rewrites a finished train folder: its files still match the manifest's
    digest, so the key of every stage built on it stays the same."""
    store, round_dirs = world
    c1 = round_dirs(1, 0.4)
    before = stage_key("evaluate", {"x": 1}, {"policy": c1.train_dir}, "c")
    peft_card = (c1.train_dir / "adapter" / "README.md").read_text()
    promote(store, RUN, c1)
    assert (c1.train_dir / "adapter" / "README.md").read_text() != peft_card
    assert digest_files(c1.train_dir) == read_manifest(c1.train_dir)["content_digest"]
    assert stage_key("evaluate", {"x": 1}, {"policy": c1.train_dir}, "c") == before


def test_never_backwards(world):
    store, round_dirs = world
    c1, c2, c3 = round_dirs(1, 0.4), round_dirs(2, 0.5), round_dirs(3, 0.45)
    promote(store, RUN, c1)
    p = promote(store, RUN, c2)
    assert p.action == "promoted" and p.reason == (
        "round 2 (grounded_accuracy 0.5) beats round 1 (0.4)"
    )
    p = promote(store, RUN, c3)  # a worse round
    assert (p.action, p.round) == ("kept", 2)
    assert p.reason == (
        "round 2 stays best (grounded_accuracy 0.5 >= 0.45 of round 3); "
        "the pointer never moves backwards"
    )
    p = promote(store, RUN, c1)  # an older round rerun (`--stages`, a stage rerun)
    assert (p.action, p.round) == ("kept", 2)
    p = promote(store, RUN, round_dirs(3, 0.5))  # a tie: the earlier round stays
    assert (p.action, p.round) == ("kept", 2)
    p = promote(store, RUN, round_dirs(2, 0.5, seed=1))  # round 2 recomputed (new key), a tie
    assert (p.action, p.round) == ("kept", 2) and "(recomputed in a new train folder)" in p.reason
    better = round_dirs(2, 0.55, seed=2)  # recomputed and better: it takes the pointer
    assert promote(store, RUN, better).reason == (
        "round 2 (recomputed in a new train folder) (grounded_accuracy 0.55) beats round 2 (0.5)"
    )
    promote(store, RUN, c2)  # back to the first computation of round 2: worse now, kept
    c2 = better
    assert (store / RUN / BEST).resolve() == c2.train_dir.resolve()
    p = promote(store, RUN, c2)  # the same round again: nothing to do
    assert (p.action, p.reason) == ("kept", "round 2 is already the best (grounded_accuracy 0.55)")


def test_explicit_cases(world):
    store, round_dirs = world
    c1 = round_dirs(1, 0.4)
    promote(store, RUN, c1)
    p = promote(store, RUN, round_dirs(2, None))
    assert (p.action, p.round) == ("kept", 1)
    assert p.reason == "round 2 has no validation grounded_accuracy: the best is unchanged"
    # The same adapter re-evaluated (e.g. another selection cap): the record follows, lower.
    again = Candidate(**{**c1.model_dump(), "value": 0.35})
    p = promote(store, RUN, again)
    assert (p.action, p.round, p.value) == ("updated", 1, 0.35)
    assert p.reason.startswith("round 1 re-evaluated: grounded_accuracy 0.4 -> 0.35")
    assert read_best(store, RUN).value == 0.35
    # The recorded folder deleted: the next candidate takes the pointer, whatever its value.
    c3 = round_dirs(3, 0.1)
    os.rename(c1.train_dir, c1.train_dir.with_name(".gone"))
    p = promote(store, RUN, c3)
    assert (p.action, p.round) == ("promoted", 3) and "is gone" in p.reason
    # peft's card written over ours (a rebuilt folder): a confirming call puts ours back.
    (c3.train_dir / "adapter" / "README.md").write_text("# Model Card for Model ID\n")
    promote(store, RUN, c3)
    assert CARD_TITLE in (c3.train_dir / "adapter" / "README.md").read_text()
