"""What the command-line entry points do before Prefect starts: one-line checks, and Ctrl-C.

Import this module before anything heavy: it imports only the standard library at load time.

- :func:`preflight` validates the config and the store in about a second, so a typo or a bad
  `--store` is one line on stderr, not tracebacks after the ~15 s it takes to import Prefect,
  torch and transformers.
- :func:`supervise` runs the real command in a child process in its own session. A terminal's
  Ctrl-C reaches every process of the foreground group, and Prefect's temporary API server is
  one of them: it died first, so the flow could record neither its state nor the release of its
  `compute` slot, and then hung on ConnectError. Here only this small parent gets the signal; it
  passes the first Ctrl-C on as SIGINT to the child's main process alone (the stage stops, the
  flow is marked Cancelled, the API shuts down last) and a second one kills the child's whole
  process group.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import types
from pathlib import Path

#: Set in the supervised child, so that it runs the command instead of supervising again.
CHILD_ENV = "FIRE_MPO_SUPERVISED"

# Packages whose `__init__` imports torch, transformers or engines: the config models live in
# light submodules (`losses.config`, `sampling.config`, ...), so for the check only, those
# submodules are loaded without their package's `__init__`.
_HEAVY_PACKAGES = ("losses", "corruption", "judge", "sampling", "training", "data", "models")


def _load_config_light():
    """`fire_mpo_core.config.load_config`, imported without the heavy package `__init__`s.

    Only for a process that then exits (the supervisor): the stub packages lack their usual
    names. If the config module ever needs one of them, this falls back to the normal import.
    """
    import fire_mpo_core

    root = Path(fire_mpo_core.__file__).parent
    stubs = []
    for name in _HEAVY_PACKAGES:
        full = f"fire_mpo_core.{name}"
        if full not in sys.modules and (root / name / "__init__.py").is_file():
            mod = types.ModuleType(full)
            mod.__path__ = [str(root / name)]
            mod.__package__ = full
            sys.modules[full] = mod
            stubs.append(full)
    try:
        from fire_mpo_core.config import load_config
    except (ImportError, AttributeError):
        for full in stubs:  # a real import from here on
            sys.modules.pop(full, None)
        for full in [k for k in sys.modules if k.startswith("fire_mpo_core.")]:
            sys.modules.pop(full, None)
        from fire_mpo_core.config import load_config
    return load_config


def check_store(path: Path) -> str | None:
    """None if `path` is (or can become) a writable folder; else a one-line reason."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        return f"store {path} is not a directory (a file is there); pass --store DIR"
    probe = path
    while not probe.exists():  # the nearest existing folder must let us create the rest
        probe = probe.parent
    if not probe.is_dir():
        return f"store {path}: {probe} is a file, not a directory"
    try:  # os.access is not enough: root, read-only mounts and ACLs all answer differently
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".fire-mpo-write-test-"):
            pass
    except OSError as e:
        return f"store {path} is not writable ({probe}: {e.strerror or e})"
    return None


def preflight(config: str, store: str | None = None, overrides: dict | None = None) -> str | None:
    """None if the config loads and its store is usable; else the message to print."""
    if not Path(config).is_file():
        return f"config {config}: no such file"
    load_config = _load_config_light()
    over = dict(overrides or {})
    if store is not None:
        over["store"] = store
    try:
        cfg = load_config(config, over)
    except ValueError as e:
        return str(e)
    return check_store(cfg.store)


def _die_with_parent() -> None:
    """In the child: SIGTERM when the supervisor dies (`kill -9` of `make run`), which Prefect
    turns into a crash that still stops its API; without it the run would go on, orphaned."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def supervise(args: list[str]) -> int:
    """Run `python *args` as a child in its own session; returns its exit status."""
    env = {**os.environ, CHILD_ENV: "1"}
    child = subprocess.Popen(
        [sys.executable, *args], env=env, start_new_session=True, preexec_fn=_die_with_parent
    )
    interrupts = 0

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal interrupts
        interrupts += 1
        if interrupts == 1:
            print(
                "\nInterrupted: stopping the stage and cancelling the flow run "
                "(partial outputs are kept; Ctrl-C again to force)",
                file=sys.stderr,
                flush=True,
            )
            with contextlib.suppress(ProcessLookupError):  # the child may be gone already
                os.kill(child.pid, signal.SIGINT)
        else:
            print("\nForced: killing the run (the next start marks it Crashed)", file=sys.stderr)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(child.pid, signal.SIGKILL)

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    rc = child.wait()
    return 130 if interrupts and rc != 0 else rc


def cycle_parser() -> argparse.ArgumentParser:
    """The arguments of `python -m flows.full_cycle` (stage names are checked by the config)."""
    p = argparse.ArgumentParser(
        prog="python -m flows.full_cycle", description="The full FiRe-MPO cycle."
    )
    p.add_argument("--config", default="configs/default.yaml", help="YAML cycle config")
    p.add_argument("--rounds", type=int, help="override `rounds`")
    p.add_argument(
        "--stages",
        help="comma-separated subset of: prepare,sft,sample,judge,corrupt,reference,train,evaluate",
    )
    p.add_argument("--store", help="override the artifact store folder")
    p.add_argument("--run", help="override the run name")
    p.add_argument("--refresh", action="store_true", help="recompute even cached stages")
    return p


def cycle_entry(argv: list[str]) -> int:
    """`python -m flows.full_cycle ...` in the terminal: check up front, then run supervised."""
    args = cycle_parser().parse_args(argv)
    overrides: dict = {}
    if args.rounds is not None:
        overrides["rounds"] = args.rounds
    if args.run is not None:
        overrides["run"] = args.run
    if args.stages:
        overrides["stages"] = [s.strip() for s in args.stages.split(",") if s.strip()]
    return entry("flows.full_cycle", argv, args.config, args.store, overrides)


def entry(module: str, argv: list[str], config: str, store: str | None, overrides=None) -> int:
    """The supervisor's whole job: check up front, then run the command supervised."""
    err = preflight(config, store, overrides)
    if err:
        print(err if err.startswith("invalid config") else f"error: {err}", file=sys.stderr)
        return 2
    return supervise(["-m", module, *argv])
