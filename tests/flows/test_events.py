"""Prefect events and asset lineage (tasks/events.py), read back through the API of the session's
test server: the real `judge` stage in a flow, computed and then Cached; the evaluate round
event and the loop decision from hand-made evaluate folders; nothing emitted outside a run.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/flows/test_events.py -q
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

from prefect import flow

from fire_mpo_core.loop.config import LoopConfig
from fire_mpo_core.loop.decide import RoundScore, decide
from fire_mpo_core.store import ArtifactStore, read_manifest, write_jsonl
from tasks.common import StageCall, publish_cached_summary, run_stage_task
from tasks.events import (
    LOOP_CONTINUE,
    ROUND_EVALUATED,
    STAGE_COMPLETED,
    asset_key,
    emit_loop_decision,
)
from tasks.judge import judge
from testing_support.prefect_events import related_ids, wait_for_events
from testing_support.stage_inputs import GOOD, dataset, finished, rollout

MATERIALIZED = "prefect.asset.materialization.succeeded"


@flow(name="events-judge")
def judge_flow(call: StageCall, config: str) -> str:
    """The stage as the cycle's runner calls it; `config` is what the events' label reads."""
    return run_stage_task(judge, call)


@flow(name="events-evaluate")
def evaluated_flow(call: StageCall, folder: str, config: str, decision: dict) -> None:
    """A finished evaluation as the runner publishes a Cached one, then the loop's event."""
    publish_cached_summary(call, folder)
    emit_loop_decision(call.run, call.store, config, decision, folder)


def _judge_call(tmp_path: Path, run: str) -> StageCall:
    store = ArtifactStore(tmp_path / "store")
    prep = dataset(store, [], {})
    sample = finished(
        store, "sample", lambda p: write_jsonl(p / "data.jsonl", [rollout(r, "no") for r in GOOD])
    )
    return StageCall(
        store=store.root,
        run=run,
        round=1,
        stage="judge",
        config={"judge": {"name": "rules"}},
        inputs={"prepare": prep, "sample": sample},
    )


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=1)


def test_stage_events_and_lineage_computed_then_cached(prefect_harness, tmp_path):
    since = _now()
    # Outside a run (a script or test calling the task function): no event, no temporary API.
    direct = _judge_call(tmp_path / "direct", run="direct")
    judge.fn(direct)
    call = _judge_call(tmp_path, run="ev")
    first = judge_flow(call, "cfg.yaml", return_state=True)
    again = judge_flow(call, "cfg.yaml", return_state=True)
    out = Path(first.result())
    manifest = read_manifest(out)

    events = wait_for_events([STAGE_COMPLETED], since, until=lambda e: len(e) >= 2)
    assert [e.resource.id for e in events] == ["fire-mpo.run.ev.round.1.stage.judge"] * 2, (
        "one event per flow run, none from the direct call"
    )
    for event, state, cached in ((events[0], first, False), (events[1], again, True)):
        assert event.payload["cached"] is cached
        assert event.payload["counts"] == manifest["counts"] and event.payload["path"] == str(out)
        labels = dict(event.resource.items())
        assert labels["fire-mpo.key"] == manifest["key"] and labels["fire-mpo.round"] == "1"
        assert labels["fire-mpo.store"] == str(call.store.resolve())
        assert labels["fire-mpo.config"] == str(Path("cfg.yaml").resolve())
        assert related_ids(event, "flow-run") == {
            f"prefect.flow-run.{state.state_details.flow_run_id}"
        }
        assert related_ids(event, "input") == {asset_key(p) for p in call.inputs.values()}
        assert related_ids(event, "output") == {asset_key(out)}

    # Lineage: the computed run materialised the folder from its input folders; the Cached
    # one materialised nothing (Prefect emits no asset event for a cache hit).
    mats = wait_for_events([MATERIALIZED], since, until=lambda e: len(e) >= 1)
    assert [e.resource.id for e in mats] == [asset_key(out)], mats
    assert related_ids(mats[0], "asset") == {asset_key(p) for p in call.inputs.values()}
    assert mats[0].payload["store_key"] == manifest["key"]
    assert mats[0].payload["counts"] == manifest["counts"]
    assert mats[0].resource.get("prefect.resource.name") == "ev round 1 judge"


def _evaluation(store: ArtifactStore, val: dict) -> Path:
    def build(w) -> None:
        (w.path / "val_metrics.json").write_text(json.dumps(val))

    return store.run_stage(
        run="lp", round_=0, stage="evaluate", config=val, inputs={}, code="t", fn=build
    ).path


def test_round_evaluated_and_loop_decision_events(prefect_harness, tmp_path):
    store = ArtifactStore(tmp_path / "store")
    r0 = {"grounded_accuracy": 0.25, "closed_accuracy": 0.5, "closed_accuracy_n": 8}
    r1 = {"grounded_accuracy": 0.5, "closed_accuracy": 0.375, "closed_accuracy_n": 8}
    decision = decide(
        [RoundScore(round=0, value=0.25), RoundScore(round=1, value=0.5)], LoopConfig()
    )
    previous = _evaluation(store, r0)
    folder = _evaluation(store, r1)
    call = StageCall(
        store=store.root,
        run="lp",
        round=1,
        stage="evaluate",
        config={},
        inputs={"previous": previous},
    )
    since = _now()
    evaluated_flow(call, str(folder), "loop.yaml", decision.model_dump(mode="json"))

    (ev,) = wait_for_events([ROUND_EVALUATED], since, until=lambda e: len(e) >= 1)
    assert ev.resource.id == "fire-mpo.run.lp.round.1"
    assert ev.payload["val_metrics"] == r1
    # Hand-derived: 0.5 - 0.25, 0.375 - 0.5, 8 - 8.
    assert ev.payload["change"] == {
        "grounded_accuracy": 0.25,
        "closed_accuracy": -0.125,
        "closed_accuracy_n": 0,
    }

    (loop,) = wait_for_events([LOOP_CONTINUE], since, until=lambda e: len(e) >= 1)
    assert decision.action == "continue" and decision.improved
    assert loop.payload["reason"] == decision.reason and "improved" in decision.reason
    assert {k: loop.payload[k] for k in ("run", "store", "config", "round")} == {
        "run": "lp",
        "store": str(store.root),
        "config": str(Path("loop.yaml").resolve()),
        "round": 1,
    }
