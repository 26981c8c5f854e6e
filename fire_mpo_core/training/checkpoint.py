"""Resumable training checkpoints: adapter, optimizer, scheduler, RNG states and data position.

Layout, one folder per checkpoint, renamed into place only when complete::

    <out_dir>/checkpoints/step-<N>/
        adapter.safetensors     the trainable LoRA tensors (peft state dict)
        optimizer.pt            optimizer.state_dict()   (tensors and numbers only)
        scheduler.pt            scheduler.state_dict()   (numbers only)
        rng.safetensors         torch CPU / CUDA, Python and NumPy generator states as tensors
        trainer_state.json      step, data position, config digest, ...

Everything is loaded with ``safetensors`` or ``torch.load(weights_only=True)``: no pickle of
arbitrary objects. Restoring all five gives an exact resume: the run continues with the same
weights, moments, learning rate, dropout masks and data order as one that never stopped.

    save_checkpoint(out_dir, 40, model, optimizer, scheduler, {"step": 40, ...}, keep=2)
    path = latest_checkpoint(out_dir)
    state = load_checkpoint(path, model, optimizer, scheduler)     # also restores RNG states
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import torch
from peft import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import safe_open
from safetensors.torch import load_file, save_file

__all__ = [
    "CHECKPOINTS",
    "latest_checkpoint",
    "load_checkpoint",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
_STEP = re.compile(r"^step-(\d+)$")


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every generator a training step may draw from, as (tensors, string metadata)."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["torch_cuda"] = torch.stack(torch.cuda.get_rng_state_all())
    py_version, py_state, py_gauss = random.getstate()
    tensors["python"] = torch.tensor(py_state, dtype=torch.int64)
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(np_keys.astype(np.int64))
    meta = {
        "python": json.dumps([py_version, py_gauss]),
        "numpy": json.dumps([np_name, int(np_pos), int(np_has_gauss), float(np_gauss)]),
    }
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """Restore what :func:`rng_state` captured."""
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(tensors["torch_cuda"]))
    py_version, py_gauss = json.loads(meta["python"])
    random.setstate((py_version, tuple(int(x) for x in tensors["python"].tolist()), py_gauss))
    np_name, np_pos, np_has_gauss, np_gauss = json.loads(meta["numpy"])
    keys = tensors["numpy"].numpy().astype(np.uint32)
    np.random.set_state((np_name, keys, np_pos, np_has_gauss, np_gauss))


def _step_of(path: Path) -> int | None:
    m = _STEP.match(path.name)
    return int(m.group(1)) if m else None


def latest_checkpoint(out_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step under ``out_dir/checkpoints``, or None."""
    root = Path(out_dir) / CHECKPOINTS
    if not root.is_dir():
        return None
    done = [p for p in root.iterdir() if _step_of(p) is not None and (p / STATE_FILE).is_file()]
    return max(done, key=_step_of) if done else None


def save_checkpoint(
    out_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
    keep: int = 2,
    adapter_state: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict[str, Any] | None = None,
    extra_dir: Path | None = None,
) -> Path:
    """Write ``out_dir/checkpoints/step-<step>`` atomically; keep only the newest ``keep``.

    ``model`` is a peft model (only its adapter tensors are saved); ``state`` must be
    JSON-serialisable (step, data position, ...). Sharded training passes the gathered
    ``adapter_state``, this rank's plain ``optimizer_state``, and ``extra_dir``, whose files
    (every rank's shard) move into the checkpoint before it is renamed into place.
    """
    root = Path(out_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        if adapter_state is None:
            adapter_state = get_peft_model_state_dict(model)
        adapter = {k: v.detach().cpu().contiguous() for k, v in adapter_state.items()}
        save_file(adapter, str(tmp / "adapter.safetensors"))
        opt = optimizer.state_dict() if optimizer_state is None else optimizer_state
        torch.save(opt, tmp / "optimizer.pt")
        if extra_dir is not None:
            for f in sorted(Path(extra_dir).iterdir()):
                os.replace(f, tmp / f.name)
            shutil.rmtree(extra_dir, ignore_errors=True)
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        tensors, meta = rng_state()
        save_file(tensors, str(tmp / "rng.safetensors"), metadata=meta)
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    done = sorted((p for p in root.iterdir() if _step_of(p) is not None), key=_step_of)
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    load_model_and_optimizer: bool = True,
) -> dict[str, Any]:
    """Restore adapter, optimizer, scheduler and RNG states from ``path``; return its state.

    ``load_model_and_optimizer=False`` restores only the scheduler and RNG states (sharded
    training restores each rank's adapter and optimizer shard itself)."""
    path = Path(path)
    if load_model_and_optimizer:
        device = next(p for p in model.parameters() if p.requires_grad).device
        adapter = load_file(str(path / "adapter.safetensors"), device=str(device))
        result = set_peft_model_state_dict(model, adapter)
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise ValueError(
                f"checkpoint {path} has adapter tensors the model lacks: {unexpected[:3]}"
            )
        optimizer.load_state_dict(
            torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        )
    scheduler.load_state_dict(
        torch.load(path / "scheduler.pt", map_location="cpu", weights_only=True)
    )
    with safe_open(str(path / "rng.safetensors"), framework="pt") as f:
        meta = dict(f.metadata() or {})
    set_rng_state(load_file(str(path / "rng.safetensors")), meta)
    return json.loads((path / STATE_FILE).read_text())
