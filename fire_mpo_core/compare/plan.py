"""Which train + evaluate jobs a comparison runs, in order, and what they share.

The flow (`flows/compare.py`) only sequences: it asks this module for the jobs of the grid
search (every variant at every grid point, first seed, scored on the validation split), picks
each variant's point with :func:`~fire_mpo_core.compare.significance.select_grid_point`, then
runs the test jobs (every variant at its point, every seed)::

    spec = narrow(spec, seeds=[0, 1], methods=["dpo", "fire_mpo"], quick=False)
    variants = variant_configs(cfg, spec)
    jobs = selection_jobs(variants, spec.grid_points(), spec.seeds[0])
    ...
    jobs = test_jobs(variants, chosen, spec.seeds)

Jobs whose corrupt config and reference settings agree share one `corrupt` + `reference`
stage pair (:func:`shared_key`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fire_mpo_core.compare.spec import CompareSpec
from fire_mpo_core.config import ConfigError
from fire_mpo_core.corruption.config import CorruptConfig
from fire_mpo_core.store import canonical_json
from fire_mpo_core.training.config import ReferenceConfig, TrainConfig

Variants = dict[str, tuple[TrainConfig, CorruptConfig]]


@dataclass(frozen=True)
class Job:
    """One train + evaluate of the comparison: a variant at a grid point, on one seed's pairs."""

    variant: str
    index: int  # grid point index (selection phase)
    point: dict[str, Any]
    train: TrainConfig
    corrupt: CorruptConfig
    pairs_seed: int


def narrow(
    spec: CompareSpec, seeds: list[int] | None, methods: list[str] | None, quick: bool
) -> CompareSpec:
    """The spec restricted to `seeds` / `methods` (in the config's order); `quick`: one seed,
    10 steps per variant, output `<name>-quick`. Raises ConfigError on unknown methods."""
    data = spec.model_dump()
    if methods:
        unknown = [m for m in methods if m not in spec.variants]
        if unknown:
            raise ConfigError(f"--methods: unknown {unknown}; known: {', '.join(spec.variants)}")
        data["variants"] = {n: v for n, v in data["variants"].items() if n in methods}
        if data["baseline"] not in data["variants"]:
            data["baseline"] = None
    if seeds:
        data["seeds"] = seeds
    if quick:
        data["seeds"] = data["seeds"][:1]
        data["train"] = {**data["train"], "max_steps": 10, "save_every": None}
        data["name"] = f"{spec.name}-quick"
    return CompareSpec.model_validate(data)


def shared_key(train_cfg: TrainConfig, corrupt_cfg: CorruptConfig) -> str:
    """What a variant's corrupt + reference stages depend on besides the pairs."""
    return canonical_json(
        [
            corrupt_cfg.model_dump(mode="json"),
            ReferenceConfig.for_training(train_cfg).model_dump(mode="json"),
        ]
    )


def selection_jobs(variants: Variants, points: list[dict[str, Any]], seed: int) -> list[Job]:
    """The grid search: every variant at every point, on `seed`'s pairs (scored on val)."""
    return [
        Job(name, i, p, tc.model_copy(update={**p, "seed": seed}), cc, seed)
        for name, (tc, cc) in variants.items()
        for i, p in enumerate(points)
    ]


def test_jobs(variants: Variants, chosen: dict[str, dict[str, Any]], seeds: list[int]) -> list[Job]:
    """The comparison itself: every variant at its chosen point, on every seed (on test)."""
    return [
        Job(name, 0, chosen[name], tc.model_copy(update={**chosen[name], "seed": s}), cc, s)
        for name, (tc, cc) in variants.items()
        for s in seeds
    ]
