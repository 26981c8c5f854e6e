"""The `corrupt` stage's `hf_dataset/` trains in TRL's `DPOTrainer` as it is (no `.map`).

The export is written by the same call the stage makes (`export_hf_dataset(pairs, prepare_root,
out, corrupt_root=...)`), from pairs with v' on SynthLesion, and trained for 2 real steps with
LoRA on the tiny LLaVA that `prepare` builds, with its own processor and chat template.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

pytest.importorskip("trl", reason="TRL comes with the bench extra: pip install -e '.[bench]'")


@pytest.mark.slow
def test_dpo_trainer_trains_two_steps_on_the_export(tmp_path):
    import datasets
    import torch
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from bench.common import build_world
    from fire_mpo_core.data.export import export_hf_dataset
    from fire_mpo_core.models import load_model, load_processor
    from fire_mpo_core.training.batching import load_pairs

    torch.set_num_threads(1)
    world = build_world(tmp_path / "world", n_pairs=8, image_size=32)
    pairs = load_pairs(world["pairs"])
    out = tmp_path / "hf_dataset"
    export_hf_dataset(pairs, Path(world["data"]), out, corrupt_root=Path(world["pairs"]).parent)
    ds = datasets.load_from_disk(str(out))  # exactly what a user loads from the store
    assert ds[0]["prompt"][0]["content"][0]["type"] == "image"

    model = load_model(world["base"], dtype="float32", device="cpu")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = DPOConfig(
        output_dir=str(tmp_path / "trl"),
        per_device_train_batch_size=2,
        max_steps=2,
        learning_rate=1e-3,
        beta=0.1,
        max_length=256,
        use_cpu=True,
        bf16=False,
        fp16=False,
        save_strategy="no",
        report_to="none",
        logging_steps=1,
        dataloader_num_workers=0,
        disable_tqdm=True,
        seed=0,
    )
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=ds,
        processing_class=load_processor(world["base"]),
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    )
    result = trainer.train()
    assert trainer.state.global_step == 2
    assert math.isfinite(result.training_loss)
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logged) == 2 and all(math.isfinite(h["loss"]) for h in logged)
    lora = [(n, p) for n, p in trainer.model.named_parameters() if "lora_B" in n]
    assert lora and any(p.abs().sum() > 0 for _, p in lora)  # B starts at 0: it was trained
    frozen = dict(trainer.model.get_base_model().named_parameters())
    name = next(n for n in before if "embed_tokens" in n)
    assert torch.equal(frozen[name], before[name])

    # The control: the old flat layout (a bare question) is what TRL could not train on.
    flat = export_hf_dataset(pairs, Path(world["data"]), tmp_path / "flat", conversational=False)
    args.output_dir = str(tmp_path / "trl-flat")
    with pytest.raises(ValueError, match="image"):
        DPOTrainer(
            model=load_model(world["base"], dtype="float32", device="cpu"),
            args=args,
            train_dataset=flat,
            processing_class=load_processor(world["base"]),
            peft_config=LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
        ).train()
