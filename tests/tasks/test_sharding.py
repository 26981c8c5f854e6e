"""Sharded `judge` and `corrupt` stages: byte-identical to the unsharded run, on threads and Dask.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/tasks/test_sharding.py -q

Each stage runs through its real Prefect task (``tasks.judge.judge`` / ``tasks.corrupt.corrupt``)
on a small SynthLesion set, once with ``shards: 1`` and once sharded; every output file but the
manifest (which holds timings and the config) must match byte for byte. The Dask case uses a
local 2-worker ``distributed.LocalCluster`` (worker processes) and is skipped when prefect-dask is
not installed (``pip install -e '.[dask]'``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from prefect import flow, task

from fire_mpo_core.config import DataConfig
from fire_mpo_core.corruption.config import CorruptConfig
from fire_mpo_core.data.io import load_records
from fire_mpo_core.data.synthlesion import generate_synthlesion
from fire_mpo_core.judge import JudgeConfig
from fire_mpo_core.store import DATA, ArtifactStore, write_jsonl
from tasks.common import StageCall, bind
from tasks.corrupt import corrupt
from tasks.judge import judge
from tasks.shards import DASK_ADDRESS_ENV, RUNNER_ENV, make_runner, run_shards, shard_bounds
from testing_support.stage_inputs import rollout, wrong_answers

try:
    import distributed
    import prefect_dask
except ImportError:  # the optional `dask` extra
    distributed = prefect_dask = None

needs_dask = pytest.mark.skipif(
    prefect_dask is None, reason="prefect-dask not installed: pip install -e '.[dask]'"
)


# --------------------------------------------------------------------------- pure parts


def test_shard_bounds_are_contiguous_balanced_and_never_empty():
    assert shard_bounds(10, 3) == [(0, 4), (4, 7), (7, 10)]
    assert shard_bounds(2, 4) == [(0, 1), (1, 2)]  # no empty shard
    assert shard_bounds(0, 3) == []
    assert shard_bounds(5, 1) == [(0, 5)]
    with pytest.raises(ValueError, match="shards must be >= 1"):
        shard_bounds(5, 0)


def test_runner_is_chosen_by_the_environment():
    from prefect.task_runners import ThreadPoolTaskRunner

    runner = make_runner(3, env={})
    assert isinstance(runner, ThreadPoolTaskRunner) and runner._max_workers == 3
    with pytest.raises(ValueError, match="not a shard runner"):
        make_runner(2, env={RUNNER_ENV: "ray"})
    with pytest.raises(ValueError, match="shards"):
        JudgeConfig(shards=0)
    with pytest.raises(ValueError, match="shards"):
        CorruptConfig(shards=0)


# --------------------------------------------------------------------------- stages


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """A prepare folder (SynthLesion, reports included) and a sample folder of rollouts that
    exercise every judge path: correct, wrong, gibberish, and an unknown record."""
    root = tmp_path_factory.mktemp("shards")
    store = ArtifactStore(root / "inputs")
    data_cfg = DataConfig(
        image_size=48,
        n_train_images=10,
        n_val_images=0,
        n_test_images=1,
        questions_per_image=3,
        report_fraction=0.5,
    )
    prepare = store.run_stage(
        run="inputs",
        round_=0,
        stage="prepare",
        config={"data": data_cfg.model_dump(mode="json")},
        inputs={},
        code="test",
        fn=lambda w: generate_synthlesion(data_cfg, w.path),
    ).path
    records = load_records(prepare, splits=("train",))
    rollouts = []
    for i, (r, wrong) in enumerate(zip(records, wrong_answers(records))):
        kind = i % 3
        response = r.answer if kind == 0 or not wrong else wrong[i % len(wrong)]
        if i % 7 == 6:
            response = "zzz qqq"
        rollouts.append(rollout(r.id, response, question=r.question))
    rollouts.append(rollouts[0].model_copy(update={"id": "ghost#0", "record_id": "ghost"}))
    sample = store.run_stage(
        run="inputs",
        round_=1,
        stage="sample",
        config={},
        inputs={"prepare": prepare},
        code="test",
        fn=lambda w: {"rollouts": write_jsonl(w.path / DATA, rollouts)},
    ).path
    return {"root": root, "prepare": prepare, "sample": sample, "n": len(rollouts)}


def _files(folder: Path) -> dict[str, bytes]:
    """Every output file's bytes, the manifest (timings, config) left out."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != "manifest.json"
    }


@flow(name="sharding-test")
def _stages(store: str, run: str, shards: int) -> tuple[str, str]:
    """judge then corrupt with ``shards`` shards each, through the real stage tasks."""
    w = _stages_world
    judged = bind(judge, Path(store))(
        StageCall(
            store=Path(store),
            run=run,
            round=1,
            stage="judge",
            config={"judge": JudgeConfig(shards=shards).model_dump(mode="json")},
            inputs={"prepare": w["prepare"], "sample": w["sample"]},
        )
    )
    corrupted = bind(corrupt, Path(store))(
        StageCall(
            store=Path(store),
            run=run,
            round=1,
            stage="corrupt",
            config={"corrupt": CorruptConfig(shards=shards).model_dump(mode="json")},
            inputs={"prepare": w["prepare"], "judge": Path(judged)},
        )
    )
    return judged, corrupted


_stages_world: dict = {}


def _check_identical(world, tmp_path, shards: int) -> tuple[Path, Path]:
    _stages_world.update(world)
    store = tmp_path / "store"
    one = [Path(p) for p in _stages(str(store), "one", 1)]
    many = [Path(p) for p in _stages(str(store), "many", shards)]
    for a, b in zip(one, many, strict=True):
        fa, fb = _files(a), _files(b)
        assert fa.keys() == fb.keys()
        for name in fa:
            assert fa[name] == fb[name], name
    judged, corrupted = one
    lines = (judged / DATA).read_text().splitlines()
    rejects = (judged / "rejects.jsonl").read_text()
    assert len(lines) > 5 and '"ghost#0"' in rejects  # pairs and rejects both merged
    assert len(list((corrupted / "images").glob("*.png"))) > 3
    return judged, corrupted


def test_sharded_judge_and_corrupt_on_threads_equal_unsharded(prefect_harness, world, tmp_path):
    _check_identical(world, tmp_path, shards=3)


@task
def _where(index: int) -> tuple[int, int]:
    return index, os.getpid()


@needs_dask
@pytest.mark.slow
def test_sharded_stages_on_a_local_dask_cluster(prefect_harness, world, tmp_path, monkeypatch):
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster:
        # The shard tasks really run in the two worker processes, results in shard order.
        runner = prefect_dask.DaskTaskRunner(address=cluster.scheduler_address)
        placed = run_shards(_where, [{"index": i} for i in range(4)], runner=runner)
        assert [i for i, _ in placed] == [0, 1, 2, 3]
        assert os.getpid() not in {pid for _, pid in placed}
        monkeypatch.setenv(RUNNER_ENV, "dask")
        monkeypatch.setenv(DASK_ADDRESS_ENV, cluster.scheduler_address)
        _check_identical(world, tmp_path, shards=2)
