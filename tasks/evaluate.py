"""Stage `evaluate`: benchmark a policy on the test split; writes `metrics.json` and `report.md`.

Metrics are listed in `fire_mpo_core.evaluation.vqa`; with grounding on, the folder also holds
`grounding.jsonl`. Inputs `prepare` (the dataset), `policy` (any stage folder with a
`policy.json`) and, from round 1 on, `previous` (the last round's evaluation), whose
`history.jsonl` is extended so the report tracks every round.
"""

from __future__ import annotations

import json
from pathlib import Path

from prefect.artifacts import create_markdown_artifact

from fire_mpo_core.evaluation.config import EvaluateConfig
from fire_mpo_core.evaluation.vqa import evaluate_policy
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
    metrics = evaluate_policy(
        read_policy(call.inputs["policy"]),
        call.inputs["prepare"],
        cfg,
        w.path,
        dtype=call.config["dtype"],
        on_reject=w.reject,
    )
    history = []
    if "previous" in call.inputs:
        history = [json.loads(x) for x in (call.inputs["previous"] / "history.jsonl").open()]
    history.append({"round": call.round, **{k: metrics.get(k) for k in HEADLINE}})
    (w.path / "history.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))

    rounds = "\n".join(
        "| " + " | ".join(str(h.get(k)) for k in ("round", *HEADLINE)) + " |" for h in history
    )
    # Timings go to the manifest (counts), not into report.md: the folder's content digest must
    # not change when nothing but the machine's speed did (the next round keys on it).
    rows = "\n".join(
        f"| {k} | {v} |" for k, v in sorted(metrics.items()) if k != "samples_per_second"
    )
    report = (
        f"# FiRe-MPO evaluation: run `{call.run}`, round {call.round}\n\n"
        f"Split `{cfg.split}`; policy `{_in_store(call.inputs['policy'], call.store)}`.\n\n"
        f"## Across rounds (round 0 = SFT base)\n\n| round | {' | '.join(HEADLINE)} |\n"
        f"|{'---|' * (len(HEADLINE) + 1)}\n{rounds}\n\n"
        f"## All metrics, round {call.round}\n\n| metric | value |\n|---|---|\n{rows}\n"
    )
    (w.path / "report.md").write_text(report)
    create_markdown_artifact(
        report,
        key=artifact_key(f"{call.run}-evaluation"),
        description=f"Evaluation of round {call.round}",
    )
    return {k: v for k, v in metrics.items() if isinstance(v, int | float)}


evaluate = stage_task(
    "evaluate",
    body,
    tags=["compute"],
)
