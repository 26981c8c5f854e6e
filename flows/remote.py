"""Run one stage through a Prefect deployment (another work pool, e.g. the GPU pool).

A cycle config with `remote_stages: {train: fire-mpo/stage-train-gpu}` makes the flow call
`run_deployment` for that stage and wait for it, instead of running the task in its own process.
The deployment is the single-stage flow (`flows/stage.py`) on another worker, which reads its
inputs from, and writes its output to, the same store. "The same store" is checked, not
assumed: the caller passes the store's id (a random token kept in `<store>/.store-id`) and the
remote flow refuses to run on a folder with another id or none, naming both paths.
"""

from __future__ import annotations

import uuid
from pathlib import Path

STORE_ID = ".store-id"


def store_id(root: Path, create: bool = False) -> str | None:
    """The store's id token (created on first use when `create`); None if it has none."""
    path = Path(root) / STORE_ID
    if not path.is_file() and create:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{uuid.uuid4().hex}")
        tmp.write_text(uuid.uuid4().hex)
        try:  # first writer wins: a hard link fails if another process created it meanwhile
            path.hardlink_to(tmp)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return path.read_text().strip() if path.is_file() else None


def check_shared_store(root: Path, expected: str) -> None:
    """Raise unless `root` is the store whose id is `expected` (shared between workers)."""
    found = store_id(root)
    if found != expected:
        raise RuntimeError(
            f"store {root} on this worker is not the caller's store (id {found!r}, expected "
            f"{expected!r}): stages on another work pool need the same store path, mounted on "
            "both machines (set `store:` to that shared path)"
        )


def run_remote(deployment: str, parameters: dict, label: str) -> None:
    """Run `deployment` as a subflow of the current flow run, wait, and raise unless it
    Completed (the message names the deployment, its flow run and the state's message)."""
    from prefect.deployments import run_deployment

    run = run_deployment(deployment, parameters=parameters, timeout=None, as_subflow=True)
    if not run.state or not run.state.is_completed():
        state = run.state.name if run.state else "unknown"
        msg = run.state.message if run.state else ""
        raise RuntimeError(f"{label} on {deployment} (flow run {run.name}) ended {state}: {msg}")
