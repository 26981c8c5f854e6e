"""Flow-run housekeeping: which process runs a flow, dead runs, and the `compute` slot.

A run killed hard (SIGKILL, a lost machine, a forced second Ctrl-C) leaves two things behind:
its flow run stays "Running" forever, and the `tag:compute` slot its stage held stays taken, so
the next run waits for it silently and for ever. Prefect's answer to the second is the lease:
a holder renews it while alive, and the server's repossessor frees the slot once it expires.
Two gaps remain with `make run`'s temporary API: its leases lived in that API process's memory
(gone with it, while the slot count in the database stays up), and a temporary API runs no
repossessor. So:

- the flows keep leases on disk (`PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE`, set in
  `flows/full_cycle.py` and `scripts/serve.sh`), readable from every process of one
  PREFECT_HOME;
- :func:`claim` records `host:pid` of a flow run in its `infrastructure_pid` (as Prefect's
  process worker does), so a later start can tell a dead run from a live one;
- :func:`reclaim` (at each flow start) marks the flow runs whose process is gone Crashed, and
  frees the slots their leases hold, the expired ones and, on a temporary API, slots that have
  no lease at all;
- :func:`explain_wait` says what holds the slot before a stage waits for it.
"""

from __future__ import annotations

import os
import socket
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from prefect.exceptions import ObjectNotFound
from prefect.states import Cancelled, Crashed
from prefect.utilities.asyncutils import run_coro_as_sync

COMPUTE = "compute"
LIVE = [StateType.RUNNING, StateType.PENDING, StateType.CANCELLING]
FILESYSTEM_LEASES = "prefect.server.concurrency.lease_storage.filesystem"


def _host_pid() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def process_is_gone(infrastructure_pid: str | None) -> bool:
    """True only when `host:pid` names this host and no such process exists."""
    if not infrastructure_pid or ":" not in infrastructure_pid:
        return False
    host, _, pid = infrastructure_pid.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


#: The flow run this process last claimed: what a Ctrl-C in `main` cancels.
claimed: UUID | None = None


def claim(flow_run_id: UUID) -> None:
    """Record this process as the one running `flow_run_id` (unless a worker already did)."""
    global claimed
    claimed = flow_run_id
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run_id)
        if not run.infrastructure_pid:
            client.update_flow_run(flow_run_id, infrastructure_pid=_host_pid())


def _local_lease_storage() -> Any | None:
    """Prefect's own on-disk lease storage, when the API uses it (else None)."""
    if os.environ.get("PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE") != FILESYSTEM_LEASES:
        return None
    from prefect.server.concurrency.lease_storage.filesystem import ConcurrencyLeaseStorage

    return ConcurrencyLeaseStorage()


async def _leases_for(storage: Any, limit_id: UUID) -> list[Any]:
    out, offset = [], 0
    while True:
        ids = await storage.read_active_lease_ids(limit=100, offset=offset)
        for lease_id in ids:
            lease = await storage.read_lease(lease_id)
            if lease is not None and limit_id in lease.resource_ids:
                out.append(lease)
        if len(ids) < 100:
            return out
        offset += 100


def _ephemeral() -> bool:
    from prefect.settings import PREFECT_API_URL

    return not PREFECT_API_URL.value()


def reclaim(tag: str = COMPUTE, log: Any = None) -> dict[str, int]:
    """Crash the dead flow runs of this host; free the slots that dead or expired leases hold.

    Returns counts: `crashed` flow runs, `released` leases, `orphans` (slots without a lease).
    """
    say = log.warning if log is not None else (lambda _m: None)
    with get_client(sync_client=True) as client:
        dead = _crash_dead_runs(client, say)
        out = {"crashed": len(dead), "released": 0, "orphans": 0}
        try:
            limit = client.read_global_concurrency_limit_by_name(f"tag:{tag}")
        except ObjectNotFound:
            return out
        storage = _local_lease_storage()
        if storage is None:
            return out  # a server with leases in its memory: its repossessor frees them
        out["released"], held = _release_dead_leases(client, storage, limit.id, tag, dead, say)
        # Slots counted in the database but held by no lease: the in-memory leases of a killed
        # temporary API (before leases were kept on disk). Only safe to free on our own
        # temporary API, whose leases are certainly all in the storage just read.
        limit = client.read_global_concurrency_limit_by_name(f"tag:{tag}")
        orphans = limit.active_slots - held
        if orphans > 0 and _ephemeral():
            client.release_concurrency_slots([f"tag:{tag}"], orphans, occupancy_seconds=0)
            say(f"Released {orphans} {tag!r} slot(s) that no live run holds (a killed run's)")
            out["orphans"] = orphans
    return out


def _crash_dead_runs(client: Any, say: Any) -> set[UUID]:
    """Mark Crashed every live flow run whose process is gone; their ids."""
    dead: set[UUID] = set()
    runs = client.read_flow_runs(
        flow_run_filter=FlowRunFilter(
            state=FlowRunFilterState(type=FlowRunFilterStateType(any_=LIVE))
        ),
        limit=200,
    )
    for run in runs:
        if process_is_gone(run.infrastructure_pid):
            dead.add(run.id)
            why = f"its process {run.infrastructure_pid} is gone (killed)"
            # The server frees the concurrency slots of a task run that turns Crashed.
            names = ", ".join(repr(n) for n in _crash(client, run.id, why)) or "none"
            say(
                f"Flow run {run.name!r} ({run.id}), left Running by a killed process: "
                f"Crashed, with its unfinished task runs ({names}), freeing their slots"
            )
    return dead


def _release_dead_leases(
    client: Any, storage: Any, limit_id: UUID, tag: str, dead: set[UUID], say: Any
) -> tuple[int, int]:
    """Release the leases that expired or whose task run is dead; (released, slots still
    held by live leases)."""
    now = datetime.now(UTC)
    released = held = 0
    for lease in run_coro_as_sync(_leases_for(storage, limit_id)) or []:
        holder = lease.metadata.holder if lease.metadata else None
        why = None
        if lease.expiration <= now:
            why = "its lease expired (not renewed: the holder is gone)"
        elif holder is not None and holder.type == "task_run":
            why = _dead_holder(client, holder.id, dead)
        if why is None:
            held += lease.metadata.slots if lease.metadata else 0
            continue
        client.release_concurrency_slots_with_lease(lease.id)
        say(f"Released the {tag!r} slot held by task run {_holder_name(client, holder)}: {why}")
        released += 1
    return released, held


def _dead_holder(client: Any, task_run_id: UUID, dead: set[UUID]) -> str | None:
    try:
        task_run = client.read_task_run(task_run_id)
    except ObjectNotFound:
        return "its task run no longer exists"
    if task_run.flow_run_id in dead:
        return "its flow run's process is gone"
    if task_run.state is not None and task_run.state.is_final():
        return f"its task run is {task_run.state.name}"
    return None


def _holder_name(client: Any, holder: Any) -> str:
    if holder is None:
        return "?"
    try:
        return repr(client.read_task_run(holder.id).name)
    except ObjectNotFound:
        return str(holder.id)


def _crash(client: Any, flow_run_id: UUID, why: str) -> list[str]:
    """Mark a dead flow run and its unfinished task runs Crashed; returns those task runs."""
    client.set_flow_run_state(
        flow_run_id, Crashed(message=f"Marked at a later start: {why}."), force=True
    )
    crashed: list[str] = []
    for tr in client.read_task_runs(
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
    ):
        if tr.state is not None and not tr.state.is_final():
            client.set_task_run_state(
                tr.id, Crashed(message="Its flow run's process is gone."), force=True
            )
            crashed.append(tr.name)
    return crashed


def mark_cancelled(flow_run_id: UUID, why: str = "Interrupted (Ctrl-C)") -> None:
    """A user's interrupt is a cancellation, not a crash: the flow run and its unfinished or
    interrupted task runs become Cancelled."""
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run_id, Cancelled(message=why), force=True)
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
        for tr in task_runs:
            if tr.state is not None and (not tr.state.is_final() or tr.state.is_crashed()):
                client.set_task_run_state(tr.id, Cancelled(message=why), force=True)


def explain_wait(tag: str = COMPUTE) -> str | None:
    """None if a `tag` slot is free; else one line naming what holds it."""
    with get_client(sync_client=True) as client:
        try:
            limit = client.read_global_concurrency_limit_by_name(f"tag:{tag}")
        except ObjectNotFound:
            return None
        if limit.active_slots < limit.limit:
            return None
        holders = []
        for task_run_id in client.read_concurrency_limit_by_tag(tag).active_slots:
            try:
                tr = client.read_task_run(task_run_id)
                fr = client.read_flow_run(tr.flow_run_id) if tr.flow_run_id else None
            except ObjectNotFound:
                continue
            where = f" of flow run {fr.name!r} ({fr.id}, {fr.state_name}" if fr else " ("
            pid = f", process {fr.infrastructure_pid}" if fr and fr.infrastructure_pid else ""
            holders.append(f"task run {tr.name!r}{where}{pid})")
    who = "; ".join(holders) or "no run this API can name (a run killed before leases were kept)"
    return (
        f"waiting for a {tag!r} slot ({limit.active_slots} of {limit.limit} in use), held by "
        f"{who}; cancel it with `prefect flow-run cancel <id>`"
    )
