"""The model layer: tiny vision-language models built offline, loading of tiny and real models,
input encoding with labels and span masks, and batched generation.

    from fire_mpo_core.models import (
        build_tiny_model, load_model, load_processor, encode_batch, generate, count_parameters,
    )

See each module for shapes: ``tiny`` (build), ``loading`` (load, parameter counts), ``encoding``
(prompt + response tensors, label alignment), ``generation`` (left-padded batched decoding).
"""

from fire_mpo_core.models.encoding import (
    IGNORE_INDEX,
    NON_MODEL_KEYS,
    build_prompts,
    encode_batch,
    model_inputs,
    shift_for_next_token,
)
from fire_mpo_core.models.generation import generate
from fire_mpo_core.models.loading import (
    count_parameters,
    image_only_processor_class,
    load_model,
    load_processor,
    parameter_breakdown,
    torch_dtype,
)
from fire_mpo_core.models.tiny import (
    build_tiny_model,
    build_tiny_tokenizer,
    create_tiny_model,
    mrope_sections,
)

__all__ = [
    "IGNORE_INDEX",
    "NON_MODEL_KEYS",
    "build_prompts",
    "build_tiny_model",
    "build_tiny_tokenizer",
    "count_parameters",
    "create_tiny_model",
    "encode_batch",
    "generate",
    "image_only_processor_class",
    "load_model",
    "load_processor",
    "model_inputs",
    "mrope_sections",
    "parameter_breakdown",
    "shift_for_next_token",
    "torch_dtype",
]
