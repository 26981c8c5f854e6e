"""The dashboard report: after the cycle, one markdown artifact per run under a stable key.

The flow calls `dashboard(run, evaluations, corrupt, prepare, store)` with finished stage folders;
the task renders `fire_mpo_core.report.cycle_report` and publishes it as the markdown artifact
`<run>-report` (same key every time, so Prefect keeps its history across runs and rounds). Its
cache key is made of the folder paths, which are content keys already, so a fully cached cycle
shows this task Cached too.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.context import TaskRunContext

from fire_mpo_core.report import cycle_report
from fire_mpo_core.store import code_version
from tasks.common import CACHE_DIR, artifact_key

CODE = code_version("tasks.dashboard", "fire_mpo_core.report")


def _key(ctx: TaskRunContext, params: dict[str, Any]) -> str:
    blob = json.dumps({k: params[k] for k in sorted(params) if k != "store"}, default=str)
    return "dashboard-" + hashlib.sha256((blob + CODE).encode()).hexdigest()[:32]


@task(
    name="dashboard",
    task_run_name="dashboard",
    cache_key_fn=_key,
    persist_result=True,
    result_serializer="json",
)
def dashboard(
    run: str,
    evaluations: dict[int, str],
    corrupt: str | None,
    prepare: str | None,
    store: str,
) -> str:
    """Publish the run's report; returns the artifact key."""
    markdown = cycle_report(
        run,
        {int(k): Path(v) for k, v in evaluations.items()},
        Path(corrupt) if corrupt else None,
        Path(prepare) if prepare else None,
    )
    key = artifact_key(f"{run}-report")
    create_markdown_artifact(markdown, key=key, description=f"FiRe-MPO report of run `{run}`")
    return key


def bind_dashboard(store: Path):
    """The task with its cache records and results in `<store>/_prefect` (like the stages)."""
    cache_dir = Path(store).resolve() / CACHE_DIR
    return dashboard.with_options(
        cache_key_fn=_key,
        result_storage=cache_dir / "results",
    )
