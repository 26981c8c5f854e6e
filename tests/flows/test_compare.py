"""The comparison: aggregation maths on hand-made metrics, the spec's validation, and the
`flows.compare` flow on a tiny config (2 variants x 2 seeds) under the Prefect test server."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import yaml

from fire_mpo_core.compare import (
    CompareSpec,
    RunResult,
    aggregate,
    load_compare,
    markdown_table,
    mean_std,
    paired_significance,
    record_scores,
    run_average,
    seed_mean_scores,
    select_grid_point,
    significance_table,
    write_comparison,
)
from fire_mpo_core.config import ConfigError
from fire_mpo_core.store import input_dirs, read_manifest
from testing_support.flow_runs import SMALL

AVG = ["closed_accuracy", "open_recall"]


def _fake_run(root: Path, variant: str, seed: int, metrics: dict, losses: list[float]) -> RunResult:
    """A finished-looking train folder (metrics.jsonl) and evaluation folder (metrics.json)."""
    t, e = root / f"train-{variant}-{seed}", root / f"eval-{variant}-{seed}"
    t.mkdir(parents=True)
    e.mkdir(parents=True)
    (e / "metrics.json").write_text(json.dumps(metrics))
    lines = [json.dumps({"step": 10 * (i + 1), "loss": v}) for i, v in enumerate(losses)]
    (t / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return RunResult(variant=variant, seed=seed, train_dir=t, eval_dir=e)


def test_mean_std_and_run_average_by_hand():
    # mean (0.5 + 0.7 + 0.9) / 3 = 0.7; deviations -0.2, 0, 0.2 -> var 0.08 / 2 = 0.04, std 0.2
    mean, std, n = mean_std([0.5, 0.7, None, 0.9])
    assert (round(mean, 12), round(std, 12), n) == (0.7, 0.2, 3)
    assert mean_std([0.4]) == (0.4, None, 1)
    assert mean_std([None]) == (None, None, 0)
    assert run_average({"closed_accuracy": 0.6, "open_recall": 0.8}, AVG) == pytest.approx(0.7)
    assert run_average({"closed_accuracy": 0.6, "open_recall": None}, AVG) is None
    assert run_average({"closed_accuracy": 0.6}, AVG) is None


def test_aggregate_and_table_by_hand():
    rows = [
        {"variant": "a", "closed_accuracy": 0.5, "open_recall": 0.7},
        {"variant": "a", "closed_accuracy": 0.7, "open_recall": 0.9},
        {"variant": "b", "closed_accuracy": 0.4, "open_recall": 0.4},
    ]
    s = aggregate(rows, ["closed_accuracy", "open_recall"], AVG)
    assert list(s) == ["a", "b"]
    # a: closed 0.5, 0.7 -> mean 0.6, std sqrt((0.01 + 0.01) / 1) = 0.141421...
    assert s["a"]["closed_accuracy"]["mean"] == pytest.approx(0.6)
    assert s["a"]["closed_accuracy"]["std"] == pytest.approx(math.sqrt(0.02))
    # run averages 0.6 and 0.8 -> 0.7 ± 0.141421; b has one seed: no std
    assert s["a"]["average"]["mean"] == pytest.approx(0.7)
    assert s["a"]["average"]["std"] == pytest.approx(math.sqrt(0.02))
    assert s["b"]["average"] == {"mean": pytest.approx(0.4), "std": None, "n": 1}
    table = markdown_table(s, ["closed_accuracy", "open_recall"], {"closed_accuracy": 0.3}, AVG)
    lines = table.splitlines()
    assert lines[0] == "| method | closed_accuracy | open_recall | average |"
    assert lines[2] == "| SFT base | 0.300 | - | - |"
    assert lines[3] == "| a | **0.600 ± 0.141** | **0.800 ± 0.141** | **0.700 ± 0.141** |"
    assert lines[4] == "| b | 0.400 | 0.400 | 0.400 |"


def _records(eval_dir: Path, closed: list[int], modality: list[int], probes: list[int]) -> None:
    rows = [{"id": f"c{i}", "answer_type": "closed", "question_type": "presence", "correct": c}
            for i, c in enumerate(closed)]  # fmt: skip
    rows += [{"id": f"m{i}", "answer_type": "closed", "question_type": "modality", "correct": c}
             for i, c in enumerate(modality)]  # fmt: skip
    (eval_dir / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    g = [{"id": f"p{i}", "measure": "probe_remove", "right_both": bool(c)}
         for i, c in enumerate(probes)]  # fmt: skip
    g.append({"id": "k0", "measure": "probe_keep", "right_both": True})  # not a remove probe
    (eval_dir / "grounding.jsonl").write_text("".join(json.dumps(r) + "\n" for r in g))


def test_paired_significance_hand_derived(tmp_path):
    runs = [
        _fake_run(tmp_path, "a", 0, {}, [1.0]),
        _fake_run(tmp_path, "a", 1, {}, [1.0]),
        _fake_run(tmp_path, "b", 0, {}, [1.0]),
    ]
    _records(runs[0].eval_dir, [1, 1, 1, 0], [1], [1, 1])
    _records(runs[1].eval_dir, [1, 1, 0, 0], [1], [1, 0])
    _records(runs[2].eval_dir, [0, 0, 0, 0], [0], [0, 0])
    base = tmp_path / "base"
    base.mkdir()
    _records(base, [1, 0, 0, 0], [1], [0, 0])
    assert record_scores(runs[0].eval_dir, "closed_lesion_accuracy") == {
        "c0": 1.0, "c1": 1.0, "c2": 1.0, "c3": 0.0
    }  # fmt: skip
    assert seed_mean_scores([r.eval_dir for r in runs[:2]], "grounded_accuracy") == {
        "p0": 1.0, "p1": 0.5
    }  # fmt: skip
    sig = paired_significance(runs, ["closed_lesion_accuracy", "grounded_accuracy"], "b", base)
    # a's seed means on the lesion records [1, 1, .5, 0] vs base [1, 0, 0, 0]: +0.375; vs b: +0.625.
    assert sig["a"]["vs base"]["closed_lesion_accuracy"]["diff"] == 0.375
    assert sig["a"]["vs b"]["closed_lesion_accuracy"]["diff"] == 0.625
    assert sig["a"]["vs b"]["grounded_accuracy"]["diff"] == 0.75  # [1, .5] vs [0, 0]
    assert "vs b" not in sig["b"] and sig["b"]["vs base"]["closed_lesion_accuracy"]["diff"] == -0.25
    table = significance_table(sig, ["grounded_accuracy"])
    assert (
        table.splitlines()[0] == "| method | grounded_accuracy vs base | grounded_accuracy vs b |"
    )


def test_grid_points_and_selection():
    spec = CompareSpec(grid={"lr": [1e-3, 2e-3], "epochs": [1.0]}, variants={"a": {}, "b": {}})
    points = spec.grid_points()
    assert points == [{"epochs": 1.0, "lr": 1e-3}, {"epochs": 1.0, "lr": 2e-3}]
    got = select_grid_point({"a": {0: 0.4, 1: 0.5}, "b": {0: 0.5, 1: 0.5}}, points)
    assert got == {"a": points[1], "b": points[0]}  # b: a tie keeps the first point
    assert CompareSpec(variants={"a": {}}).grid_points() == [{}]
    with pytest.raises(ValueError, match="train fields"):
        CompareSpec(grid={"lrr": [1]}, variants={"a": {}})


def test_write_comparison_outputs(tmp_path):
    spec = CompareSpec(
        name="t",
        seeds=[0, 1],
        average=AVG,
        metrics=["closed_accuracy", "lesion_attention_ratio"],
        curves=["loss"],
        baseline="b",
        variants={"a": {}, "b": {"train": {"loss.name": "dpo"}}},
    )
    layers = {"lesion_attention_ratio_l0": 1.0, "lesion_attention_ratio_l1": 2.0}
    runs = [
        _fake_run(
            tmp_path, "a", 0, {"closed_accuracy": 0.5, "open_recall": 0.7, **layers}, [1, 0.5]
        ),
        _fake_run(tmp_path, "a", 1, {"closed_accuracy": 0.7, "open_recall": 0.9}, [1, 0.7]),
        _fake_run(tmp_path, "b", 0, {"closed_accuracy": 0.4, "open_recall": 0.4}, [1, 0.9]),
        _fake_run(tmp_path, "b", 1, {"closed_accuracy": 0.4, "open_recall": 0.6}, [1, 0.9]),
    ]
    out = tmp_path / "cmp" / "t"
    summary = write_comparison(runs, spec, out, details={"note": "x"})
    # b: averages 0.4 and 0.5 -> 0.45; a: 0.7 -> a is (0.7 - 0.45) / 0.45 = +55.56% over b
    assert summary["variants"]["b"]["average"]["mean"] == pytest.approx(0.45)
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["variant"], r["seed"]) for r in rows] == [
        ("a", "0"),
        ("a", "1"),
        ("b", "0"),
        ("b", "1"),
    ]
    assert float(rows[1]["average"]) == pytest.approx(0.8)
    assert json.loads((out / "summary.json").read_text())["note"] == "x"
    report = (out / "report.md").read_text()
    assert "Highest average: **a**" in report and "+55.56% average vs b" in report
    for png in ("metrics.png", "curves.png", "grounding.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG" and f"]({png})" in report
    # Rewriting replaces the folder whole (no stale files, no temporary folders left).
    (out / "stale.txt").write_text("old")
    write_comparison(runs[:2], spec.model_copy(update={"baseline": None}), out)
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ["t"]


def _write(tmp_path: Path, compare: dict, **cycle) -> Path:
    p = tmp_path / "cmp.yaml"
    p.write_text(yaml.safe_dump({**cycle, "compare": compare}, sort_keys=False))
    return p


@pytest.mark.parametrize(
    ("compare", "field"),
    [
        (
            {"variants": {"x": {"train": {"loss.nmae": "dpo"}}}},
            "compare.variants.x.train.loss.nmae",
        ),
        (
            {"variants": {"x": {"train": {"loss.name": "ppo"}}}},
            "compare.variants.x.train.loss.name",
        ),
        ({"variants": {"x": {"trian": {}}}}, "compare.variants.x.trian"),
        ({"variants": {"x": {"corrupt": {"kind": "fog"}}}}, "compare.variants.x.corrupt.kind"),
        ({"variants": {"x": {}}, "train": {"epochs": -1}}, "compare.variants.x.train.epochs"),
        ({"variants": {"x": {}}, "seeds": [0, 0]}, "compare.seeds"),
        ({"variants": {"x": {}}, "baseline": "y"}, "compare"),
        ({"variants": {}}, "compare.variants"),
        ({"variants": {"x": {}}, "wrokers": 2}, "compare.wrokers"),
    ],
)
def test_spec_rejects_bad_fields_naming_them(tmp_path, compare, field):
    with pytest.raises(ConfigError) as e:
        load_compare(_write(tmp_path, compare))
    assert f"{field}:" in str(e.value)


def test_compare_yaml_loads_and_extends_default():
    cfg, spec = load_compare("configs/compare.yaml")
    assert cfg.run == "default" and cfg.store.is_absolute()
    assert {"dpo", "mdpo", "rrpo", "mask_dpo", "fire_mpo"} <= set(spec.variants)
    assert len(spec.seeds) >= 3
    # The cycle sections are the default's: the setup stages' keys are the full cycle's.
    from fire_mpo_core.config import load_config

    default = load_config("configs/default.yaml")
    assert cfg.model_dump(exclude={"store"}) == default.model_dump(exclude={"store"})


def test_flow_two_variants_two_seeds(prefect_harness, tmp_path):
    from flows.compare import compare, main

    spec = {
        "name": "tiny",
        "seeds": [0, 1],
        "baseline": "dpo",
        "variants": {
            "dpo": {"train": {"loss.name": "dpo"}},
            "black": {"corrupt": {"kind": "black"}},
        },
    }
    config = _write(tmp_path, spec, **SMALL, store=str(tmp_path / "store"))
    report = Path(compare(config=str(config)))
    out = report.parent
    assert out == tmp_path / "store" / "t" / "compare" / "tiny"
    with (out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [(r["variant"], r["seed"]) for r in rows] == [
        ("dpo", "0"),
        ("dpo", "1"),
        ("black", "0"),
        ("black", "1"),
    ]
    trains = [Path(r["train_dir"]) for r in rows]
    assert len(set(trains)) == 4  # a folder per (variant, seed)
    man = [read_manifest(t) for t in trains]
    assert [m["config"]["train"]["seed"] for m in man] == [0, 1, 0, 1]
    assert [m["config"]["train"]["loss"]["name"] for m in man] == ["dpo"] * 2 + ["fire_mpo"] * 2
    # Each seed has its own on-policy pairs (resample: sample.seed = seed), shared by the
    # variants; the corruption-kind variant trained on its own corrupt folder (kind black).
    corrupt = [input_dirs(t)["corrupt"] for t in trains]
    assert len(set(corrupt)) == 4
    pairs = [input_dirs(c)["judge"] for c in corrupt]
    assert pairs[0] == pairs[2] != pairs[1] == pairs[3]
    rollouts = input_dirs(pairs[1])["sample"]
    assert read_manifest(rollouts)["config"]["sample"]["seed"] == 1
    assert [read_manifest(c)["config"]["corrupt"]["kind"] for c in corrupt[2:]] == ["black"] * 2
    for r in rows:
        metrics = json.loads((Path(r["eval_dir"]) / "metrics.json").read_text())
        assert float(r["closed_accuracy"]) == metrics["closed_accuracy"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["variants"]["dpo"]["closed_accuracy"]["n"] == 2
    assert "| SFT base |" in (out / "table.md").read_text()
    assert (out / "metrics.png").is_file() and (out / "curves.png").is_file()

    # The CLI on the same config: every stage cached, one seed and one method selected.
    assert main(["--config", str(config), "--seeds", "1", "--methods", "black"]) == 0
    with (out / "results.csv").open() as f:
        assert [(r["variant"], r["seed"]) for r in csv.DictReader(f)] == [("black", "1")]
    assert main(["--config", str(config), "--methods", "nope"]) == 2


def test_narrow_selects_methods_seeds_and_quick():
    from fire_mpo_core.compare import narrow

    spec = CompareSpec(
        seeds=[0, 1, 2],
        baseline="dpo",
        train={"epochs": 1.0},
        variants={"dpo": {}, "fire_mpo": {}, "no_kl": {"train": {"loss.alpha": 0.0}}},
    )
    sub = narrow(spec, [2, 1], ["no_kl", "fire_mpo"], quick=False)
    assert list(sub.variants) == ["fire_mpo", "no_kl"]  # the config's order, not the CLI's
    assert sub.seeds == [2, 1] and sub.baseline is None and sub.name == "paper"
    quick = narrow(spec, None, None, quick=True)
    assert quick.seeds == [0] and quick.name == "paper-quick" and quick.baseline == "dpo"
    assert quick.train == {"epochs": 1.0, "max_steps": 10, "save_every": None}
    with pytest.raises(ConfigError, match="unknown \\['ppo'\\]"):
        narrow(spec, None, ["ppo"], quick=False)
