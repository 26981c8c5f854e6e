"""Stage `evaluate`: benchmark a policy on the test split; writes `metrics.json` and `report.md`.

Metrics are listed in `fire_mpo_core.evaluation.vqa`; with grounding on, the folder also holds
`grounding.jsonl`. Inputs `prepare` (the dataset), `policy` (any stage folder with a
`policy.json`) and, from round 1 on, `previous` (the last round's evaluation), whose
`history.jsonl` is extended so the report tracks every round.

The selection pass (`evaluate.selection_split`, val) writes `val_metrics.json` (rows under
`val/`); history rows carry its ranking metrics as `val_<name>`. The loop decides on those
values after the stage (tasks/promote.py, never cached), so this stage keys on no loop
setting. Decisions never read the test split.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect.artifacts import create_markdown_artifact

from fire_mpo_core.evaluation.config import SELECTION_METRICS, EvaluateConfig
from fire_mpo_core.evaluation.vqa import evaluate_with_selection
from fire_mpo_core.loop.decide import HISTORY, VAL_PREFIX
from fire_mpo_core.openai_client import add_counts
from fire_mpo_core.policy import read_policy
from fire_mpo_core.store import StageWriter
from tasks.common import StageCall, artifact_key, stage_task

HEADLINE = (
    "closed_accuracy",
    "open_exact_match",
    "open_recall",
    "report_token_f1",
    "clinical_f1",
    "closed_lesion_accuracy",
    "grounded_accuracy",
    "keep_accuracy",
    "blind_accuracy",
    "lesion_attention_ratio",
)


def _in_store(path: Path, store: Path) -> str:
    """A folder as the report shows it: relative to the store root, so a moved store's report
    still names the right folder (absolute only when it lies outside the store)."""
    path, store = Path(path).resolve(), Path(store).resolve()
    return path.relative_to(store).as_posix() if path.is_relative_to(store) else str(path)


def body(call: StageCall, w: StageWriter) -> dict:
    cfg = EvaluateConfig.model_validate(call.config["evaluate"])
    used: list[dict] = []  # the endpoints' llm_* counts of each pass (judge / GREEN, if any)
    metrics, val = evaluate_with_selection(
        read_policy(call.inputs["policy"]),
        call.inputs["prepare"],
        cfg,
        w.path,
        dtype=call.config["dtype"],
        on_reject=w.reject,
        on_usage=used.append,
    )
    history = _history(call, metrics, val)
    (w.path / HISTORY).write_text("".join(json.dumps(h) + "\n" for h in history))
    report = _report(call, cfg, history, metrics)
    (w.path / "report.md").write_text(report)
    create_markdown_artifact(
        report,
        key=artifact_key(f"{call.run}-evaluation"),
        description=f"Evaluation of round {call.round}",
    )
    counts = {k: v for k, v in metrics.items() if isinstance(v, int | float)}
    counts |= {k: v for k, v in history[-1].items() if k.startswith(VAL_PREFIX) and v is not None}
    return counts | add_counts(used)  # no endpoint: no llm_* rows


def _history(call: StageCall, metrics: dict, val: dict | None) -> list[dict]:
    """The previous evaluation's history.jsonl rows plus this round's: the headline test
    metrics as they always were, and the selection pass's ranking metrics as `val_<name>`
    (whichever `loop.metric` names)."""
    history = []
    if "previous" in call.inputs:
        history = [json.loads(x) for x in (call.inputs["previous"] / HISTORY).open()]
    row = {"round": call.round, **{k: metrics.get(k) for k in HEADLINE}}
    if val is not None:
        row |= {VAL_PREFIX + k: val.get(k) for k in dict.fromkeys((*HEADLINE, *SELECTION_METRICS))}
    return [*history, row]


def _report(call: StageCall, cfg: EvaluateConfig, history: list[dict], metrics: dict) -> str:
    """report.md: metrics by round (test; validation where measured) and every metric of this
    round."""
    keys = (
        "round",
        *HEADLINE,
        *(VAL_PREFIX + k for k in HEADLINE if VAL_PREFIX + k in history[-1]),
    )
    rounds = "\n".join("| " + " | ".join(str(h.get(k)) for k in keys) + " |" for h in history)
    # Timings go to the manifest (counts), not into report.md: the folder's content digest must
    # not change when nothing but the machine's speed did (the next round keys on it).
    rows = "\n".join(
        f"| {k} | {v} |" for k, v in sorted(metrics.items()) if k != "samples_per_second"
    )
    return (
        f"# FiRe-MPO evaluation: run `{call.run}`, round {call.round}\n\n"
        f"Split `{cfg.split}`; policy `{_in_store(call.inputs['policy'], call.store)}`.\n\n"
        f"## Across rounds (round 0 = SFT base)\n\n| {' | '.join(keys)} |\n"
        f"|{'---|' * len(keys)}\n{rounds}\n\n"
        f"## All metrics, round {call.round}\n\n| metric | value |\n|---|---|\n{rows}\n"
    )


evaluate = stage_task(
    "evaluate",
    body,
    tags=["compute"],
)
