"""Training: SFT warm start (`sft`), preference optimisation with LoRA (`preference`), the
per-round reference log-probs (`reference`), branch batching and checkpoints."""
