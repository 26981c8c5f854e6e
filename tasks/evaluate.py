"""Stage `evaluate`: benchmark a policy on the test split; writes `metrics.json`.

Inputs `prepare` (the dataset) and `policy` (any stage folder with a `policy.json`).
"""

from __future__ import annotations

import json

from prefect.artifacts import create_markdown_artifact

from fire_mpo_core.config import EvaluateConfig
from fire_mpo_core.evaluation.vqa import evaluate_policy
from fire_mpo_core.policy import read_policy
from fire_mpo_core.store import StageWriter
from tasks.common import StageCall, _artifact_key, stage_task


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
    rows = "\n".join(f"| {k} | {v} |" for k, v in sorted(metrics.items()))
    report = (
        f"# FiRe-MPO evaluation: run `{call.run}`, round {call.round}\n\n"
        f"Split `{cfg.split}`; policy `{call.inputs['policy']}`.\n\n"
        f"| metric | value |\n|---|---|\n{rows}\n"
    )
    (w.path / "report.md").write_text(report)
    create_markdown_artifact(
        report,
        key=_artifact_key(f"{call.run}-evaluation-r{call.round}"),
        description=json.dumps({k: metrics.get(k) for k in ("closed_accuracy", "open_recall")}),
    )
    return {k: v for k, v in metrics.items() if not isinstance(v, dict)}


evaluate = stage_task(
    "evaluate",
    body,
    ["tasks.evaluate", "fire_mpo_core.evaluation", "fire_mpo_core.models", "fire_mpo_core.data"],
)
