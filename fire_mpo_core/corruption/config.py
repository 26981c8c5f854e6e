"""Configuration of the `corrupt` stage: the corruption kind, its region and strength, mask
handling, the segmenter fallback and the worker pool.

    from fire_mpo_core.corruption.config import CorruptConfig
    cfg = CorruptConfig(kind="inpaint", dilate_px=1)
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from fire_mpo_core.corruption.ops import CORRUPTIONS, SIGMA_MASK, SIGMA_WHOLE


class CorruptConfig(BaseModel):
    """Configuration of the corrupt stage (library side)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    kind: str = Field(
        default="noise",
        description="Corruption inside the lesion mask: noise, inpaint, blur, black or crop.",
    )
    region: Literal["lesion", "whole"] = Field(
        default="lesion",
        description="'lesion': the paper's mask fallbacks; 'whole': apply `kind` to the whole "
        "image for every record (the whole-image ablation).",
    )
    sigma_mask: float = Field(
        default=SIGMA_MASK, gt=0, description="Noise std inside a lesion mask, 0-255 scale."
    )
    sigma_whole: float = Field(
        default=SIGMA_WHOLE,
        gt=0,
        description="Noise std for whole-image corruption and the no-prompt / not-found "
        "fallbacks, 0-255 scale.",
    )
    dilate_px: int = Field(
        default=0,
        ge=0,
        le=64,
        description="Grow every lesion mask by this many pixels before corrupting (covers "
        "borders a mask or segmenter misses); 0 = the mask as given.",
    )
    params: dict[str, float | int | str | bool] = Field(
        default_factory=dict,
        description="Extra keyword parameters of `kind` (e.g. blur sigma, inpaint method); "
        "noise's sigma comes from sigma_mask / sigma_whole.",
    )
    segmenter: str | None = Field(
        default="classical",
        description="Registered segmenter used when a record has a prompt but no mask; None "
        "skips segmentation (prompted records then get whole-image noise).",
    )
    segmenter_options: dict[str, float | int | str | bool] = Field(
        default_factory=dict, description="Keyword options passed to the segmenter's factory."
    )
    resize_masks: bool = Field(
        default=False,
        description="Resize a mask whose size differs from its image (nearest neighbour); "
        "False makes such a record fail with a clear error.",
    )
    num_workers: int = Field(
        default=2, ge=0, le=256, description="Parallel workers; 0 runs in the calling thread."
    )
    pool: Literal["process", "thread"] = Field(
        default="thread",
        description="Worker kind. Threads (default): no start-up or pickling cost, and OpenCV, "
        "Pillow and most numpy work release the GIL. Processes: scale pure-Python work (the "
        "classical segmenter) but cost 1-2 s to start and pickle every image; the calling script "
        "needs an `if __name__ == '__main__':` guard (forkserver/spawn re-import it).",
    )
    start_method: Literal["forkserver", "spawn", "fork"] = Field(
        default="forkserver",
        description="multiprocessing start method of the process pool; forkserver is safe in "
        "threaded parents (Prefect, torch), fork starts fastest.",
    )
    chunk_size: int = Field(
        default=32, ge=1, description="Records sent to a worker at a time (amortises IPC)."
    )
    seed: int = Field(default=0, ge=0, description="Base seed; record seeds derive from it.")
    max_pixels: int = Field(
        default=4096 * 4096,
        ge=1,
        description="Records with more than this many pixels (H*W) are refused as errors.",
    )
    quality: bool = Field(
        default=True, description="Compute quality numbers per image into info['quality']."
    )
    shards: int = Field(
        default=1,
        ge=1,
        le=1024,
        description="Split the images into this many contiguous shards corrupted in parallel as "
        "Prefect tasks (threads, or a Dask cluster sharing the store's filesystem: docs/gpu.md), "
        "each with its own num_workers pool; 1 corrupts in the stage task. The output is "
        "byte-identical for any value.",
    )

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, v: str) -> str:
        if v not in CORRUPTIONS:
            raise ValueError(f"unknown kind {v!r}; known kinds: {', '.join(sorted(CORRUPTIONS))}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> CorruptConfig:
        if self.region == "whole" and self.kind == "inpaint":
            raise ValueError("kind 'inpaint' needs a lesion mask; it cannot use region 'whole'")
        if self.kind == "noise" and "sigma" in self.params:
            raise ValueError("set noise sigma with sigma_mask / sigma_whole, not params.sigma")
        return self
