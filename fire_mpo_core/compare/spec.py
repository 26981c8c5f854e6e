"""The comparison's config: the `compare:` section (:class:`CompareSpec`: variants, seeds,
grid, metrics) and loading it over a cycle config, with every variant's train / corrupt config
validated at load time (a bad key names `compare.variants.<name>.<section>.<field>`).

    from fire_mpo_core.compare.spec import load_compare, variant_configs
    cfg, spec = load_compare("configs/compare.yaml")
    train_cfg, corrupt_cfg = variant_configs(cfg, spec)["dpo"]
"""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from fire_mpo_core.config import ConfigError, CycleConfig, load_config
from fire_mpo_core.corruption.config import CorruptConfig
from fire_mpo_core.losses.objectives import LOSSES
from fire_mpo_core.training.config import TrainConfig

NAME_PATTERN = r"^[A-Za-z0-9_.-]+$"
#: The default "average" column: one answer, one report and one grounding metric of each kind.
AVERAGE_METRICS = (
    "closed_lesion_accuracy",
    "open_recall",
    "report_rouge_l",
    "clinical_f1",
    "grounded_accuracy",
)
TABLE_METRICS = (
    "closed_accuracy",
    "closed_lesion_accuracy",
    "open_exact_match",
    "open_recall",
    "report_rouge_l",
    "clinical_f1",
    "grounded_accuracy",
    "keep_accuracy",
    "blind_accuracy",
)
CURVE_METRICS = ("loss", "rewards/accuracy", "rewards/margin", "nll")
#: Per-record metrics with a paired significance test (see :func:`record_scores`).
SIGNIFICANCE_METRICS = ("closed_accuracy", "closed_lesion_accuracy", "grounded_accuracy")
LAYER_METRIC = re.compile(r"^lesion_attention_ratio_l(\d+)$")


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Variant(_Spec):
    """One row of the table: overrides of the cycle's `train` and `corrupt` sections."""

    description: str = Field(default="", description="What the row is, for the report.")
    train: dict[str, Any] = Field(
        default_factory=dict,
        description="Dotted overrides of the train section, e.g. {'loss.name': 'dpo'}.",
    )
    corrupt: dict[str, Any] = Field(
        default_factory=dict,
        description="Dotted overrides of the corrupt section (corruption-kind ablations get "
        "their own corrupt and reference stages), e.g. {'kind': 'black'}.",
    )


class CompareSpec(_Spec):
    """The `compare:` section: which variants, which seeds, which metrics."""

    name: str = Field(
        default="paper",
        pattern=NAME_PATTERN,
        description="Output folder name: <store>/<run>/compare/<name>/.",
    )
    seeds: list[int] = Field(
        default=[0, 1, 2], min_length=1, description="train.seed of each run of every variant."
    )
    train: dict[str, Any] = Field(
        default_factory=dict,
        description="Dotted train overrides applied to every variant before its own (e.g. "
        "{'epochs': 1.0} to fit the time budget).",
    )
    variants: dict[str, Variant] = Field(
        min_length=1, description="Row name -> its overrides; rows appear in this order."
    )
    baseline: str | None = Field(
        default=None, description="Variant the report measures the others' average against."
    )
    average: list[str] = Field(
        default=list(AVERAGE_METRICS),
        min_length=1,
        description="metrics.json keys (0-1, higher is better) averaged into the average column.",
    )
    metrics: list[str] = Field(
        default=list(TABLE_METRICS), min_length=1, description="Table columns (metrics.json keys)."
    )
    curves: list[str] = Field(
        default=list(CURVE_METRICS),
        min_length=1,
        description="Training-log keys (train metrics.jsonl) plotted against the step.",
    )
    resample: bool = Field(
        default=True,
        description="Each seed also re-draws the on-policy answers (sample.seed = seed), so a "
        "seed has its own rollouts, pairs, corrupted images and reference; False: one set of "
        "pairs, seeds vary only the LoRA initialisation and data order.",
    )
    grid: dict[str, list[Any]] = Field(
        default_factory=dict,
        description="Train settings tried for EVERY variant alike, e.g. {'lr': [1e-3, 2e-3], "
        "'epochs': [1.0]} (the product is searched); each point is trained with the first seed "
        "and scored on the validation split, and the best by `select` is used for every seed "
        "on the test split. Empty: no search.",
    )
    select: str = Field(
        default="average",
        description="Validation score the grid picks by: 'average' (the average column's "
        "metrics) or one metrics.json key; higher is better.",
    )
    significance: list[str] = Field(
        default_factory=lambda: list(SIGNIFICANCE_METRICS),
        description="Per-record metrics tested, paired, against the baseline and the SFT base: "
        "closed_accuracy, closed_lesion_accuracy (evaluate data.jsonl) and grounded_accuracy "
        "(grounding.jsonl remove probes).",
    )
    workers: int = Field(
        default=1,
        ge=1,
        le=8,
        description="(variant, seed) jobs trained at once in threads. 1 = one after another: "
        "bit-reproducible. > 1 shares torch's global RNG between jobs (dropout draws interleave), "
        "so a rerun is statistically, not bitwise, the same.",
    )

    @field_validator("seeds")
    @classmethod
    def _unique_seeds(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError(f"seeds repeat: {v}")
        return v

    @field_validator("variants")
    @classmethod
    def _variant_names(cls, v: dict[str, Variant]) -> dict[str, Variant]:
        bad = [n for n in v if not re.fullmatch(NAME_PATTERN, n)]
        if bad:
            raise ValueError(f"variant names must match {NAME_PATTERN}: {bad}")
        return v

    @field_validator("grid")
    @classmethod
    def _grid_fields(cls, v: dict[str, list[Any]]) -> dict[str, list[Any]]:
        unknown = [k for k in v if k not in TrainConfig.model_fields]
        if unknown:
            raise ValueError(f"grid keys must be train fields: {unknown}")
        empty = [k for k, vals in v.items() if not vals]
        if empty:
            raise ValueError(f"grid values must be non-empty lists: {empty}")
        return v

    @field_validator("significance")
    @classmethod
    def _known_tests(cls, v: list[str]) -> list[str]:
        unknown = [m for m in v if m not in SIGNIFICANCE_METRICS]
        if unknown:
            raise ValueError(f"significance metrics must be in {SIGNIFICANCE_METRICS}: {unknown}")
        return v

    def grid_points(self) -> list[dict[str, Any]]:
        """Every combination of the grid ({} when there is no grid), in a stable order."""
        keys = sorted(self.grid)
        combos = itertools.product(*(self.grid[k] for k in keys))
        return [dict(zip(keys, combo)) for combo in combos]

    @model_validator(mode="after")
    def _known_baseline(self) -> CompareSpec:
        if self.baseline is not None and self.baseline not in self.variants:
            raise ValueError(f"baseline {self.baseline!r} is not a variant: {list(self.variants)}")
        return self


def _set_dotted(data: dict[str, Any], dotted: str, value: Any, where: str) -> None:
    node = data
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{where}.{dotted}: {p!r} is not a section")
    node[leaf] = value


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in data.items():
        if isinstance(v, dict) and v and k not in ("remote_stages",):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _section(model: type[BaseModel], base: dict[str, Any], overrides: list[tuple[str, dict]]):
    data = json.loads(json.dumps(base))
    for where, ov in overrides:
        for k, v in ov.items():
            _set_dotted(data, k, v, where)
    try:
        return model.model_validate(data)
    except ValidationError as e:
        where = overrides[-1][0] if overrides else model.__name__
        lines = [f"invalid config {where}:"]
        for err in e.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "<root>"
            lines.append(f"  {where}.{loc}: {err['msg']}")
        raise ConfigError("\n".join(lines)) from None


def variant_configs(cfg: CycleConfig, spec: CompareSpec) -> dict[str, tuple[TrainConfig, Any]]:
    """Variant name -> (its TrainConfig with seed 0, its CorruptConfig), validated.

    Raises:
        ConfigError: naming ``compare.variants.<name>.<section>.<field>`` of a bad override.
    """
    out = {}
    base_train = cfg.train.model_dump(mode="json")
    base_corrupt = cfg.corrupt.model_dump(mode="json")
    for name, v in spec.variants.items():
        where = f"compare.variants.{name}"
        train = _section(
            TrainConfig, base_train, [("compare.train", spec.train), (f"{where}.train", v.train)]
        )
        corrupt = _section(CorruptConfig, base_corrupt, [(f"{where}.corrupt", v.corrupt)])
        if train.loss.name not in LOSSES:  # a registry key: the model cannot check it itself
            raise ConfigError(
                f"invalid config {where}.train:\n  {where}.train.loss.name: "
                f"{train.loss.name!r} is unknown; known: {sorted(LOSSES)}"
            )
        out[name] = (train, corrupt)
    return out


def load_compare(
    path: str | Path, store: str | None = None, run: str | None = None
) -> tuple[CycleConfig, CompareSpec]:
    """The cycle config and the comparison spec of a compare YAML, both validated.

    ``base:`` (a path relative to the file) names the cycle config this file extends; every
    other top-level key but ``compare`` overrides it. `store` / `run` override the result; the
    store path is made absolute.

    Raises:
        ConfigError: naming the file and each bad field (``compare.<field>`` for the spec).
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"invalid YAML in {p}: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config {p}: top level must be a mapping")
    if "compare" not in data:
        raise ConfigError(f"invalid config {p}: no `compare:` section")
    raw_spec = data.pop("compare")
    base = data.pop("base", None)
    overrides = _flatten(data)
    if store is not None:
        overrides["store"] = store
    if run is not None:
        overrides["run"] = run
    cfg = load_config(p.parent / base if base else None, overrides)
    cfg.store = cfg.store.resolve()
    try:
        spec = CompareSpec.model_validate(raw_spec)
    except ValidationError as e:
        lines = [f"invalid config {p}:"]
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"])
            lines.append(f"  compare.{loc}: {err['msg']}" if loc else f"  compare: {err['msg']}")
        raise ConfigError("\n".join(lines)) from None
    variant_configs(cfg, spec)  # fail now, not after the setup stages
    return cfg, spec
