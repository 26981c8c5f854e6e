"""The cycle config: every stage's config model under one YAML file, loaded and validated.

Load a recipe with :func:`load_config` (YAML file, optional dotted overrides)::

    from fire_mpo_core.config import load_config
    cfg = load_config("configs/default.yaml", overrides={"rounds": 2})

Each stage's config lives beside its code (``data/config.py``, ``models/config.py``,
``training/config.py``, ``judge/config.py``, ...); this module only aggregates them, so it is
the top of the package's import graph and nothing below imports it. Every model forbids unknown
keys and validates types and ranges, so a typo or a negative size fails at load time with the
file and the dotted field path in the message.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from fire_mpo_core.corruption.config import CorruptConfig
from fire_mpo_core.data.config import REAL_DATA_REJECT_BUDGET, DataConfig
from fire_mpo_core.evaluation.config import EvaluateConfig
from fire_mpo_core.judge import JUDGES
from fire_mpo_core.judge.config import JudgeConfig
from fire_mpo_core.loop.config import LoopConfig
from fire_mpo_core.losses.objectives import LOSSES
from fire_mpo_core.models.config import ModelConfig
from fire_mpo_core.sampling import ENGINES
from fire_mpo_core.sampling.config import SampleConfig
from fire_mpo_core.schema import SETUP_STAGES, STAGES, StageName, StrictConfig
from fire_mpo_core.training.config import (
    WARMUP_ARCHS,
    SFTConfig,
    TrainConfig,
    VisionWarmupConfig,
)

__all__ = [
    "REAL_DATA_REJECT_BUDGET",
    "SETUP_STAGES",
    "STAGES",
    "WARMUP_ARCHS",
    "ConfigError",
    "CorruptConfig",
    "CycleConfig",
    "DataConfig",
    "EvaluateConfig",
    "JudgeConfig",
    "LoopConfig",
    "ModelConfig",
    "SFTConfig",
    "SampleConfig",
    "StageName",
    "TrainConfig",
    "VisionWarmupConfig",
    "load_config",
]


class CycleConfig(StrictConfig):
    """The full cycle: setup stages, then `rounds` rounds of on-policy alignment."""

    run: str = Field(
        default="default", pattern=r"^[A-Za-z0-9_.-]+$", description="Run name in the store."
    )
    store: Path = Field(default=Path("store"), description="Artifact store root folder.")
    rounds: int = Field(default=1, ge=0, description="On-policy rounds after the setup stages.")
    seed: int = Field(default=0, description="Global seed; stage seeds default from it.")
    num_threads: int | None = Field(
        default=None,
        ge=1,
        description="torch CPU threads per stage; 1 is fastest for the tiny model on 2 cores "
        "(oversubscribed threads spin). None: torch's default.",
    )
    stages: list[StageName] | None = Field(
        default=None, description="Run only these stages (their inputs must exist); None: all."
    )
    max_reject_fraction: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="Fail a stage (with a summary of the reasons) when it rejects more than this "
        "share of its records; None: no limit (rejects are still listed in rejects.jsonl), "
        f"except `prepare` of a real dataset (data.path), limited to {REAL_DATA_REJECT_BUDGET} "
        "(set 1.0 to accept any share).",
    )
    remote_stages: dict[StageName, str] = Field(
        default_factory=dict,
        description="Stages run through a Prefect deployment instead of in the flow run, e.g. "
        "{train: fire-mpo/stage-train-gpu} (the GPU pool): the flow calls `run_deployment` and "
        "waits. The store must be one path that both workers see; it is checked at the start.",
    )
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    sft: SFTConfig = Field(default_factory=SFTConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    corrupt: CorruptConfig = Field(default_factory=CorruptConfig)
    train: TrainConfig = Field(
        default_factory=TrainConfig,
        description="Preference training; the `reference` stage derives its settings from it.",
    )
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    loop: LoopConfig = Field(
        default_factory=LoopConfig,
        description="The closed loop: each round's reference policy, the validation metric "
        "that ranks rounds (the best is promoted) and the continue / stop rule.",
    )

    @field_validator("remote_stages")
    @classmethod
    def _deployment_names(cls, v: dict[str, str]) -> dict[str, str]:
        for stage, name in v.items():
            if not re.fullmatch(r"[^/\s]+/[^/\s]+", name):
                raise ValueError(f"{stage}: {name!r} is not a deployment name '<flow>/<name>'")
        return v

    @model_validator(mode="after")
    def _registered_names(self) -> CycleConfig:
        # Checked here, at the top, because each registry imports the config it is named in.
        for field, name, registry in (
            ("judge.name", self.judge.name, JUDGES),
            ("train.loss.name", self.train.loss.name, LOSSES),
            ("sample.engine", self.sample.engine, ENGINES),
        ):
            if name not in registry:
                raise ValueError(f"{field} {name!r} is unknown; known: {sorted(registry)}")
        return self

    @model_validator(mode="after")
    def _loop_fits(self) -> CycleConfig:
        if self.rounds > self.loop.max_rounds:
            raise ValueError(
                f"rounds {self.rounds} exceeds loop.max_rounds {self.loop.max_rounds}; lower "
                "rounds or raise loop.max_rounds"
            )
        if self.loop.reference == "previous_round" and self.train.strategy == "fsdp":
            # The frozen reference is a second adapter switched in by peft's set_adapter, which
            # toggles requires_grad: not under FSDP2's sharded parameters (untested there).
            raise ValueError(
                "loop.reference 'previous_round' is not supported with train.strategy 'fsdp'; "
                "use train.strategy 'ddp' or loop.reference 'base'"
            )
        return self


class ConfigError(ValueError):
    """A config file failed validation; the message names the file and each bad field."""


def _format_errors(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "<root>"
        got = e.get("input")
        # Never echo what might be a secret pasted into a key/token field.
        secret = any(w in loc.lower() for w in ("key", "token", "secret", "password"))
        shown = "" if isinstance(got, dict | list) or secret else f" (got {got!r})"
        lines.append(f"  {loc}: {e['msg']}{shown}")
    return "\n".join(lines)


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    node = data
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {p!r} is not a section")
    node[leaf] = value


def load_config(
    path: str | Path | None = None, overrides: dict[str, Any] | None = None
) -> CycleConfig:
    """Load and validate a cycle config from YAML, applying dotted-key overrides.

    Raises:
        ConfigError: naming the file and the dotted path of every invalid field.
    """
    source = str(path) if path else "<defaults>"
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"invalid YAML in {p}: {e}") from e
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"invalid config {p}: top level must be a mapping")
        data = loaded or {}
    for k, v in (overrides or {}).items():
        _set_dotted(data, k, v)
    try:
        return CycleConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, source)) from None
