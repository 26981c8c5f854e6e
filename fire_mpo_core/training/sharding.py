"""Sharded preference training (``TrainConfig.strategy = "fsdp"``): FSDP2 ``fully_shard`` units.

Data parallel (:mod:`fire_mpo_core.training.distributed`) keeps a full copy of the frozen base
on every rank. With ``strategy: fsdp`` the ranks (started by ``accelerate launch``, the same
launcher; gloo on CPU, NCCL on GPU) shard it with torch's FSDP2 (``torch.distributed.fsdp
.fully_shard``), one unit per module the trainer calls, so its direct calls keep working:

* each module of the family's ``vision`` list (vision tower, projector): ``get_image_features``
  calls them through ``__call__``, whose pre-forward hook gathers their weights;
* each decoder layer, the input embedding (LLaVA-style models embed outside the language
  model's forward) and the final norm;
* the lm_head: the fused loss reads its weight directly, so :func:`head_weight` gathers the full
  weight for the step (frozen under LoRA: no gradient flows back to it); the naive path calls it.

The units are disjoint (none inside another): the trainer calls them in no fixed order from
outside, and FSDP2 initialises a unit as a root the first time it runs, so a unit nested in an
already-run one would fail. Parameters outside these units stay replicated (frozen). LoRA tensors
live in the decoder layers, so they are sharded with them; FSDP2 reduce-scatters (averages) their
gradients in the backward, and :func:`loss_scale` turns that average into the sum that
:func:`~fire_mpo_core.training.distributed.sum_gradients` forms under data parallel (each rank
back-propagates its pairs' loss sum over the step's global pair count). Every rank must run the
same forwards: a rank whose share of a micro-batch is empty scores one pair with weight 0
(``train_preference`` does it).

Checkpoints: every rank writes its own shard of the adapter and of the optimizer state
(:func:`local_state`, :func:`load_local_state`), so a resume with the same number of ranks is
exact; the final adapter is gathered to full tensors on every rank (:func:`full_adapter_state`)
and written by rank 0.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from fire_mpo_core.models.families import family_of
from fire_mpo_core.training.batching import hf_model

__all__ = [
    "full_adapter_state",
    "head_weight",
    "is_sharded",
    "load_local_state",
    "load_rank_state",
    "local_state",
    "loss_scale",
    "save_rank_state",
    "shard_model",
]


def _dtensor():
    from torch.distributed.tensor import DTensor

    return DTensor


def shard_model(model: nn.Module) -> list[str]:
    """Apply ``fully_shard`` to the units listed in the module docstring (in place).

    Needs an initialised process group. Returns the names of the sharded modules.
    """
    from torch.distributed.fsdp import fully_shard

    hf = hf_model(model)
    family = family_of(hf)
    lm = hf.get_submodule(family.language_model)
    units: list[tuple[str, nn.Module]] = []
    for name in family.vision:
        try:
            units.append((name, hf.get_submodule(name)))
        except AttributeError:
            continue
    layers = getattr(lm, "layers", None)
    if layers is None:
        raise ValueError(f"{family.language_model} has no `layers`: cannot shard its decoder")
    units += [(f"{family.language_model}.layers.{i}", layer) for i, layer in enumerate(layers)]
    embed = lm.get_input_embeddings() if hasattr(lm, "get_input_embeddings") else None
    if embed is not None:
        units.append((f"{family.language_model}.embed_tokens", embed))
    norm = getattr(lm, "norm", None)
    if isinstance(norm, nn.Module) and any(True for _ in norm.parameters()):
        units.append((f"{family.language_model}.norm", norm))
    head = hf.get_output_embeddings()
    if head is not None:
        units.append(("lm_head", head))
    for _, module in units:
        flags = _record_flags(module)
        fully_shard(module)
        _keep_record_flags(module, flags)
    return [name for name, _ in units]


def loss_scale(world_size: int) -> float:
    """Factor on each rank's loss under sharding. FSDP2 averages the gradients over the ranks
    (a divide factor of 1, a plain sum, needs PREMUL_SUM, which gloo lacks), while each rank's
    loss is its pairs' sum over the step's global pair count, whose gradients must add up:
    scaling by the world size turns the mean back into the sum (exact for powers of two)."""
    return float(world_size)


def _record_flags(module: nn.Module) -> Any:
    """transformers 5 records a submodel's hidden states (LLaVA's ``get_image_features`` reads
    them) by its class's ``_can_record_outputs``, looked up by class name; ``fully_shard``
    swaps the class for an ``FSDP<Class>`` subclass, so the entry is carried over to it."""
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    except ImportError:  # pragma: no cover - another transformers layout
        return None
    return _CAN_RECORD_REGISTRY.get(module) or None


def _keep_record_flags(module: nn.Module, flags: Any) -> None:
    if flags is None:
        return
    from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY

    if not _CAN_RECORD_REGISTRY.get(module):
        _CAN_RECORD_REGISTRY[module] = flags


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is a sharded DTensor."""
    dtensor = _dtensor()
    return any(isinstance(p, dtensor) for p in model.parameters())


def head_weight(head: nn.Module) -> tuple[Tensor, Tensor | None]:
    """(weight, bias) of the lm_head as plain tensors: gathered when sharded (a collective:
    every rank calls it), the parameters themselves otherwise."""
    dtensor = _dtensor()
    weight, bias = head.weight, getattr(head, "bias", None)
    if isinstance(weight, dtensor):
        weight = weight.full_tensor()
    if isinstance(bias, dtensor):
        bias = bias.full_tensor()
    return weight, bias


def full_adapter_state(model: nn.Module) -> dict[str, Tensor]:
    """Every LoRA tensor of the peft ``model``, gathered to full and on CPU, under its
    ``model.state_dict()`` name (a collective: every rank calls it). peft's
    ``get_peft_model_state_dict(model, state_dict=...)`` and ``save_pretrained(...,
    state_dict=...)`` take it as the model's state dict."""
    dtensor = _dtensor()
    out = {}
    for key, value in model.state_dict().items():
        if "lora_" not in key:
            continue
        if isinstance(value, dtensor):
            value = value.full_tensor()
        out[key] = value.detach().cpu().contiguous()
    return out


def local_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """This rank's shards of the trainable parameters and of the optimizer state, as plain
    tensors (what :func:`load_local_state` restores on the same rank of the same world)."""
    dtensor = _dtensor()

    def local(x: Any) -> Any:
        return x.to_local().detach().cpu().clone() if isinstance(x, dtensor) else x

    params = {
        name: local(p) for name, p in model.named_parameters() if p.requires_grad
    }  # fmt: skip
    opt = optimizer.state_dict()
    state = {
        i: {k: local(v) for k, v in s.items()} for i, s in opt["state"].items()
    }  # fmt: skip
    return {"params": params, "optimizer": {"state": state, "param_groups": opt["param_groups"]}}


def load_local_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any]
) -> None:
    """Restore what :func:`local_state` saved into the sharded model and its optimizer."""
    dtensor = _dtensor()
    named = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if set(named) != set(saved["params"]):
        raise ValueError("sharded checkpoint holds other trainable parameters than the model")
    with torch.no_grad():
        for name, p in named.items():
            local = p.to_local() if isinstance(p, dtensor) else p
            local.copy_(saved["params"][name])
    optimizer.load_state_dict(saved["optimizer"])
    # load_state_dict leaves plain tensors; AdamW's update mixes them with DTensor parameters.
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for p in params:
        if not isinstance(p, dtensor):
            continue
        for key, value in optimizer.state.get(p, {}).items():
            if isinstance(value, Tensor) and not isinstance(value, dtensor) and value.dim() > 0:
                optimizer.state[p][key] = dtensor.from_local(
                    value.to(p.device),
                    p.device_mesh,
                    p.placements,
                    run_check=False,
                    shape=p.shape,
                    stride=p.stride(),
                )


def save_rank_state(directory, rank: int, model: nn.Module, optimizer) -> None:
    """Write this rank's :func:`local_state` as ``directory/rank-<rank>.pt``."""
    from pathlib import Path

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    torch.save(local_state(model, optimizer), directory / f"rank-{rank}.pt")


def load_rank_state(directory, rank: int, model: nn.Module, optimizer) -> None:
    """Restore ``directory/rank-<rank>.pt`` (see :func:`save_rank_state`)."""
    from pathlib import Path

    path = Path(directory) / f"rank-{rank}.pt"
    if not path.is_file():
        raise ValueError(
            f"sharded checkpoint {directory} has no {path.name}: it was written by fewer ranks; "
            "resume with the same train.num_processes"
        )
    load_local_state(model, optimizer, torch.load(path, map_location="cpu", weights_only=True))
