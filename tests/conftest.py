"""Shared fixtures of every layer (tests/core, tests/tasks, tests/flows, tests/bench): the
real-data location, one Prefect test server for the whole session, the tiny data + model world
(built once per spec) and the fake OpenAI-compatible server. The helpers behind them live in
``testing_support/`` (importable by ``bench/`` too).

    .venv/bin/python -m pytest -q                    # what `make test` runs (not the slow ones)
    .venv/bin/python -m pytest tests/core -q         # one layer
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from testing_support import REPO

# Tests never reach a model hub or telemetry endpoint; progress bars only clutter the output.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

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


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> Callable[..., dict[str, Any]]:
    """``tiny_world(**spec)``: :func:`testing_support.world.build_world` for that spec, built
    once per session in its own folder and shared by every test that asks for the same spec
    (read it, do not write into it)."""
    from testing_support.world import build_world

    built: dict[str, dict[str, Any]] = {}

    def make(**spec: Any) -> dict[str, Any]:
        key = json.dumps(spec, sort_keys=True)
        if key not in built:
            built[key] = build_world(tmp_path_factory.mktemp("world"), **spec)
        return built[key]

    return make


@pytest.fixture
def fake_openai() -> Iterator[Any]:
    """A started :class:`testing_support.fake_openai.FakeOpenAI` (plain OpenAI endpoint, replies
    ``ok`` unless scripted), stopped after the test."""
    from testing_support.fake_openai import FakeOpenAI

    with FakeOpenAI(lifetime_s=60) as server:
        yield server


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op torch thread for a module (``pytestmark = pytest.mark.usefixtures(
    "one_thread")``). Tiny matrices: one thread is as fast alone and far faster on a busy
    machine (two spinning OpenMP threads per process on two shared cores cost 10x here)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def no_progress_bars(monkeypatch) -> None:
    """Stage bodies called directly: their progress bars would go to the Prefect API, an
    external service that is not under test there."""
    import tasks.common

    monkeypatch.setattr(tasks.common, "create_progress_artifact", lambda *a, **k: None)
    monkeypatch.setattr(tasks.common, "update_progress_artifact", lambda *a, **k: None)


@pytest.fixture
def store(tmp_path):
    """An empty artifact store in the test's folder (the stage-body tests run bodies on it)."""
    from fire_mpo_core.store import ArtifactStore

    return ArtifactStore(tmp_path / "store")
