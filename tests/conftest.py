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
