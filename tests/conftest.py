"""Shared fixtures: real-data location, and one Prefect test server for the whole session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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
