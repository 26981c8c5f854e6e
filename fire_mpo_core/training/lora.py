"""The LoRA adapter of the preference trainer: which modules it adapts, attaching it (new, or
the previous round's adapter loaded trainable), where the adapted modules are, and the frozen
reference inside the same model.

    from fire_mpo_core.training.lora import attach_lora, adapted_modules, reference_weights
    model = attach_lora(base, policy, LoRAConfig(r=16, scope="language_model"))
    with torch.no_grad(), reference_weights(model):   # the frozen reference
        ...

The reference is the policy's base with the adapter off (``loop.reference: base``), or, after
:func:`attach_reference`, a second, frozen adapter named ``reference`` holding round k-1's
weights (``previous_round``, iterative DPO): one base in memory either way.

``scope: language_model`` adapts only the linear layers inside the family's language model
(:attr:`fire_mpo_core.models.families.Family.language_model`), so the vision tower and the
projector stay frozen, as in the paper.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path

from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from fire_mpo_core.models.families import family_of
from fire_mpo_core.policy import PolicyRef
from fire_mpo_core.training.batching import (
    hf_model,
)
from fire_mpo_core.training.config import LoRAConfig


def language_model_prefix(model: nn.Module) -> str | None:
    """Module name of the language model inside an image-text-to-text model: its family's
    :attr:`~fire_mpo_core.models.families.Family.language_model` (``model.language_model``,
    Idefics3's ``model.text_model``), or None for a model of no known family."""
    hf = hf_model(model)
    try:
        prefix = family_of(hf).language_model
    except ValueError:
        return None
    try:
        hf.get_submodule(prefix)
    except AttributeError:
        return None
    return prefix


def lora_target_modules(model: nn.Module, lora: LoRAConfig) -> str | list[str]:
    """peft ``target_modules`` for ``lora``: the config's value for scope 'all'; for scope
    'language_model' a regex (peft full-matches it against module names) that admits only the
    chosen linear layers inside the language model, so the vision tower and projector get none.
    """
    if lora.scope == "all":
        return lora.target_modules
    prefix = language_model_prefix(model)
    if prefix is None:
        raise ValueError(
            f"lora.scope='language_model' but {type(model).__name__} has no recognisable "
            "language_model submodule; set lora.scope='all' and list target_modules"
        )
    if lora.target_modules == "all-linear":
        lm = hf_model(model).get_submodule(prefix)
        linear = (n for n, m in lm.named_modules() if isinstance(m, nn.Linear))
        names = sorted({n.rsplit(".", 1)[-1] for n in linear})
    else:
        names = list(lora.target_modules)
    alternatives = "|".join(re.escape(n) for n in names)
    return rf"{re.escape(prefix)}\.(?:.*\.)?(?:{alternatives})"


def attach_lora(model: nn.Module, policy: PolicyRef, lora: LoRAConfig) -> PeftModel:
    """Wrap ``model`` (the loaded ``policy.base``) with a trainable LoRA adapter: a new one from
    ``lora``, or ``policy.adapter`` loaded trainable when set (round k > 1; ``lora`` is then
    ignored in favour of the adapter's own config)."""
    if policy.adapter:
        return PeftModel.from_pretrained(model, policy.adapter, is_trainable=True)
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora_target_modules(model, lora),
        bias="none",
    )
    return get_peft_model(model, config)


def adapted_modules(model: nn.Module) -> list[str]:
    """Names (relative to the transformers model) of the modules that carry a LoRA adapter."""
    hf = hf_model(model)
    return sorted(n for n, m in hf.named_modules() if hasattr(m, "lora_A") and len(m.lora_A))


def vision_adapted(model: nn.Module) -> bool:
    """Whether any adapter lies outside the language model (then image features differ between
    policy and reference and must be recomputed with the adapter off)."""
    prefix = language_model_prefix(model)
    names = adapted_modules(model)
    if prefix is None:
        return bool(names)
    return any(not n.startswith(prefix + ".") for n in names)


#: Name of the frozen second adapter that makes the reference (``loop.reference: previous_round``).
REFERENCE_ADAPTER = "reference"


def attach_reference(model: PeftModel, adapter_dir: str | Path) -> None:
    """Load ``adapter_dir`` (round k-1's adapter) as the frozen, inactive ``reference`` adapter
    beside the trainable one. peft's ``load_adapter`` leaves a new adapter frozen and inactive,
    so the optimizer's parameters (those that require grad) are unchanged."""
    model.load_adapter(str(adapter_dir), adapter_name=REFERENCE_ADAPTER, is_trainable=False)


def has_reference(model: nn.Module) -> bool:
    return REFERENCE_ADAPTER in getattr(model, "peft_config", {})


@contextlib.contextmanager
def reference_weights(model: nn.Module) -> Iterator[None]:
    """Inside the block ``model`` computes the frozen reference: its ``reference`` adapter when
    attached, else the base with the adapter off (``disable_adapter``). Use it under no_grad.

    peft's ``set_adapter`` also sets requires_grad (the adapter it activates trainable unless in
    inference mode, every other one frozen), so each parameter's flag is put back as it was:
    the optimizer's parameters stay exactly those that were trainable."""
    if not has_reference(model):
        with model.disable_adapter():
            yield
        return
    trainable = model.active_adapter
    flags = [(p, p.requires_grad) for p in model.parameters()]
    model.set_adapter(REFERENCE_ADAPTER, inference_mode=True)
    try:
        yield
    finally:
        model.set_adapter(trainable)
        for p, flag in flags:
            p.requires_grad_(flag)


def drop_reference(model: nn.Module) -> None:
    """Remove the ``reference`` adapter (before saving: save_pretrained writes every adapter,
    and merging must see only the trained one)."""
    if has_reference(model):
        model.delete_adapter(REFERENCE_ADAPTER)
