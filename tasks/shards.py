"""Fan-out of a stage over shards: Prefect shard tasks on a task runner, results in shard order.

The `judge` and `corrupt` stages split their work into ``cfg.shards`` contiguous shards and map
a shard task over them with a Prefect task runner; the core merges the results in shard order,
so the stage output is byte-identical to the unsharded run. The runner comes from the
environment of the process that runs the stage (a deployment setting, not part of the recipe,
so it never changes a stage's cache key):

==============================  ===============================================================
``FIRE_MPO_SHARD_RUNNER``       ``thread`` (default): ``ThreadPoolTaskRunner``, one thread per
                                shard, in the stage's process. ``dask``: ``prefect_dask.
                                DaskTaskRunner`` (``pip install -e '.[dask]'``)
``FIRE_MPO_DASK_ADDRESS``       scheduler of a running Dask cluster (``tcp://host:8786``); unset
                                with ``dask``: a temporary ``LocalCluster`` for this stage
==============================  ===============================================================

Dask workers must see the artifact store at the same path (corrupt shards write their images
straight into the stage's working folder) and have this project installed.

    from tasks.shards import run_shards, shard_bounds
    bounds = shard_bounds(len(items), cfg.shards)            # [(0, 50), (50, 100), ...]
    parts = run_shards(shard_task, [{"index": i, "items": items[a:b]} for i, (a, b) in ...])
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from prefect.task_runners import TaskRunner, ThreadPoolTaskRunner
from prefect.tasks import Task

__all__ = ["DASK_ADDRESS_ENV", "RUNNER_ENV", "make_runner", "run_shards", "shard_bounds"]

RUNNER_ENV = "FIRE_MPO_SHARD_RUNNER"
DASK_ADDRESS_ENV = "FIRE_MPO_DASK_ADDRESS"
DASK_MISSING = (
    f"{RUNNER_ENV}=dask needs prefect-dask, which is not installed: pip install -e '.[dask]' "
    f"(or unset {RUNNER_ENV} to shard on threads)"
)


def shard_bounds(n: int, shards: int) -> list[tuple[int, int]]:
    """Contiguous ``[start, end)`` slices of ``n`` items in ``shards`` parts whose sizes differ by
    at most one (the first ``n % shards`` are one longer); no empty slice."""
    if shards < 1:
        raise ValueError(f"shards must be >= 1, got {shards}")
    base, extra = divmod(n, shards)
    bounds, start = [], 0
    for i in range(shards):
        end = start + base + (1 if i < extra else 0)
        if end > start:
            bounds.append((start, end))
        start = end
    return bounds


def make_runner(shards: int, env: dict[str, str] | None = None) -> TaskRunner:
    """The task runner the environment selects (see the module docstring)."""
    env = dict(os.environ if env is None else env)
    kind = env.get(RUNNER_ENV, "thread").strip().lower() or "thread"
    if kind == "thread":
        return ThreadPoolTaskRunner(max_workers=max(1, shards))
    if kind == "dask":
        try:
            from prefect_dask import DaskTaskRunner
        except ImportError as e:
            raise ImportError(DASK_MISSING) from e
        address = env.get(DASK_ADDRESS_ENV) or None
        if address:
            return DaskTaskRunner(address=address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": max(1, shards), "threads_per_worker": 1})
    raise ValueError(f"{RUNNER_ENV}={kind!r} is not a shard runner; use 'thread' or 'dask'")


def run_shards(
    task: Task[..., Any],
    parameters: Sequence[dict[str, Any]],
    runner: TaskRunner | None = None,
) -> list[Any]:
    """Run ``task`` once per parameter dict on ``runner`` (default :func:`make_runner`) and return
    the results in the order of ``parameters``. A failed shard raises its exception after every
    shard has finished (no half-cancelled shards writing into the stage folder)."""
    if not parameters:
        return []
    runner = runner if runner is not None else make_runner(len(parameters))
    with runner:
        futures = [runner.submit(task, params) for params in parameters]
        for f in futures:
            f.wait()
        return [f.result() for f in futures]
