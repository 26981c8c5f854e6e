"""The names every layer shares: the stage names and the strict base of every config model.

Lowest layer of the package (imports nothing from it), so that each stage's config module
(``data/config.py``, ``models/config.py``, ...) and the store can use them without importing
the cycle config that aggregates them (:mod:`fire_mpo_core.config`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

StageName = Literal[
    "prepare", "sft", "sample", "judge", "corrupt", "reference", "train", "evaluate"
]
STAGES: tuple[StageName, ...] = (
    "prepare",
    "sft",
    "sample",
    "judge",
    "corrupt",
    "reference",
    "train",
    "evaluate",
)
#: Stages that run once per cycle (round 0) rather than once per round.
SETUP_STAGES: tuple[StageName, ...] = ("prepare", "sft")


class StrictConfig(BaseModel):
    """Base of the config models: unknown keys and invalid assignments fail validation."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
