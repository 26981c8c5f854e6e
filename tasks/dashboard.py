"""The dashboard report: after the cycle, one markdown artifact per run under a stable key.

The flow calls `dashboard(run, evaluations, corrupt, prepare, store, trains)` with finished stage
folders; the task renders `fire_mpo_core.report.cycle_report` (with its Health section when train
folders are given) and publishes it as the markdown artifact `<run>-report` (same key every time,
so Prefect keeps its history across runs and rounds). The plots it embeds are also written to
`<store>/<run>/report/` as PNG files. It is never cached: it reads a few small files and draws
three plots (about 2 s on a loaded 2-core machine, 3 rounds), and a cached run on another
server (a new `make serve`, a GPU pool's API) must still show the report there.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from fire_mpo_core.report import cycle_report
from tasks.common import artifact_key

REPORT_DIR = "report"  # <store>/<run>/report/: the report's PNG plots


@task(name="dashboard", task_run_name="dashboard", cache_policy=NO_CACHE, persist_result=False)
def dashboard(
    run: str,
    evaluations: dict[int, str],
    corrupt: str | None,
    prepare: str | None,
    store: str,
    trains: dict[int, str] | None = None,
) -> str:
    """Publish the run's report; returns the artifact key."""
    markdown = cycle_report(
        run,
        {int(k): Path(v) for k, v in evaluations.items()},
        Path(corrupt) if corrupt else None,
        Path(prepare) if prepare else None,
        trains={int(k): Path(v) for k, v in (trains or {}).items()},
        plots_dir=Path(store) / run / REPORT_DIR,
    )
    key = artifact_key(f"{run}-report")
    create_markdown_artifact(markdown, key=key, description=f"FiRe-MPO report of run `{run}`")
    return key
