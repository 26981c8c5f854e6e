"""One preference-training run as a typed job, and what it returns.

The same :class:`TrainJob` goes to the trainer in this process
(:func:`fire_mpo_core.training.preference.train_preference`), to the multi-process launcher
(:func:`fire_mpo_core.training.launch.launch_training`, which writes it as the ranks' spec) and
to the benchmarks::

    job = TrainJob(policy=read_policy(sft_dir), pairs_path=corrupt_dir, image_root=data_dir,
                   reference_path=reference_dir, cfg=TrainConfig(), out_dir=out)
    result = train_preference(job)            # TrainResult
    result.policy.adapter, result.final_metrics["loss"]
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from fire_mpo_core.policy import PolicyRef
from fire_mpo_core.training.config import TrainConfig


class TrainJob(BaseModel):
    """What to train, on which pairs, into which folder."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    policy: PolicyRef = Field(
        description="Base model, and (round k > 1) the adapter to continue training."
    )
    pairs_path: Path = Field(
        description="The pairs' data.jsonl or its folder (the corrupt stage's output). Invalid "
        "pairs (bad spans, missing images) are skipped and listed in the result's rejects."
    )
    image_root: Path = Field(description="Folder the pairs' `image` paths are relative to.")
    corrupt_root: Path | None = Field(
        default=None,
        description="Folder the `corrupted_image` paths are relative to; None: the pairs' folder.",
    )
    reference_path: Path | None = Field(
        default=None,
        description="The reference artifact (reference.safetensors or its folder); None with "
        "cfg.use_reference_artifact computes it into out_dir/reference.",
    )
    reference_adapter: Path | None = Field(
        default=None,
        description="An adapter of policy.base whose policy is the frozen reference (round "
        "k-1's, loop.reference: previous_round), loaded beside the trainable one; None: the "
        "base with the adapter off.",
    )
    cfg: TrainConfig = Field(description="The training config.")
    out_dir: Path = Field(description="Output folder; a resumable run's checkpoints live here.")

    def resolved(self) -> TrainJob:
        """The job with absolute paths and the corrupt root filled in (what every rank reads)."""
        pairs = self.pairs_path.resolve()
        corrupt = self.corrupt_root or (pairs if pairs.is_dir() else pairs.parent)
        return self.model_copy(
            update={
                "pairs_path": pairs,
                "image_root": self.image_root.resolve(),
                "corrupt_root": Path(corrupt).resolve(),
                "reference_path": None
                if self.reference_path is None
                else self.reference_path.resolve(),
                "reference_adapter": None
                if self.reference_adapter is None
                else self.reference_adapter.resolve(),
                "out_dir": self.out_dir.resolve(),
            }
        )


class TrainResult(BaseModel):
    """What a finished run reports (rank 0's view under several processes)."""

    model_config = ConfigDict(extra="forbid")

    policy: PolicyRef = Field(description="The base plus the trained adapter (absolute path).")
    merged: str | None = Field(description="The merged model folder, when cfg.merge_adapter.")
    steps: int = Field(description="Optimizer steps of the whole run (resumed ones included).")
    pairs: int = Field(description="Trainable pairs.")
    pairs_with_corrupted: int = Field(description="Pairs that carry a v'.")
    rejects: list[dict[str, str]] = Field(description="Skipped pairs: {id, reason}.")
    resumed_from_step: int | None = Field(description="Checkpoint step resumed from, if any.")
    final_metrics: dict[str, float] = Field(description="The last logged metrics line.")
    seconds: float = Field(description="Wall time of the call.")
    steps_per_s: float = Field(description="Optimizer steps per second of training time.")
    pairs_per_s: float = Field(description="Pairs per second of training time.")
    image_encodes_per_pair_step: float = Field(description="Vision encodes per pair and step.")
    trainable_parameters: int = Field(description="Parameters the optimizer updates.")
    adapted_modules: int = Field(description="Modules that carry a LoRA adapter.")
    num_processes: int = Field(description="Ranks that trained.")
    strategy: str = Field(description="single, ddp or fsdp.")
