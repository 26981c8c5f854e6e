"""Configuration of the `prepare` stage's data: SynthLesion's generator or a real dataset.

from fire_mpo_core.data.config import DataConfig
cfg = DataConfig(n_train_images=1000, sentence_fraction=0.5)
cfg = DataConfig(dataset="slake", path="data/Slake1.0")
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from fire_mpo_core.schema import StrictConfig

#: `prepare` of a real dataset fails when it rejects more than this share of the records, unless
#: `max_reject_fraction` says otherwise: a folder with most images missing trained a model on
#: the 12% that were left, and the round lowered every metric without a word of warning.
REAL_DATA_REJECT_BUDGET = 0.5


class DataConfig(StrictConfig):
    """What the `prepare` stage generates (SynthLesion) or loads."""

    dataset: Literal["synthlesion", "slake", "vqarad", "iuxray", "hf_disk", "jsonl"] = Field(
        default="synthlesion",
        description="synthlesion (generated offline; the size fields below apply) or a real "
        "dataset read from `path` in its own layout (fire_mpo_core.data.loaders).",
    )
    path: Path | None = Field(
        default=None,
        description="Local folder of the real dataset (e.g. data/Slake1.0); required unless "
        "dataset is synthlesion. Its files are linked or copied into the prepare stage folder.",
    )
    lang: str | None = Field(
        default="en", description="SLAKE: question language kept (None: all languages)."
    )
    annotation: str | None = Field(
        default=None, description="IU X-Ray: annotation file name inside `path` (default: auto)."
    )
    max_records_per_split: int | None = Field(
        default=None, ge=1, description="Real datasets: keep at most this many records per split."
    )
    image_size: int = Field(default=64, ge=32, le=512, description="Square image side in pixels.")
    n_train_images: int = Field(default=400, ge=1, description="Scans in the train split.")
    n_val_images: int = Field(default=40, ge=0, description="Scans in the validation split.")
    n_test_images: int = Field(default=120, ge=1, description="Scans in the test split.")
    questions_per_image: int = Field(
        default=4, ge=1, le=16, description="VQA questions drawn per scan."
    )
    report_fraction: float = Field(
        default=0.25, ge=0.0, le=1.0, description="Share of scans that also get a report record."
    )
    sentence_fraction: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="Share of question phrasings whose answers are model-style sentences ('Upper "
        "left, based on the image.') instead of the bare answer: response tokens outside the "
        "clinical spans, where span-level and sequence-level losses differ.",
    )
    language_prior: float = Field(
        default=0.8,
        ge=0.5,
        le=1.0,
        description="Train-only skew of guessable question types (0.5 = none); test is balanced.",
    )
    seed: int = Field(default=0, description="Generator seed; same seed, same bytes.")

    def fingerprint(self) -> str | None:
        """For real datasets: a digest of (relative path, size, mtime) of every file under
        `path`, which the flow adds to the prepare stage's key (None for SynthLesion)."""
        if self.path is None:
            return None
        h = hashlib.sha256()
        for dirpath, dirnames, filenames in os.walk(self.path):
            dirnames.sort()
            for name in sorted(filenames):
                p = Path(dirpath) / name
                st = p.stat()
                h.update(f"{p.relative_to(self.path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        return h.hexdigest()[:16]

    @model_validator(mode="after")
    def _path_for_real_data(self) -> DataConfig:
        if self.dataset != "synthlesion" and self.path is None:
            raise ValueError(f"data.path is required when data.dataset is {self.dataset!r}")
        if self.dataset == "synthlesion" and self.path is not None:
            raise ValueError("data.path is set but data.dataset is 'synthlesion' (generated)")
        return self
