"""Typed configuration of the preference trainer and of the per-round reference log-prob pass.

    from fire_mpo_core.training.config import TrainConfig, ReferenceConfig
    cfg = TrainConfig(loss={"name": "fire_mpo"}, lora={"r": 128, "alpha": 256}, dtype="bfloat16")
    ref_cfg = ReferenceConfig.for_training(cfg)   # same max_length / dtype / chunk size

Defaults suit the embedded tiny model on CPU (LoRA r 16 on every linear layer of the language
model, lr 5e-4). The paper's GPU setting is LoRA r 128, alpha 256, dropout 0.05 on the language
model only (``lora.scope = "language_model"``, vision tower and projector frozen), lr 1e-6, cosine
schedule, AdamW, 1 epoch, batch 8 pairs, bf16. Every model forbids unknown keys; settings that
contradict each other fail with a message naming both fields.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from fire_mpo_core.losses.config import LossConfig

__all__ = [
    "WARMUP_ARCHS",
    "HealthConfig",
    "LoRAConfig",
    "ReferenceConfig",
    "SFTConfig",
    "TrainConfig",
    "VisionWarmupConfig",
]


class _Cfg(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class LoRAConfig(_Cfg):
    """The LoRA adapter trained on top of the frozen base policy (peft ``LoraConfig``)."""

    r: int = Field(default=16, ge=1, description="LoRA rank (paper on 7B models: 128).")
    alpha: float = Field(
        default=32.0, gt=0, description="LoRA alpha; updates are scaled by alpha / r (paper: 256)."
    )
    dropout: float = Field(
        default=0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input (paper: 0.05)."
    )
    target_modules: Literal["all-linear"] | list[str] = Field(
        default="all-linear",
        description=(
            "Layers that get an adapter: 'all-linear' (every nn.Linear but the output head) or a "
            "list of module-name suffixes such as ['q_proj', 'k_proj', 'v_proj', 'o_proj']."
        ),
    )
    scope: Literal["language_model", "all"] = Field(
        default="language_model",
        description=(
            "'language_model': adapters only inside the language model; the vision tower and "
            "the projector stay frozen and un-adapted (the paper's setting). 'all': wherever "
            "target_modules match, vision side included."
        ),
    )

    @model_validator(mode="after")
    def _targets(self) -> LoRAConfig:
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ValueError("target_modules is an empty list; use 'all-linear' or name layers")
        if (
            self.scope == "language_model"
            and isinstance(self.target_modules, list)
            and "lm_head" in self.target_modules
        ):
            raise ValueError(
                "target_modules lists 'lm_head' but scope='language_model' only adapts layers "
                "inside the language model; drop 'lm_head' or set scope='all'"
            )
        return self


class HealthConfig(_Cfg):
    """Thresholds of the per-round health diagnostics (:mod:`fire_mpo_core.training.health`).

    Each ``max_*`` / ``min_*`` threshold is checked against one diagnostic; None switches that
    check off (the diagnostic is still computed and written). A crossed threshold logs one
    warning line naming the value, the threshold and what it usually means; with ``fail`` the
    train stage fails with that line instead (pair checks before any training compute)."""

    fail: bool = Field(
        default=False,
        description="Fail the train stage when a threshold is crossed (false: warn only).",
    )
    max_length_gap_words: float | None = Field(
        default=3.0,
        gt=0,
        description="Largest |mean words(y+) - words(y-)| over the round's pairs: a larger gap "
        "teaches length, not correctness (the judge or the data rewrites the chosen side).",
    )
    max_chosen_longer_share: float | None = Field(
        default=0.8,
        gt=0,
        le=1,
        description="Largest share of pairs whose chosen side has more words than the rejected.",
    )
    max_edit_distance: float | None = Field(
        default=0.5,
        gt=0,
        le=1,
        description="Largest mean normalised word edit distance between y+ and y- (pairs of at "
        "least edit_distance_min_words words): above it the pairs are rewrites, not minimal "
        "edits (the judge's own cap, judge.max_changed_fraction, defaults to 0.5 too).",
    )
    edit_distance_min_words: int = Field(
        default=4,
        ge=1,
        description="Pairs whose longer side has fewer words are bare answers (all span, "
        "distance 1 by construction) and stay out of the mean edit distance.",
    )
    max_span_word_share: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="Largest share of response words inside the marked spans: near 1 the span "
        "losses are sequence-level DPO and the spans no longer say what is wrong. Off by "
        "default: bare closed answers ('yes' vs 'no') are all span by nature; set it (e.g. 0.9) "
        "for sentence or report answers.",
    )
    max_accuracy_saturation: float | None = Field(
        default=0.9,
        gt=0,
        le=1,
        description="Largest share of the last tail_fraction of logged steps whose reward "
        "accuracy is >= saturation_accuracy: the pairs are separated for good and the "
        "margins grow on whatever separates them most cheaply.",
    )
    saturation_accuracy: float = Field(
        default=0.99,
        gt=0,
        le=1,
        description="A logged step's rewards/accuracy at or above this counts as saturated.",
    )
    tail_fraction: float = Field(
        default=0.25,
        gt=0,
        le=1,
        description="Share of the logged steps (at least one) that the saturation and the "
        "late grad norm are taken over; the same share at the start is the early grad norm.",
    )
    min_logged_steps: int = Field(
        default=8,
        ge=1,
        description="The trend checks (accuracy saturation, grad-norm collapse) need at least "
        "this many metrics.jsonl rows; a shorter run reports the numbers without flagging them.",
    )
    max_kl: float | None = Field(
        default=5.0,
        gt=0,
        description="Largest final kl/forward or kl/reverse (nats summed over a pair's KL "
        "positions, mean over pairs): the policy has drifted far from the reference there.",
    )
    min_grad_norm_ratio: float | None = Field(
        default=0.01,
        gt=0,
        le=1,
        description="Smallest late / early mean gradient norm: below it the loss is saturated "
        "and training has stopped learning (grad-norm collapse).",
    )


class TrainConfig(_Cfg):
    """The `train` stage: LoRA preference optimisation of the policy on minimal-edit pairs."""

    loss: LossConfig = Field(
        default_factory=LossConfig, description="Preference loss and its coefficients."
    )
    lora: LoRAConfig = Field(default_factory=LoRAConfig, description="The trained LoRA adapter.")
    lr: float = Field(
        default=5e-4, gt=0, description="Peak AdamW learning rate (paper, 7B models: 1e-6)."
    )
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay.")
    warmup_ratio: float = Field(
        default=0.1, ge=0, le=1, description="Share of the steps with linear warmup (then cosine)."
    )
    epochs: float = Field(default=1.0, gt=0, description="Passes over the pairs (paper: 1).")
    max_steps: int | None = Field(
        default=None, ge=1, description="Stop after this many optimizer steps (overrides epochs)."
    )
    batch_size: int = Field(
        default=8,
        ge=1,
        description=(
            "Pairs per forward pass over all processes (each pair is 2 to 4 sequences); with "
            "num_processes > 1 each process scores an equal contiguous share of it."
        ),
    )
    grad_accum: int = Field(
        default=1, ge=1, description="Forward passes accumulated per optimizer step."
    )
    max_grad_norm: float | None = Field(
        default=1.0, gt=0, description="Clip the global gradient norm to this; None: no clipping."
    )
    max_length: int = Field(
        default=256,
        ge=16,
        description=(
            "Max tokens per sequence; only the response is cut, never the prompt or its image "
            "tokens. Must equal the reference artifact's max_length."
        ),
    )
    dtype: Literal["float32", "bfloat16"] = Field(
        default="float32",
        description="Weights and autocast dtype: float32 on CPU, bfloat16 (mixed) on GPU.",
    )
    gradient_checkpointing: bool = Field(
        default=False, description="Recompute decoder activations in backward (large models)."
    )
    seed: int = Field(default=0, description="Seed of the LoRA init, the data order and dropout.")
    save_every: int | None = Field(
        default=50,
        ge=1,
        description="Write a resumable checkpoint every N optimizer steps; None: never.",
    )
    keep_checkpoints: int = Field(
        default=2, ge=1, description="Keep only the newest N checkpoints on disk."
    )
    resume: bool = Field(
        default=True,
        description="Resume from the newest checkpoint under out_dir/checkpoints if one exists.",
    )
    logging_every: int = Field(
        default=10, ge=1, description="Write metrics (JSONL + TensorBoard) every N steps."
    )
    chunk_size: int | None = Field(
        default=None,
        ge=1,
        description=(
            "Fused path: response tokens per lm_head chunk; None uses loss.chunk_size. "
            "Needs use_fused."
        ),
    )
    use_fused: bool = Field(
        default=False,
        description=(
            "Compute log-probs chunk by chunk from hidden states and the lm_head weight, never "
            "materialising [B, T, V] logits (large vocabularies); else from full logits."
        ),
    )
    use_reference_artifact: bool = Field(
        default=True,
        description=(
            "Read the reference's log-prob sums from the per-round artifact and run the frozen "
            "reference in-step only on the KL positions of (clean image, y+); else run the "
            "reference on every branch in every step."
        ),
    )
    group_by_length: bool = Field(
        default=False,
        description=(
            "Order each epoch so that a micro-batch holds pairs of similar length "
            "(training.batching.length_grouped_permutation): less padding per batch, a less "
            "uniform shuffle. False: a plain seeded random order."
        ),
    )
    merge_adapter: bool = Field(
        default=False, description="Also save the base with the adapter merged in (out_dir/merged)."
    )
    num_processes: int = Field(
        default=1,
        ge=1,
        description=(
            "Data-parallel processes: 1 trains in the calling process; N > 1 runs `accelerate "
            "launch` with N processes (one per GPU, or gloo CPU processes without CUDA) and "
            "sums the LoRA gradients across them each step."
        ),
    )
    accelerate_config: str | None = Field(
        default=None,
        description=(
            "accelerate config YAML for the launch (e.g. configs/accelerate/ddp_gpu.yaml); its "
            "num_processes and mixed_precision are overridden by num_processes and dtype. "
            "None: a plain multi-process launch on this machine."
        ),
    )
    strategy: Literal["ddp", "fsdp"] = Field(
        default="ddp",
        description=(
            "How num_processes > 1 split the work: 'ddp' keeps a full copy of the frozen base on "
            "every process and sums the LoRA gradients; 'fsdp' shards the base (vision tower, "
            "projector, embeddings, each decoder layer, lm_head) across them with FSDP2 "
            "(fire_mpo_core.training.sharding): about 1/N of the weights per process."
        ),
    )
    # In the train key on purpose: with `fail` a threshold decides whether the stage succeeds,
    # so it is part of the stage's contract (a finished folder passed the checks it was keyed
    # with). Changing a threshold reruns this round's train (deterministic: same adapter); the
    # outputs hold only threshold-free values (flags live in the manifest counts, which are not
    # digested), so evaluate and the later rounds' sample .. reference keep their keys.
    health: HealthConfig = Field(
        default_factory=HealthConfig,
        description="Reward-hacking and health diagnostics: thresholds and fail-or-warn.",
    )
    main_process_port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description="Rendezvous port of the launched processes; None picks a free one.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.chunk_size is not None and not self.use_fused:
            raise ValueError(
                f"chunk_size={self.chunk_size} only applies to the fused path, but "
                "use_fused=False; set use_fused=True or leave chunk_size unset"
            )
        if self.num_processes > self.batch_size:
            raise ValueError(
                f"num_processes={self.num_processes} exceeds batch_size={self.batch_size}: the "
                "batch is split across processes and some would get no pair; raise batch_size "
                "or lower num_processes"
            )
        if self.accelerate_config is not None and self.num_processes == 1:
            raise ValueError(
                f"accelerate_config={self.accelerate_config!r} is only used to launch "
                "num_processes > 1, but num_processes=1; set num_processes or drop the file"
            )
        if self.strategy == "fsdp" and self.num_processes == 1:
            raise ValueError(
                "strategy='fsdp' shards the model across processes, but num_processes=1; set "
                "num_processes > 1 or strategy='ddp'"
            )
        if self.strategy == "fsdp" and self.merge_adapter:
            raise ValueError(
                "merge_adapter=True writes the merged full model, which strategy='fsdp' never "
                "holds on one process; merge after training or set strategy='ddp'"
            )
        if (
            self.save_every is not None
            and self.max_steps is not None
            and self.save_every > self.max_steps
        ):
            raise ValueError(
                f"save_every={self.save_every} exceeds max_steps={self.max_steps}: no checkpoint "
                "would ever be written; lower save_every or set it to None"
            )
        return self

    @property
    def effective_chunk_size(self) -> int:
        """Chunk size of the fused path: ``chunk_size`` or ``loss.chunk_size``."""
        return self.chunk_size if self.chunk_size is not None else self.loss.chunk_size


class ReferenceConfig(_Cfg):
    """The `reference` stage: frozen-reference log-prob sums per pair and branch, once a round."""

    batch_size: int = Field(default=16, ge=1, description="Pairs per forward pass.")
    max_length: int = Field(
        default=256, ge=16, description="Max tokens per sequence; must match TrainConfig."
    )
    dtype: Literal["float32", "bfloat16"] = Field(
        default="float32", description="Dtype the reference model is loaded and run in."
    )
    chunk_size: int = Field(
        default=256, ge=1, description="Response tokens per lm_head chunk (no [B, T, V] logits)."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto", description="'auto': cuda when available, else cpu."
    )
    visual_gate: bool = Field(
        default=False,
        description="Score v' only for pairs the visual gate keeps (train.loss.visual_gate).",
    )

    @classmethod
    def for_training(cls, train: TrainConfig, **overrides) -> ReferenceConfig:
        """The reference config whose artifact ``train`` accepts (same max_length and dtype)."""
        values = {
            "max_length": train.max_length,
            "dtype": train.dtype,
            "chunk_size": train.effective_chunk_size,
            "batch_size": train.batch_size,
            "visual_gate": train.loss.visual_gate,
        }
        values.update(overrides)
        return cls(**values)


#: Tiny architectures whose vision warm start is implemented and tested (LLaVA's per-patch and
#: Qwen2-VL's merged-patch features); the other families skip it under ``enabled: auto``.
WARMUP_ARCHS = frozenset({"llava", "llava_mistral", "qwen2_vl"})


class VisionWarmupConfig(_Cfg):
    """Dense pretraining of the tiny model's vision tower + projector before SFT
    (fire_mpo_core.training.vision_warmup): a stand-in for a real model's pretrained encoder."""

    enabled: bool | Literal["auto"] = Field(
        default="auto",
        description="auto: on for the tiny model built in `prepare` on SynthLesion, off for a "
        "real checkpoint (model.name_or_path set) or a real dataset; true forces it (needs "
        "SynthLesion lesion masks); false skips it.",
    )
    steps: int = Field(default=2000, ge=1, description="Optimizer steps of the warm start.")
    batch_size: int = Field(default=32, ge=1, description="Images per step.")
    lr: float = Field(default=3e-3, gt=0, description="Peak AdamW learning rate (cosine decay).")
    pretrain_scans: int = Field(
        default=6000,
        ge=0,
        description="Extra generated scans from SynthLesion's own `pretrain` seed stream (no "
        "split's images), added to the train scans: the images a real encoder was pretrained on.",
    )
    polarity_weight: float = Field(
        default=0.5, ge=0, description="Weight of the per-token lesion polarity loss."
    )
    modality_weight: float = Field(
        default=0.5, ge=0, description="Weight of the image-level modality loss (global features)."
    )
    count_weight: float = Field(
        default=0.5, ge=0, description="Weight of the image-level lesion count (0/1/2) loss."
    )
    position_weight: float = Field(
        default=0.5,
        ge=0,
        description="Weight of the per-token own-quadrant loss (features that say where they are).",
    )
    seed: int = Field(default=0, description="Data order, flips and head initialisation seed.")

    def active(self, tiny_model: bool, dataset: str, arch: str = "llava") -> bool:
        """``auto``: on only for the tiny model built in ``prepare`` on SynthLesion (a real
        checkpoint already has a pretrained encoder; a real dataset has no dense targets), of
        an architecture the warm start reads features from (:data:`WARMUP_ARCHS`)."""
        if self.enabled == "auto":
            return tiny_model and dataset == "synthlesion" and arch in WARMUP_ARCHS
        return bool(self.enabled)


class SFTConfig(_Cfg):
    """Supervised warm start of the tiny base policy (skipped for real checkpoints)."""

    vision_warmup: VisionWarmupConfig = Field(
        default_factory=VisionWarmupConfig,
        description="Dense vision pretraining before SFT (the tiny default's stand-in encoder).",
    )
    train_vision: bool = Field(
        default=True,
        description="Also update the vision tower + projector during SFT (false: only the decoder "
        "learns, the warm-started features stay as pretrained).",
    )

    enabled: bool = Field(default=True, description="Run SFT; off for already-tuned checkpoints.")
    epochs: float = Field(default=2.0, gt=0, description="Passes over the train split.")
    max_steps: int | None = Field(
        default=None, ge=1, description="Stop after this many optimizer steps (overrides epochs)."
    )
    batch_size: int = Field(default=32, ge=1, description="Sequences per optimizer step.")
    lr: float = Field(default=2e-3, gt=0, description="Peak AdamW learning rate.")
    weight_decay: float = Field(default=0.0, ge=0, description="AdamW weight decay.")
    warmup_ratio: float = Field(default=0.05, ge=0, le=1, description="Linear warmup share.")
    max_length: int = Field(default=256, ge=16, description="Max tokens per sequence.")
    include_reports: bool = Field(default=True, description="Train on report records too.")
    seed: int = Field(default=0, description="Data order and dropout seed.")
