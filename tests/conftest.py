"""Shared fixtures: real-data location, and one Prefect test server for the whole session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests never reach a model hub or telemetry endpoint; progress bars only clutter the output.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REPO = Path(__file__).resolve().parents[1]
REALDATA = Path(os.environ.get("FIRE_MPO_REALDATA", REPO.parent / "shared" / "realdata"))


@pytest.fixture(scope="session")
def realdata() -> Path:
    if not REALDATA.is_dir():
        pytest.skip(f"real data not found at {REALDATA} (set FIRE_MPO_REALDATA)")
    return REALDATA


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect API server (SQLite) shared by every flow test."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def task_states(flow_run_id, settle_s: float = 20.0) -> dict[str, str]:
    """Task run name -> final state name of a flow run.

    Prefect 3 records task-run states through its events pipeline, asynchronously: right after a
    flow returns, the API may still show a task as Running (or not at all). Poll until every
    task run is in a final state and two reads agree.
    """
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    final = {"Completed", "Cached", "Failed", "Crashed", "Cancelled"}
    last: dict[str, str] | None = None
    deadline = time.monotonic() + settle_s
    while True:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )
        states = {r.name: r.state.name for r in runs}
        settled = bool(states) and set(states.values()) <= final
        if (settled and states == last) or time.monotonic() > deadline:
            return states
        last = states if settled else None
        time.sleep(0.5)
