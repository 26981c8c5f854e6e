"""Test helper (not product code): run functions in fresh (spawned) processes at once.

    results = run_spawned(_writer, [(root, "a"), (root, "b")], join_s=60)

Each process runs ``target(*args, queue)`` and puts its result on the queue; every process must
exit with status 0. Results come back in the order they were put.
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable, Sequence
from typing import Any


def run_spawned(
    target: Callable[..., None], arg_lists: Sequence[tuple], join_s: float = 60
) -> list[Any]:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=target, args=(*args, q)) for args in arg_lists]
    for p in procs:
        p.start()
    for p in procs:
        p.join(join_s)
        assert p.exitcode == 0
    return [q.get(timeout=5) for _ in procs]
