"""Prefect events and asset lineage of the stages and of the loop: what the event feed, the
Automations page and (on Prefect Cloud) the asset graph show.

Events (`prefect.events.emit_event`; Prefect adds the flow run, task run, flow and deployment
they came from as related resources):

- `fire-mpo.stage.completed`, from every stage, computed or Cached: resource
  `fire-mpo.run.<run>.round.<k>.stage.<stage>` with labels `fire-mpo.run`, `.round`, `.stage`,
  `.key`, `.store`, `.config`; payload: the manifest's counts, `cached`, `seconds`, the output
  asset and the input assets.
- `fire-mpo.round.evaluated`, from `evaluate` as well: resource `fire-mpo.run.<run>.round.<k>`;
  payload: the round's validation metrics (`val_metrics.json`) and their change against the
  previous round's.
- `fire-mpo.loop.continue` / `fire-mpo.loop.stop`, once at the end of a cycle run, for the last
  round it evaluated (:func:`emit_loop_decision`): the decision its promote task made
  (`fire_mpo_core.loop.decide.decide_after`) and its reason, plus the
  `config`, `store` and `run` that `fire-mpo/next-round` needs; the automation registered by
  `deployments/register.py` runs that deployment on `continue`.

Assets: each stage's output folder is the asset `file://<absolute folder>` (the content-keyed
folder: one key = one immutable content, so an edge "train <- corrupt" names exactly the pairs
that adapter was trained on, and a cached rerun refers to the same asset). The stage task is a
`MaterializingTask` whose asset and upstream assets (its input folders) are set per call
(`tasks.common.for_call`), so Prefect emits `prefect.asset.materialization.succeeded` (or
`.failed`) with the upstream assets as related resources. Prefect emits no asset event for a
Cached task run (it materialised nothing); the run that computed the folder recorded its
lineage, and the cached run's `fire-mpo.stage.completed` event still names the asset and its
inputs.

Outside a Prefect run (a stage function called directly by a test or a script) nothing is
emitted: there is no run to attach the event to, and Prefect would start a temporary API
server only to send it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from prefect.assets import Asset, AssetProperties
from prefect.context import AssetContext, FlowRunContext, TaskRunContext
from prefect.events import emit_event
from pydantic import ValidationError

from fire_mpo_core.store import StageResult


class StageCall(Protocol):
    """What the events read of a `tasks.common.StageCall` (which imports this module)."""

    store: Path
    run: str
    round: int
    stage: str
    inputs: Mapping[str, Path]


STAGE_COMPLETED = "fire-mpo.stage.completed"
ROUND_EVALUATED = "fire-mpo.round.evaluated"
LOOP_CONTINUE = "fire-mpo.loop.continue"
LOOP_STOP = "fire-mpo.loop.stop"
#: What the evaluate stage writes for the loop, and the promoted round (fire_mpo_core/loop).
VAL_METRICS = "val_metrics.json"
BEST = "best.json"  # <store>/<run>/best.json: the promoted round

log = logging.getLogger("fire_mpo.events")


def in_run() -> bool:
    """True inside a Prefect flow or task run (where events have a run to belong to)."""
    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def round_resource_id(run: str, round_: int) -> str:
    return f"fire-mpo.run.{run}.round.{round_}"


def stage_resource_id(run: str, round_: int, stage: str) -> str:
    return f"{round_resource_id(run, round_)}.stage.{stage}"


def asset_key(folder: str | Path) -> str:
    """The asset key of a stage output folder: `file://` + its absolute path."""
    return "file://" + Path(folder).resolve().as_posix()


def folder_asset(folder: str | Path, name: str | None = None) -> Asset | None:
    """The Prefect asset of a stage output folder; None (with one warning per store) when its
    path holds a character Prefect refuses in asset keys (a space, '%', '#', ...): lineage is
    then off for that store, the stage itself is unaffected."""
    key = asset_key(folder)
    try:
        return Asset(key=key, properties=AssetProperties(name=name) if name else None)
    except ValidationError as e:
        why = e.errors()[0]["msg"]
        if why not in _warned:  # once per reason: every folder of that store would repeat it
            _warned.add(why)
            log.warning(f"no Prefect asset lineage for {key} and folders like it: {why}")
        return None


_warned: set[str] = set()


def stage_assets(call: StageCall, output: Path) -> tuple[Asset | None, list[Asset]]:
    """(the output folder's asset, its input folders' assets) for one stage call."""
    out = folder_asset(output, f"{call.run} round {call.round} {call.stage}")
    ins = [a for a in (folder_asset(p) for p in call.inputs.values()) if a is not None]
    return out, ins


def describe_materialization(res: StageResult) -> None:
    """Inside a materialising task run: the manifest's counts, key and code version as the
    asset's materialisation metadata (the payload of Prefect's materialisation event)."""
    ctx = AssetContext.get()
    key = asset_key(res.path)
    if ctx is None or key not in {a.key for a in ctx.downstream_assets}:
        return
    m = res.manifest
    ctx.add_asset_metadata(
        key,
        {
            "stage": m.get("stage"),
            "run": m.get("run"),
            "round": m.get("round"),
            "store_key": res.key,
            "code_version": m.get("code_version"),
            "counts": m.get("counts", {}),
        },
    )


def _config_path() -> str | None:
    """The current flow run's `config` parameter, made absolute (the worker's working
    directory is the checkout, where relative config paths are meant)."""
    from prefect.runtime import flow_run

    config = flow_run.parameters.get("config")
    return str(Path(config).resolve()) if config else None


def emit_stage_events(call: StageCall, res: StageResult) -> None:
    """`fire-mpo.stage.completed` for a finished stage (and `fire-mpo.round.evaluated` for
    `evaluate`); nothing outside a Prefect run."""
    if not in_run():
        return
    out, ins = stage_assets(call, res.path)
    resource = {
        "prefect.resource.id": stage_resource_id(call.run, call.round, call.stage),
        "prefect.resource.name": f"{call.stage}-r{call.round}",
        "fire-mpo.run": call.run,
        "fire-mpo.round": str(call.round),
        "fire-mpo.stage": call.stage,
        "fire-mpo.key": res.key,
        "fire-mpo.store": str(Path(call.store).resolve()),
        "fire-mpo.config": _config_path() or "",
    }
    related = [{"prefect.resource.id": a.key, "prefect.resource.role": "input"} for a in ins]
    if out is not None:
        related.append({"prefect.resource.id": out.key, "prefect.resource.role": "output"})
    m = res.manifest
    payload = {
        "counts": m.get("counts", {}),
        "cached": res.cached,
        "seconds": m.get("seconds"),
        "path": str(res.path),
        "asset": out.key if out else None,
        "inputs": {name: asset_key(p) for name, p in sorted(call.inputs.items())},
    }
    emit_event(STAGE_COMPLETED, resource=resource, related=related, payload=payload)
    if call.stage == "evaluate":
        emit_round_evaluated(call, res.path)


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object file, or None when it does not exist."""
    return json.loads(path.read_text()) if path.is_file() else None


def metric_changes(now: dict[str, Any], before: dict[str, Any] | None) -> dict[str, float]:
    """now - before for every numeric metric both hold (bools and missing values skipped)."""
    if not before:
        return {}
    out = {}
    for name, v in now.items():
        b = before.get(name)
        if _number(v) and _number(b):
            out[name] = v - b
    return out


def _number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def emit_round_evaluated(call: StageCall, folder: Path) -> None:
    """`fire-mpo.round.evaluated`: the validation metrics of the round, their change against
    the previous round's evaluation (its `previous` input) and the round's decision. Skipped
    (logged) for an evaluation without validation metrics (`evaluate.selection_split: null`)."""
    val = read_json(folder / VAL_METRICS)
    if val is None:
        log.info(f"evaluate-r{call.round}: no {VAL_METRICS}, no {ROUND_EVALUATED} event")
        return
    previous = call.inputs.get("previous")
    before = read_json(Path(previous) / VAL_METRICS) if previous else None
    emit_event(
        ROUND_EVALUATED,
        resource={
            "prefect.resource.id": round_resource_id(call.run, call.round),
            "prefect.resource.name": f"{call.run} round {call.round}",
            "fire-mpo.run": call.run,
            "fire-mpo.round": str(call.round),
            "fire-mpo.store": str(Path(call.store).resolve()),
        },
        related=[{"prefect.resource.id": asset_key(folder), "prefect.resource.role": "output"}],
        payload={
            "round": call.round,
            "val_metrics": val,
            "change": metric_changes(val, before),
        },
    )


def emit_loop_decision(
    run: str, store: Path, config: str, decision: Mapping[str, Any], evaluation: str | Path
) -> None:
    """`fire-mpo.loop.continue` or `fire-mpo.loop.stop` with ``decision`` (a LoopDecision as
    JSON) on the round that `evaluation` (an evaluate folder) scored. The payload carries what
    `fire-mpo/next-round` needs: `config` (absolute), `store`, `run` and `round` (its
    `after_round`). Nothing is emitted outside a run."""
    if not in_run():
        return
    action = decision["action"]
    if action not in ("continue", "stop"):
        raise ValueError(f"loop decision of round {decision['round']}: action {action!r}")
    store = Path(store).resolve()
    best = read_json(store / run / BEST)
    related = [
        {"prefect.resource.id": asset_key(evaluation), "prefect.resource.role": "evaluation"}
    ]
    emit_event(
        LOOP_CONTINUE if action == "continue" else LOOP_STOP,
        resource={
            "prefect.resource.id": round_resource_id(run, decision["round"]),
            "prefect.resource.name": f"{run} round {decision['round']}",
            "fire-mpo.run": run,
            "fire-mpo.round": str(decision["round"]),
            "fire-mpo.store": str(store),
            "fire-mpo.config": str(Path(config).resolve()),
        },
        related=related,
        payload={
            "run": run,
            "store": str(store),
            "config": str(Path(config).resolve()),
            "round": decision["round"],
            "reason": decision.get("reason"),
            "decision": dict(decision),
            "best": best,
        },
    )
