"""Test helper (not product code): whole cycles with the tasks' own ``run`` functions and no
Prefect API (dashboard calls are no-ops), and the tiny cycle configs the tests run.

    python -m testing_support.cycle gemma3 /tmp/store      # one round of a family: final metrics

:func:`run_cycle_direct` runs every stage (reusing finished outputs, or not);
:func:`run_one_stage` builds one (stage, round) and only looks the others up in the store (the
crash-safety tests' children). ``CYCLE`` is the one-round cycle of every family
(tests/core/test_families.py), kept tiny (a handful of records and steps) so that every family
fits in ``make test``; ``FAULT_CYCLE`` the one the kill-point and concurrency tests run.
"""

from __future__ import annotations

import contextlib
import json
import sys
import uuid
from pathlib import Path

import yaml

from fire_mpo_core.store import is_finished
from testing_support.flow_runs import SMALL


def merged(base: dict, **sections) -> dict:
    """A copy of the cycle config ``base`` with each dict section updated key by key from
    ``sections`` (other values replaced)."""
    cfg = json.loads(json.dumps(base))
    for name, value in sections.items():
        cfg[name] = {**cfg.get(name, {}), **value} if isinstance(value, dict) else value
    return cfg


#: The one-round cycle of every family: 12 train scans, a few SFT / train steps, 6 evaluated.
CYCLE = merged(
    SMALL,
    run="fam",
    data={"n_train_images": 12, "n_test_images": 3, "report_fraction": 0.0},
    model={"vision_hidden_size": 32, "vision_layers": 2},
    sft={"max_steps": 40, "vision_warmup": {"steps": 3, "batch_size": 4, "pretrain_scans": 4}},
    sample={"max_new_tokens": 6, "max_records": 12, "batch_size": 6, "temperature": 0.3},
    corrupt={"num_workers": 0},
    train={"batch_size": 2},
    evaluate={"max_new_tokens": 6, "batch_size": 6, "grounding_max_samples": 3},
)

#: The crash-safety cycle (tests/tasks/test_fault_injection.py, tests/core/test_concurrency.py):
#: 16 train scans, checkpoints every train step.
TRAIN_STEPS = 4
FAULT_CYCLE = merged(
    SMALL,
    run="ft",
    data={"n_train_images": 16, "n_test_images": 3, "report_fraction": 0.2},
    sample={"batch_size": 3, "temperature": 0.3},
    corrupt={"num_workers": 0},
    train={"max_steps": TRAIN_STEPS, "batch_size": 2, "save_every": 1, "keep_checkpoints": 1},
    evaluate={"max_new_tokens": 6, "batch_size": 4},
)


def _noop_artifact(*args, **kwargs):
    return uuid.uuid4()


def write_config(path: Path, store: Path, arch: str | None, **sections) -> Path:
    """A CYCLE config for ``arch`` (None: keep model.name_or_path from ``sections``)."""
    cfg = merged(CYCLE, **sections, store=str(store))
    if arch is not None:
        cfg["model"]["arch"] = arch
    path.write_text(yaml.safe_dump(cfg))
    return path


@contextlib.contextmanager
def dashboard_silenced():
    """The tasks' dashboard calls (Prefect artifacts: an external service here) are no-ops
    inside the block and put back after (left patched, they silenced every later flow test's
    artifacts)."""
    import flows.full_cycle  # noqa: F401  (imports every task module: all of them get patched)

    patched = []
    for mod in [m for name, m in sys.modules.items() if name.startswith("tasks.")]:
        for attr in dir(mod):
            if attr.endswith("_artifact") and attr.startswith(("create_", "update_")):
                patched.append((mod, attr, getattr(mod, attr)))
                setattr(mod, attr, _noop_artifact)
    try:
        yield
    finally:
        for mod, attr, original in patched:
            setattr(mod, attr, original)


def stage_call(cfg, name: str, k: int, config: dict, inputs: dict):
    """The StageCall the flow's runner would build for (name, round k)."""
    from tasks.common import StageCall

    return StageCall(
        store=cfg.store,
        run=cfg.run,
        round=k,
        stage=name,
        config=config,
        inputs={n: Path(v) for n, v in inputs.items()},
        threads=cfg.num_threads,
    )


def _cycle(config_path: Path | str, build) -> str | None:
    """`run_cycle` on the config with a runner that calls ``build(task, call, name, k)`` for
    every stage whose inputs all exist."""
    import flows.full_cycle as fc
    from tasks.promote import promote_round

    cfg = fc.load_cycle_config(config_path)

    def runner(name, k, config, inputs):
        if any(v is None for v in inputs.values()):
            return None
        return build(fc.TASKS[name], stage_call(cfg, name, k, config, inputs), name, k)

    def promote(k, train, evaluation):  # the flow's promote step, its task's own function
        if train is not None and evaluation is not None:
            promote_round.fn(
                str(cfg.store), cfg.run, k, train, evaluation, cfg.loop.model_dump(mode="json")
            )

    return fc.run_cycle(cfg, runner, promote)


def _finished(task, call) -> str | None:
    out = call.output_dir(task.cache_policy.code)
    return str(out) if is_finished(out) else None


def run_cycle_direct(config_path: Path | str, reuse: bool = True) -> Path:
    """Every stage of the cycle, dashboard silenced; finished outputs are reused (``reuse``) or
    every stage's ``run`` is called (it finds its own cached output). Returns the last evaluate
    folder."""

    def build(task, call, name, k):
        return (reuse and _finished(task, call)) or task.fn(call)

    with dashboard_silenced():
        return Path(_cycle(config_path, build))


def run_one_stage(config_path: Path | str, stage: str, round_: int) -> None:
    """Build (stage, round_) with its task's own ``run`` function; the other stages are only
    looked up in the store (finished or missing)."""

    def build(task, call, name, k):
        return task.fn(call) if (name, k) == (stage, round_) else _finished(task, call)

    _cycle(config_path, build)


if __name__ == "__main__":
    arch, store = sys.argv[1], Path(sys.argv[2])
    store.mkdir(parents=True, exist_ok=True)
    for fused in (True, False):
        cfg = write_config(store / f"{arch}-{fused}.yaml", store, arch, train={"use_fused": fused})
        out = run_cycle_direct(cfg)
        print(arch, "fused" if fused else "naive", (out / "metrics.json").read_text()[:400])
