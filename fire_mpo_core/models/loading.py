"""Load a vision-language model and its processor, tiny or real, with one call each::

    from fire_mpo_core.models import load_model, load_processor, count_parameters

    model = load_model("store/.../base", dtype="float32", device="cpu")   # eval mode
    processor = load_processor("store/.../base")
    print(count_parameters(model), parameter_breakdown(model))

``load_model`` goes through ``AutoModelForImageTextToText`` (LLaVA, Qwen2-VL, Qwen2.5-VL, ...).
``load_processor`` goes through ``AutoProcessor``, except for processors that bundle a video
processor (the Qwen-VL family): those need torchvision, which this project does not install, so
they are rebuilt image-only (same class, same image processor, tokenizer and chat template, no
video processor). Image processors use the PIL backend whenever torchvision is absent.
"""

from __future__ import annotations

import functools
import inspect
import json
import logging
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, PreTrainedModel
from transformers.models.auto.processing_auto import PROCESSOR_MAPPING
from transformers.processing_utils import ProcessorMixin
from transformers.utils import cached_file, is_torchvision_available

logger = logging.getLogger(__name__)


def _warn_remote_code(name: str, what: str) -> None:
    # Remote code runs arbitrary Python from the checkpoint: say so, by name, every time.
    logger.warning(
        "trust_remote_code is ON: loading the %s of %s runs Python code shipped with it "
        "(model.trust_remote_code in the config)",
        what,
        name,
    )


__all__ = [
    "count_parameters",
    "image_only_processor_class",
    "load_model",
    "load_processor",
    "parameter_breakdown",
    "torch_dtype",
]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    """Map a config dtype name (``float32``, ``bfloat16``, ``float16``) to a ``torch.dtype``."""
    try:
        return _DTYPES[name]
    except KeyError:
        raise ValueError(f"unknown dtype {name!r}; expected one of {sorted(_DTYPES)}") from None


def load_model(
    name_or_path: str | Path,
    dtype: str = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    """Load an image-text-to-text model in ``dtype`` on ``device``, in eval mode.

    Returns e.g. ``LlavaForConditionalGeneration`` or ``Qwen2VLForConditionalGeneration``; its
    forward takes the dict of :func:`fire_mpo_core.models.encoding.encode_batch` (minus
    ``labels``/``span_mask``/``response_truncated``) and returns ``logits`` ``[B, T, V]``.
    """
    if trust_remote_code:
        _warn_remote_code(str(name_or_path), "model")
    model = AutoModelForImageTextToText.from_pretrained(
        str(name_or_path), dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code
    )
    model.to(device)
    model.eval()
    return model


@functools.cache
def image_only_processor_class(base: type[ProcessorMixin]) -> type[ProcessorMixin]:
    """A subclass of ``base`` (a processor with image processor, tokenizer and video processor)
    whose constructor takes no video processor, so it needs no torchvision.

    The subclass keeps ``base``'s name, so ``save_pretrained`` writes the usual
    ``processor_class`` and the folder still loads with ``AutoProcessor`` where torchvision is
    installed. Calling it with videos fails; images and text work exactly as with ``base``.
    """
    attributes = set(base.get_attributes())
    if attributes != {"image_processor", "tokenizer", "video_processor"}:
        raise TypeError(
            f"{base.__name__} has sub-processors {sorted(attributes)}; an image-only variant "
            "is only defined for image_processor + tokenizer + video_processor"
        )

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        # ProcessorMixin pairs positional sub-processors with get_attributes() (here: image
        # processor, tokenizer), so the None video processor is dropped, not stored.
        base.__init__(
            self,
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=None,
            chat_template=chat_template,
            **kwargs,
        )

    # The base's own parameters (InternVL's image_seq_length, ...) minus the video processor:
    # save_pretrained writes the processor_config.json entries that __init__'s signature names,
    # and from_pretrained passes only those that validate_init_kwargs accepts.
    sig = inspect.signature(base.__init__)
    params = [p for n, p in sig.parameters.items() if n != "video_processor"]
    __init__.__signature__ = sig.replace(parameters=params)
    accepted = tuple(p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD)[1:]

    def validate_init_kwargs(processor_config, valid_kwargs):
        return ProcessorMixin.validate_init_kwargs(processor_config, (*valid_kwargs, *accepted))

    return type(
        base.__name__,
        (base,),
        {
            "__init__": __init__,
            "validate_init_kwargs": staticmethod(validate_init_kwargs),
            "__module__": __name__,
            "__qualname__": f"image_only_processor_class.<{base.__name__}>",
            "__doc__": f"{base.__name__} without a video processor (no torchvision needed).",
            "image_only": True,
        },
    )


def _processor_class(name_or_path: str, trust_remote_code: bool) -> type | None:
    """The processor class a checkpoint asks for: ``processor_class`` of its
    ``processor_config.json``, else the one registered for its model type; None if unknown."""
    try:
        path = cached_file(
            name_or_path,
            "processor_config.json",
            _raise_exceptions_for_missing_entries=False,
            _raise_exceptions_for_connection_errors=False,
        )
    except OSError:  # not a folder and not a reachable hub id: AutoProcessor reports it
        return None
    if path is not None:
        name = json.loads(Path(path).read_text()).get("processor_class")
        cls = getattr(transformers, name, None) if isinstance(name, str) else None
        if isinstance(cls, type) and issubclass(cls, ProcessorMixin):
            return cls
    try:
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
        return PROCESSOR_MAPPING[type(config)]
    except (KeyError, OSError, ValueError):
        return None


def load_processor(name_or_path: str | Path, trust_remote_code: bool = False) -> ProcessorMixin:
    """Load the multimodal processor (image processor + tokenizer + chat template) of a model.

    Raises:
        TypeError: the checkpoint has no multimodal processor (``AutoProcessor`` would silently
            return a bare tokenizer).
    """
    name = str(name_or_path)
    if trust_remote_code:
        _warn_remote_code(name, "processor")
    cls = _processor_class(name, trust_remote_code)
    if (
        cls is not None
        and "video_processor" in cls.get_attributes()
        and not is_torchvision_available()
    ):
        processor = image_only_processor_class(cls).from_pretrained(name)
    else:
        processor = AutoProcessor.from_pretrained(name, trust_remote_code=trust_remote_code)
    if not isinstance(processor, ProcessorMixin) or not hasattr(processor, "image_processor"):
        raise TypeError(
            f"{name} has no image processor (got {type(processor).__name__}); "
            "is it a vision-language checkpoint?"
        )
    return processor


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (tied weights counted once); only ``requires_grad`` ones if asked."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():  # parameters() already yields a shared tensor only once
        if id(p) in seen or (trainable_only and not p.requires_grad):
            continue
        seen.add(id(p))
        total += p.numel()
    return total


def parameter_breakdown(model: torch.nn.Module) -> dict[str, int]:
    """Parameters per top-level component, e.g. ``{"model.vision_tower": 99k,
    "model.multi_modal_projector": 49k, "model.language_model": 1.3M, "lm_head": 197k}``."""
    out: dict[str, int] = {}
    for name, p in model.named_parameters():
        parts = name.split(".")
        key = ".".join(parts[:2]) if parts[0] == "model" and len(parts) > 2 else parts[0]
        out[key] = out.get(key, 0) + p.numel()
    return out
