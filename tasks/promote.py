"""Task `promote`: after a round's evaluation, offer its adapter for `<store>/<run>/best` and
return the loop's decision.

The flow calls `promote_round(store, run, round_, train, evaluate, metric)` with finished
folders. The rule and the files are `fire_mpo_core.loop.promote`'s (the best by validation
metric, never backwards); this task publishes a link artifact to the best adapter
(`<run>-best`) and the model card as a markdown artifact (`<run>-model-card`), logs why the
pointer moved or stayed, and returns ``{"decision": <decision.json of the evaluation>,
"promotion": <Promotion>}``. Never cached: it is cheap and must see the store as it is now.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect import task
from prefect.artifacts import create_link_artifact, create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from fire_mpo_core.loop.promote import BEST, Candidate, promote
from tasks.common import artifact_key, task_logger
from tasks.evaluate import DECISION_FILE


@task(
    name="promote", task_run_name="promote-r{round_}", cache_policy=NO_CACHE, persist_result=False
)
def promote_round(
    store: str, run: str, round_: int, train: str, evaluate: str, metric: str
) -> dict:
    """Promote round ``round_`` if it is the best so far; returns its decision and promotion."""
    cand = Candidate.from_evaluation(round_, Path(train), Path(evaluate), metric)
    p = promote(Path(store), run, cand)
    task_logger("promote").info(f"best of run {run!r}: {p.action}: {p.reason}")
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
    path = Path(evaluate) / DECISION_FILE
    decision = json.loads(path.read_text()) if path.is_file() else None
    return {"decision": decision, "promotion": p.model_dump(mode="json")}
