"""Named fault points for crash-safety tests: a process can be made to SIGKILL itself at the n-th
time it passes a named point, so a test can stop a stage exactly "between the manifest and the
rename" or "after the 7th record" instead of guessing with timers.

Library code marks the places where a crash matters::

    from fire_mpo_core.faults import fault_point
    fault_point("store.before_rename")

and a test runs a stage in a child process with the environment variable set::

    FIRE_MPO_FAULT=store.before_rename:1      # die the first time this point is reached
    FIRE_MPO_FAULT=*:17                       # die at the 17th fault point of any name
    FIRE_MPO_FAULT_TRACE=/tmp/trace.txt       # append every point's name, one a line (counting)

Unset (the normal case) a fault point is one global lookup and a return. The points in use:
``store.read`` (per record read by ``read_jsonl``), ``store.write`` (per record written by
``write_jsonl``), ``store.reject``, ``store.before_manifest``, ``store.before_rename``,
``store.after_rename``, ``io.open_image`` (per image decoded) and ``train.step`` (per optimizer
step of the `train` stage).
"""

from __future__ import annotations

import os
import signal

__all__ = ["ENV_FAULT", "ENV_TRACE", "configure", "fault_point"]

ENV_FAULT = "FIRE_MPO_FAULT"
ENV_TRACE = "FIRE_MPO_FAULT_TRACE"

# None: not read yet; False: no fault configured (the fast path).
_state: dict | bool | None = None


def configure(spec: str | None = None, trace: str | None = None) -> None:
    """(Re)read the fault settings: from the arguments, else from the environment.

    ``spec`` is ``"<name>:<n>"`` (``name`` may be ``*`` for any point, ``n >= 1``).
    """
    global _state
    spec = os.environ.get(ENV_FAULT) if spec is None else spec
    trace = os.environ.get(ENV_TRACE) if trace is None else trace
    if not spec and not trace:
        _state = False
        return
    name, n = None, 0
    if spec:
        name, sep, count = spec.rpartition(":")
        if not sep or not name or not count.isdigit() or int(count) < 1:
            raise ValueError(f"{ENV_FAULT}={spec!r}: expected '<name>:<n>' with n >= 1")
        n = int(count)
    _state = {"name": name, "n": n, "hits": 0, "trace": trace}


def fault_point(name: str) -> None:
    """Mark a crash-relevant place; kills this process (SIGKILL) when the configured fault says
    so, records the point when tracing, and otherwise does nothing."""
    if _state is False:
        return
    if _state is None:
        configure()
        if _state is False:
            return
    st = _state
    assert isinstance(st, dict)
    if st["trace"]:
        with open(st["trace"], "a", encoding="utf-8") as f:
            f.write(name + "\n")
    if st["name"] in ("*", name):
        st["hits"] += 1
        if st["hits"] == st["n"]:
            os.kill(os.getpid(), signal.SIGKILL)
