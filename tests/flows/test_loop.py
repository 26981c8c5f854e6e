"""The closed loop on a 2-round tiny cycle (issue 18): each reference policy, the validation
pass and decision of evaluate, the promoted best round, and next-round's max_rounds bound.

Both policies run in one store and run: round 1 is the same computation for both (round 1's
previous round is the SFT base), so the second cycle reuses it and builds only round 2.

    OMP_NUM_THREADS=1 python -m pytest -q tests/flows/test_loop.py
"""

from __future__ import annotations

import json
import os

import pytest
import torch
import yaml
from peft import PeftModel

from fire_mpo_core.loop.config import LoopConfig
from fire_mpo_core.loop.decide import LoopDecision, decide, scores_from_history
from fire_mpo_core.loop.promote import read_best
from fire_mpo_core.models import encode_batch, load_model, load_processor
from fire_mpo_core.policy import read_policy
from fire_mpo_core.store import DATA, digest_files, input_dirs, read_manifest
from fire_mpo_core.training.batching import ImageCache, build_branch_batch, load_pairs
from fire_mpo_core.training.config import LoRAConfig
from fire_mpo_core.training.lora import attach_lora, attach_reference, reference_weights
from fire_mpo_core.training.reference import ReferenceTable, branch_reference_sums
from testing_support.cycle import run_cycle_direct, write_config

pytestmark = pytest.mark.usefixtures("one_thread")
MODES = ("base", "previous_round")
LOOP = {"metric": "grounded_accuracy", "patience": 2, "max_rounds": 2}


@pytest.fixture(scope="module")
def cycles(tmp_path_factory) -> dict:
    """mode -> the stage folders of a 2-round cycle (3 val scans, so decisions have values)."""
    store = tmp_path_factory.mktemp("loop")
    out = {"store": store}
    for mode in MODES:
        cfg = write_config(
            store / f"{mode}.yaml",
            store,
            "llava",
            rounds=2,
            data={"n_val_images": 3},
            train={"lr": 5e-3},  # round 1's adapter moves clearly off the SFT base
            loop={**LOOP, "reference": mode},
        )
        ev2 = run_cycle_direct(cfg)
        train2 = input_dirs(ev2)["policy"]
        train1 = input_dirs(train2)["policy"]
        out[mode] = {
            "config": cfg,
            "evaluate2": ev2,
            "train2": train2,
            "train1": train1,
            "reference2": input_dirs(train2)["reference"],
            "reference1": input_dirs(train1)["reference"],
            "corrupt2": input_dirs(train2)["corrupt"],
            "prepare": input_dirs(train2)["prepare"],
        }
    return out


def test_round_1_is_shared_and_round_2_keys_follow_the_mode(cycles):
    base, prev = cycles["base"], cycles["previous_round"]
    assert base["train1"] == prev["train1"] and base["reference1"] == prev["reference1"]
    assert base["reference2"] != prev["reference2"] and base["train2"] != prev["train2"]
    assert "reference_policy" not in read_manifest(base["reference2"])["inputs"]
    for stage in ("reference2", "train2"):
        inputs = input_dirs(prev[stage])
        assert inputs["reference_policy"] == inputs["policy"] == prev["train1"]


def _model_for(mode: str, c: dict):
    """The model the round-2 reference must be: the SFT base, or round 1's policy."""
    policy = read_policy(c["train1"])
    model = load_model(policy.base)
    if mode == "previous_round":
        model = PeftModel.from_pretrained(model, policy.adapter)
    return model.eval(), load_processor(policy.base)


def _hand_logp(model, processor, images, pair, max_length: int) -> tuple[float, float]:
    """sum over y+ of log p(y_t) under v from one plain forward, and over its spans."""
    enc = encode_batch(
        processor, [images.get(("clean", pair.image))], [pair.question], [pair.chosen],
        [pair.chosen_spans], max_length,
    )  # fmt: skip
    with torch.no_grad():
        logits = model(input_ids=enc["input_ids"], pixel_values=enc["pixel_values"]).logits
    lp = torch.log_softmax(logits[0, :-1], -1)
    labels, span = enc["labels"][0, 1:], enc["span_mask"][0, 1:]
    resp = labels != -100
    tok = lp[resp].gather(-1, labels[resp].unsqueeze(-1)).squeeze(-1)
    return float(tok.sum()), float(tok[span[resp]].sum())


@pytest.mark.parametrize("mode", MODES)
def test_reference_artifact_is_the_right_model(cycles, mode):
    """Round 2's artifact rows, recomputed by hand: the SFT base for `base`, round 1's adapter
    on for `previous_round`; the other model gives other numbers (the check can tell)."""
    c, other = cycles[mode], MODES[1 - MODES.index(mode)]
    table = ReferenceTable.load(c["reference2"])
    pairs = {p.id: p for p in load_pairs(c["corrupt2"] / DATA)}
    images = ImageCache(c["prepare"], c["corrupt2"])
    model, processor = _model_for(mode, c)
    wrong, _ = _model_for(other, c)
    for pid in table.pair_ids[:3]:
        row = table.pair_ids.index(pid)
        logp, span = _hand_logp(model, processor, images, pairs[pid], table.max_length)
        assert abs(float(table.logp[row, 0]) - logp) < 1e-4
        assert abs(float(table.span_logp[row, 0]) - span) < 1e-4
        off, _ = _hand_logp(wrong, processor, images, pairs[pid], table.max_length)
        assert abs(float(table.logp[row, 0]) - off) > 1e-3
    assert ("adapter" in table.metadata) == (mode == "previous_round")


@pytest.mark.parametrize("mode", MODES)
def test_in_step_reference_agrees_with_the_artifact(cycles, mode):
    """The trainer's round-2 model (round 1's adapter trainable, plus the frozen reference
    adapter for previous_round): inside reference_weights it scores what the artifact holds,
    and the switch leaves exactly the trainable parameters trainable."""
    c = cycles[mode]
    policy = read_policy(c["train1"])
    model = attach_lora(load_model(policy.base), policy, LoRAConfig())
    if mode == "previous_round":
        attach_reference(model, policy.adapter)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".default." in n for n in trainable)
    table = ReferenceTable.load(c["reference2"])
    pairs = load_pairs(c["corrupt2"] / DATA)[:4]
    images = ImageCache(c["prepare"], c["corrupt2"])
    batch = build_branch_batch(load_processor(policy.base), pairs, images, table.max_length)
    model.eval()
    with torch.no_grad(), reference_weights(model):
        in_step = branch_reference_sums(model, batch, chunk_size=16)
    with torch.no_grad():
        policy_now = branch_reference_sums(model, batch, chunk_size=16)  # the adapter on
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    artifact = table.lookup(batch.pair_ids)
    for branch, ref in artifact.items():
        torch.testing.assert_close(in_step[branch].logp, ref.logp, rtol=0, atol=1e-4)
        torch.testing.assert_close(in_step[branch].span_logp, ref.span_logp, rtol=0, atol=1e-4)
    # At round 2's first step the policy IS round 1's policy: equal to the reference exactly
    # when the reference is the previous round.
    same = torch.allclose(policy_now["clean_chosen"].logp, artifact["clean_chosen"].logp, atol=1e-4)
    assert same == (mode == "previous_round")


def test_evaluate_writes_validation_metrics_and_the_decision(cycles):
    ev = cycles["previous_round"]["evaluate2"]
    val = json.loads((ev / "val_metrics.json").read_text())
    test = json.loads((ev / "metrics.json").read_text())
    ids = lambda p: {json.loads(x)["id"] for x in p.read_text().splitlines()}  # noqa: E731
    val_ids, test_ids = ids(ev / "val" / "data.jsonl"), ids(ev / DATA)
    assert val["n_closed"] > 0 and val_ids and test_ids and not val_ids & test_ids
    history = [json.loads(x) for x in (ev / "history.jsonl").read_text().splitlines()]
    assert [h["round"] for h in history] == [0, 1, 2]
    assert history[-1]["val_grounded_accuracy"] == val["grounded_accuracy"]
    assert history[-1]["grounded_accuracy"] == test["grounded_accuracy"]
    # The decision is the promote step's, over this history, recorded beside `best`; the
    # evaluation keys on no loop setting (changing patience or max_rounds re-evaluates nothing).
    recorded = cycles["store"] / "fam" / "decisions" / "round-2.json"
    decision = LoopDecision.model_validate_json(recorded.read_text())
    assert decision == decide(scores_from_history(history, "grounded_accuracy"), LoopConfig(**LOOP))
    assert decision.round == 2 and decision.action == "stop"  # max_rounds 2
    assert decision.reason.endswith("reached max_rounds 2")
    assert "loop" not in read_manifest(ev)["config"] and not (ev / "decision.json").exists()


def test_changing_the_loop_rule_reevaluates_nothing(cycles, tmp_path):
    """A new patience / margin / max_rounds reuses every evaluation (cached) and the promote
    step decides again over the same values."""
    store = cycles["store"]
    cfg = yaml.safe_load(cycles["previous_round"]["config"].read_text())
    cfg["loop"] |= {"patience": 3, "min_improvement": 0.5, "max_rounds": 4}
    path = tmp_path / "rule.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert run_cycle_direct(path) == cycles["previous_round"]["evaluate2"]  # same folder
    decision = LoopDecision.model_validate_json(
        (store / "fam" / "decisions" / "round-2.json").read_text()
    )
    assert decision.action == "continue" and "patience" in decision.reason  # 1 or 2 of 3 used


def test_best_round_is_promoted_with_a_loadable_adapter_and_its_card(cycles):
    store = cycles["store"]
    best = read_best(store, "fam")
    # Offered in order: base r1, base r2, (previous_round's r1 again), previous_round r2; the
    # best is the highest validation value, the earliest offered on ties.
    offered = [
        (cycles["base"]["train1"], cycles["base"]["evaluate2"], 1),
        (cycles["base"]["train2"], cycles["base"]["evaluate2"], 2),
        (cycles["previous_round"]["train2"], cycles["previous_round"]["evaluate2"], 2),
    ]
    values = []
    for train, ev, k in offered:
        rows = [json.loads(x) for x in (ev / "history.jsonl").read_text().splitlines()]
        values.append((rows[k]["val_grounded_accuracy"], train))
    top = max(v for v, _ in values)
    expected = next(t for v, t in values if v == top)
    link = store / "fam" / "best"
    assert link.is_symlink() and not os.path.isabs(os.readlink(link))
    assert link.resolve() == expected.resolve() and best.value == top
    card = (link / "adapter" / "README.md").read_text()
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["library_name"] == "peft" and "fire-mpo" in front["tags"]
    assert f"store key `{read_manifest(expected)['key']}`" in card
    # The card moved no key: the folder still matches its manifest's digest.
    assert digest_files(expected) == read_manifest(expected)["content_digest"]
    policy = read_policy(link)
    model = PeftModel.from_pretrained(load_model(policy.base), str(link / "adapter"))
    assert sum("lora_B" in n for n, _ in model.named_parameters()) > 0


def test_next_round_refuses_past_max_rounds(cycles, prefect_harness, caplog):
    from flows.next_round import next_round

    cfg = cycles["base"]["config"]
    before = sorted(p.name for p in (cycles["store"] / "fam").iterdir())
    assert next_round(config=str(cfg)) is None  # 2 rounds done, loop.max_rounds 2
    assert sorted(p.name for p in (cycles["store"] / "fam").iterdir()) == before
    assert any("loop.max_rounds is 2: no round added" in r.getMessage() for r in caplog.records)


def test_the_default_config_keeps_todays_reference_and_train_inputs(tmp_path):
    """`base` adds no input and no config key to reference / train (their keys stay today's);
    `previous_round` adds round k-1's policy from round 2 on."""
    import flows.full_cycle as fc
    from fire_mpo_core.config import load_config

    seen = {}

    def runner(stage, k, config, inputs):
        seen[(stage, k)] = (config, sorted(inputs))
        return f"/{stage}-{k}"

    for mode in MODES:
        cfg = load_config("configs/default.yaml", {"rounds": 2, "loop.reference": mode})
        fc.run_cycle(cfg, runner)
        assert seen[("reference", 1)][1] == ["corrupt", "policy", "prepare"]
        assert seen[("train", 1)][1] == ["corrupt", "policy", "prepare", "reference"]
        extra = ["reference_policy"] if mode == "previous_round" else []
        assert seen[("reference", 2)][1] == sorted(["corrupt", "policy", "prepare", *extra])
        assert set(seen[("reference", 2)][0]) == {"reference"}
        assert set(seen[("train", 2)][0]) == {"train"}
