"""Test helper (not product code): one round of the whole cycle for a tiny model of any family,
with the tasks' own ``run`` functions and no Prefect API (dashboard calls are no-ops).

    python -m tests.family_cycle gemma3 /tmp/store      # prints the final metrics

Used by tests/test_families.py; kept tiny (a handful of records and steps) so that every family
fits in ``make test``.
"""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

import yaml

from fire_mpo_core.store import is_finished

#: The one-round cycle of every family: 12 train scans, a few SFT / train steps, 6 evaluated.
CYCLE = {
    "run": "fam",
    "rounds": 1,
    "num_threads": 1,
    "data": {
        "n_train_images": 12,
        "n_val_images": 0,
        "n_test_images": 3,
        "questions_per_image": 2,
        "report_fraction": 0.0,
    },
    "model": {
        "hidden_size": 64,
        "num_heads": 2,
        "vocab_size": 300,
        "patch_size": 16,
        "vision_hidden_size": 32,
        "vision_layers": 2,
    },
    # Enough SFT for the answer format, so the judge has answers to edit and train has pairs.
    "sft": {
        "max_steps": 40,
        "batch_size": 8,
        "lr": 3e-3,
        "include_reports": False,
        "vision_warmup": {"steps": 3, "batch_size": 4, "pretrain_scans": 4},
    },
    "sample": {"max_new_tokens": 6, "max_records": 12, "batch_size": 6, "temperature": 0.3},
    "corrupt": {"num_workers": 0},
    "train": {"max_steps": 2, "batch_size": 2, "save_every": None},
    "evaluate": {"max_new_tokens": 6, "batch_size": 6, "grounding_max_samples": 3},
}


def _noop_artifact(*args, **kwargs):
    return uuid.uuid4()


def write_config(path: Path, store: Path, arch: str | None, **sections) -> Path:
    """A CYCLE config for ``arch`` (None: keep model.name_or_path from ``sections``)."""
    cfg = json.loads(json.dumps(CYCLE))
    if arch is not None:
        cfg["model"]["arch"] = arch
    for name, value in sections.items():
        cfg[name] = {**cfg.get(name, {}), **value}
    cfg["store"] = str(store)
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_cycle_direct(config_path: Path) -> Path:
    """Every stage of the cycle (finished outputs reused); returns the last evaluate folder."""
    import flows.full_cycle as fc
    from tasks.common import StageCall

    # Dashboard calls are no-ops while this runs in the test process, and are put back after
    # (left patched, they silenced every later flow test's artifacts).
    patched = []
    for mod in [m for name, m in sys.modules.items() if name.startswith("tasks.")]:
        for attr in dir(mod):
            if attr.endswith("_artifact") and attr.startswith(("create_", "update_")):
                patched.append((mod, attr, getattr(mod, attr)))
                setattr(mod, attr, _noop_artifact)
    try:
        return _run(fc, StageCall, config_path)
    finally:
        for mod, attr, original in patched:
            setattr(mod, attr, original)


def _run(fc, StageCall, config_path: Path) -> Path:
    cfg = fc.load_cycle_config(config_path)

    def runner(name, k, config, inputs):
        if any(v is None for v in inputs.values()):
            return None
        call = StageCall(
            store=cfg.store,
            run=cfg.run,
            round=k,
            stage=name,
            config=config,
            inputs={n: Path(v) for n, v in inputs.items()},
            threads=cfg.num_threads,
        )
        task = fc.TASKS[name]
        out = call.output_dir(task.cache_policy.code)
        return str(out) if is_finished(out) else task.fn(call)

    return Path(fc.run_cycle(cfg, runner))


if __name__ == "__main__":
    arch, store = sys.argv[1], Path(sys.argv[2])
    store.mkdir(parents=True, exist_ok=True)
    for fused in (True, False):
        cfg = write_config(store / f"{arch}-{fused}.yaml", store, arch, train={"use_fused": fused})
        out = run_cycle_direct(cfg)
        print(arch, "fused" if fused else "naive", (out / "metrics.json").read_text()[:400])
