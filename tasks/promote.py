"""Task `promote`: after a round's evaluation, make the loop's decision and offer the round's
adapter for `<store>/<run>/best`.

The flow calls `promote_round(store, run, round_, train, evaluate, loop)` with finished folders
and the cycle's `loop` section. The decision (`fire_mpo_core.loop.decide.decide_after`, over
the evaluation's `history.jsonl`) is recorded at `<store>/<run>/decisions/round-<k>.json`; the
promotion rule and files are `fire_mpo_core.loop.promote`'s (the best by validation metric,
never backwards). The task publishes a link artifact to the best adapter (`<run>-best`) and
the model card as a markdown artifact (`<run>-model-card`), logs the decision and why the
pointer moved or stayed, and returns ``{"decision": <LoopDecision>, "promotion":
<Promotion>}``. Never cached: it is cheap, must see the store as it is now, and applies the
current loop settings to evaluations that may be cached.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from fire_mpo_core.loop.config import LoopConfig
from fire_mpo_core.loop.decide import decide_after, record_decision
from fire_mpo_core.loop.promote import BEST, Candidate, promote
from tasks.common import artifact_key, task_logger


@task(
    name="promote", task_run_name="promote-r{round_}", cache_policy=NO_CACHE, persist_result=False
)
def promote_round(
    store: str, run: str, round_: int, train: str, evaluate: str, loop: dict[str, Any]
) -> dict:
    """Decide after round ``round_`` and promote it if it is the best so far; returns the
    decision and the promotion (JSON-ready)."""
    cfg = LoopConfig.model_validate(loop)
    decision = decide_after(Path(evaluate), cfg)
    record_decision(Path(store), run, decision)
    log = task_logger("promote")
    log.info(f"loop after round {round_}: {decision.action} ({decision.reason})")
    cand = Candidate.from_evaluation(round_, Path(train), Path(evaluate), cfg.metric)
    p = promote(Path(store), run, cand)
    log.info(f"best of run {run!r}: {p.action}: {p.reason}")
    if p.card is not None:
        create_link_artifact(
            (Path(store).resolve() / run / BEST / "adapter").as_uri(),
            link_text=f"{run}: best adapter, round {p.round} ({p.metric} {p.value})",
            key=artifact_key(f"{run}-best"),
            description=f"`{BEST}` of run `{run}`: {p.reason}",
        )
        create_markdown_artifact(
            Path(p.card).read_text(),
            key=artifact_key(f"{run}-model-card"),
            description=f"Model card of the best adapter of run `{run}` (round {p.round})",
        )
    return {"decision": decision.model_dump(mode="json"), "promotion": p.model_dump(mode="json")}
