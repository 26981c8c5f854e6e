"""Multi-process preference training: ``accelerate launch`` of N ranks, streamed back to the caller.

The parent (the `train` stage, or a script) calls :func:`launch_training`: it writes a JSON spec
(the :class:`~fire_mpo_core.training.job.TrainJob`) under
``out_dir/launch/``, runs::

    python -m accelerate.commands.launch --multi_gpu --num_processes N --num_machines 1 \\
        --mixed_precision {no|bf16} --dynamo_backend no --main_process_port P \\
        [--config_file configs/accelerate/<file>.yaml] \\
        -m fire_mpo_core.training.launch <out_dir>/launch/spec.json

and streams the children's merged stdout/stderr line by line: rank 0 prints one
``FIRE_MPO_PROGRESS {json}`` line per optimizer step, handed to ``on_step(step, total,
metrics)``; every other line goes to ``on_line``. Without CUDA the ranks are CPU processes on a
gloo process group (``ACCELERATE_USE_CPU``). A failing rank writes its traceback to
``launch/error-rank<r>.txt``; the parent raises :class:`LaunchError` with it and the output's
tail. Rank 0 writes the :class:`~fire_mpo_core.training.job.TrainResult` to
``launch/result.json``, which the parent returns.

The same module is the child entry point (``python -m fire_mpo_core.training.launch SPEC``).
Resuming works as in one process: relaunching on the same ``out_dir`` continues from the newest
checkpoint. Usage::

    from fire_mpo_core.training.launch import launch_training
    result = launch_training(job, on_step=lambda s, n, m: print(s, n, m["loss"]))
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import traceback
from collections import deque
from collections.abc import Callable, Mapping
from pathlib import Path

from fire_mpo_core.training.config import TrainConfig
from fire_mpo_core.training.job import TrainJob, TrainResult

__all__ = [
    "PROGRESS_PREFIX",
    "LaunchError",
    "build_launch_command",
    "launch_env",
    "launch_training",
    "parse_progress",
    "run_streaming",
]

PROGRESS_PREFIX = "FIRE_MPO_PROGRESS "
LAUNCH_DIR = "launch"
SPEC_FILE = "spec.json"
RESULT_FILE = "result.json"
TAIL_LINES = 60

StepCallback = Callable[[int, int, dict[str, float]], None]
LineCallback = Callable[[str], None]


class LaunchError(RuntimeError):
    """A launched training process failed; the message holds its traceback and output tail."""


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build_launch_command(
    cfg: TrainConfig, spec_path: str | Path, port: int, python: str = sys.executable
) -> list[str]:
    """The ``accelerate launch`` argv that runs this module on ``spec_path`` in
    ``cfg.num_processes`` ranks. Explicit flags win over the values of ``cfg.accelerate_config``.
    """
    cmd = [python, "-m", "accelerate.commands.launch"]
    if cfg.accelerate_config is not None:
        cmd += ["--config_file", str(Path(cfg.accelerate_config).resolve())]
    else:
        cmd += ["--multi_gpu", "--num_machines", "1", "--dynamo_backend", "no"]
    cmd += [
        "--num_processes",
        str(cfg.num_processes),
        "--mixed_precision",
        "bf16" if cfg.dtype == "bfloat16" else "no",
        "--main_process_port",
        str(port),
        "-m",
        __name__,
        str(spec_path),
    ]
    return cmd


def launch_env(base: Mapping[str, str] | None = None, cuda: bool | None = None) -> dict[str, str]:
    """Environment of the launched ranks: unbuffered output, one OpenMP thread per rank unless
    set, and CPU ranks on gloo when there is no CUDA device."""
    env = dict(os.environ if base is None else base)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("OMP_NUM_THREADS", "1")  # N ranks x all cores of threads would thrash
    if cuda is None:
        import torch

        cuda = torch.cuda.is_available()
    if not cuda:
        env["ACCELERATE_USE_CPU"] = "true"
    # The child imports this package by module name: keep the parent's import path.
    paths = [p for p in sys.path if p]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    return env


def parse_progress(line: str) -> tuple[int, int, dict[str, float]] | None:
    """(step, total, metrics) of a progress line, or None for any other line."""
    if not line.startswith(PROGRESS_PREFIX):
        return None
    try:
        data = json.loads(line[len(PROGRESS_PREFIX) :])
        return int(data["step"]), int(data["total"]), dict(data["metrics"])
    except (ValueError, KeyError, TypeError):
        return None


def run_streaming(
    cmd: list[str],
    env: Mapping[str, str],
    on_line: LineCallback | None = None,
    on_step: StepCallback | None = None,
    error_dir: Path | None = None,
) -> None:
    """Run ``cmd`` in its own process group, streaming stdout+stderr lines as they come.

    Progress lines go to ``on_step``, the rest to ``on_line``. A callback that raises stops the
    run: the whole process group is killed and the exception propagates. A nonzero exit raises
    :class:`LaunchError` with the ranks' tracebacks (``error_dir/error-rank*.txt``) and the last
    output lines.
    """
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    proc = subprocess.Popen(
        cmd,
        env=dict(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        start_new_session=True,  # its own process group: one signal stops every rank
    )
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip("\n")
            progress = parse_progress(line)
            if progress is not None:
                if on_step is not None:
                    on_step(*progress)
                continue
            tail.append(line)
            if on_line is not None:
                on_line(line)
        rc = proc.wait()
    except BaseException:
        _kill_group(proc)
        raise
    if rc != 0:
        errors = []
        if error_dir is not None:
            for f in sorted(error_dir.glob("error-rank*.txt")):
                errors.append(f"--- {f.stem}\n{f.read_text().rstrip()}")
        detail = "\n".join(errors) if errors else "(no rank wrote a traceback)"
        raise LaunchError(
            f"training launch exited with code {rc}:\n{detail}\n--- last output lines:\n"
            + "\n".join(tail)
        )


def _kill_group(proc: subprocess.Popen) -> None:
    """Stop the launcher and its ranks (SIGTERM, then SIGKILL after 10 s)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def launch_training(
    job: TrainJob,
    on_step: StepCallback | None = None,
    on_line: LineCallback | None = None,
) -> TrainResult:
    """:func:`~fire_mpo_core.training.preference.train_preference` in ``cfg.num_processes``
    ranks through ``accelerate launch``: the same job (written as the ranks' spec) and the same
    result (written by rank 0); ``on_line`` gets the ranks' log lines.

    Raises:
        LaunchError: a rank failed; the message carries its traceback.
    """
    job = job.resolved()
    launch_dir = job.out_dir / LAUNCH_DIR
    launch_dir.mkdir(parents=True, exist_ok=True)
    for stale in [*launch_dir.glob("error-rank*.txt"), launch_dir / RESULT_FILE]:
        stale.unlink(missing_ok=True)
    spec_path = launch_dir / SPEC_FILE
    spec_path.write_text(job.model_dump_json(indent=2))
    port = job.cfg.main_process_port or free_port()
    cmd = build_launch_command(job.cfg, spec_path, port)
    run_streaming(cmd, launch_env(), on_line, on_step, error_dir=launch_dir)
    result_path = launch_dir / RESULT_FILE
    if not result_path.is_file():
        raise LaunchError(f"training launch exited cleanly but wrote no {result_path}")
    return TrainResult.model_validate_json(result_path.read_text())


# --------------------------------------------------------------------------- child


def _child(spec_path: Path) -> None:
    import torch.distributed as dist

    from fire_mpo_core.training.preference import train_preference

    job = TrainJob.model_validate_json(spec_path.read_text())
    launch_dir = spec_path.parent
    rank = int(os.environ.get("RANK", "0"))
    try:

        def on_step(step: int, total: int, metrics: dict[str, float]) -> None:
            if rank == 0:
                line = {"step": step, "total": total, "metrics": metrics}
                print(PROGRESS_PREFIX + json.dumps(line, sort_keys=True), flush=True)

        result = train_preference(job, on_step=on_step)
        if rank == 0:
            tmp = launch_dir / f".{RESULT_FILE}.tmp"
            tmp.write_text(result.model_dump_json(indent=2))
            os.replace(tmp, launch_dir / RESULT_FILE)
    except BaseException:
        (launch_dir / f"error-rank{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        # Exiting with a live gloo group aborts the process ("terminate called ...").
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m fire_mpo_core.training.launch SPEC.json", file=sys.stderr)
        return 2
    _child(Path(args[0]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
