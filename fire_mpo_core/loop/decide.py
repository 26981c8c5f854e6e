"""Continue or stop the on-policy loop, from the rounds' validation values (never the test split).

    from fire_mpo_core.loop.decide import RoundScore, decide, scores_from_history
    history = [RoundScore(round=0, value=0.41), RoundScore(round=1, value=0.45)]
    d = decide(history, LoopConfig(min_improvement=0.01))
    d.action, d.reason    # "continue", "improved 0.41 -> 0.45 (+0.04 > margin 0.01)"

The last entry of ``history`` is the round being decided; round 0 is the SFT base. Rules
(:class:`~fire_mpo_core.loop.config.LoopConfig`):

* improved: its value > (the best value of the earlier rounds) + ``min_improvement``; a tie is
  no improvement; the first value ever is one (there is nothing to beat); a missing value
  (``None``: the split had nothing to score, or the selection pass is off) never is;
* ``rounds_without_improvement``: how many rounds in a row, ending with this one, did not
  improve (each against the best before it);
* stop at round ``max_rounds`` (first), or when ``rounds_without_improvement >= patience``;
  else continue.

The best round is the highest value, the earliest on ties (a later round must beat it
strictly), which is also the promotion rule of :mod:`fire_mpo_core.loop.promote`.

The decision is made after each round's evaluation, never cached, by the promote step
(:func:`decide_after`): the evaluation stores values only (``history.jsonl``), so changing
``patience``, ``min_improvement`` or ``max_rounds`` re-evaluates nothing and applies at once.
:func:`record_decision` keeps each decision at ``<store>/<run>/decisions/round-<k>.json``.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from fire_mpo_core.loop.config import LoopConfig

#: The prefix of the selection split's metrics in history.jsonl rows (``val_grounded_accuracy``).
VAL_PREFIX = "val_"


class RoundScore(BaseModel):
    """One round's validation value of the headline metric (None: not measured)."""

    model_config = ConfigDict(frozen=True)

    round: int = Field(ge=0, description="Round (0 = the SFT base).")
    value: float | None = Field(description="The metric on the validation split, or None.")


class LoopDecision(BaseModel):
    """What the loop does after a round, and why (``<store>/<run>/decisions/round-<k>.json``)."""

    model_config = ConfigDict(frozen=True)

    round: int = Field(description="The round decided on (the last of the history).")
    metric: str = Field(description="The headline validation metric (loop.metric).")
    value: float | None = Field(description="This round's value (None: missing).")
    previous: float | None = Field(description="Round k-1's value (None: none or missing).")
    change: float | None = Field(description="value - previous (None if either is missing).")
    best_round: int | None = Field(description="Round of the best value so far, this included.")
    best_value: float | None = Field(description="The best value so far (None: none yet).")
    improved: bool = Field(description="value > the best earlier value + min_improvement.")
    rounds_without_improvement: int = Field(description="Rounds in a row, ending here.")
    action: Literal["continue", "stop"] = Field(description="Run another round, or stop.")
    reason: str = Field(description="One human sentence saying why.")


def _f(x: float) -> str:
    return f"{x:.4g}"


def _best(scores: Iterable[RoundScore]) -> RoundScore | None:
    """The highest value, the earliest round on ties; None when no round has a value."""
    best = None
    for s in scores:
        if s.value is not None and (best is None or s.value > best.value):
            best = s
    return best


def _improved(value: float | None, best_before: RoundScore | None, margin: float) -> bool:
    if value is None:
        return False
    return best_before is None or value > best_before.value + margin


def _streak(history: Sequence[RoundScore], margin: float) -> int:
    """Rounds in a row, ending with the last, that did not improve on the best before them."""
    streak = 0
    for i, s in enumerate(history):
        streak = 0 if _improved(s.value, _best(history[:i]), margin) else streak + 1
    return streak


def _evidence(now: RoundScore, best_before: RoundScore | None, cfg: LoopConfig) -> str:
    """How this round's value compares with the best before it, in words."""
    m = cfg.metric
    if now.value is None:
        return f"{m} missing in round {now.round} (counts as no improvement)"
    if best_before is None:
        return f"first value of {m}: {_f(now.value)} in round {now.round}"
    gain = now.value - best_before.value
    op = ">" if gain > cfg.min_improvement else "<="
    words = "improved" if op == ">" else "no improvement:"
    return (
        f"{words} {_f(best_before.value)} -> {_f(now.value)} "
        f"({gain:+.4g} {op} margin {_f(cfg.min_improvement)})"
    )


def decide(history: Sequence[RoundScore], cfg: LoopConfig) -> LoopDecision:
    """The decision after the last round of ``history`` (rounds in order; see the module
    docstring for the rules). Raises ValueError on an empty or unordered history."""
    if not history:
        raise ValueError("decide needs at least one round in history")
    rounds = [s.round for s in history]
    if rounds != sorted(set(rounds)):
        raise ValueError(f"history rounds must be increasing and distinct, got {rounds}")
    now, before = history[-1], history[:-1]
    best_before = _best(before)
    improved = _improved(now.value, best_before, cfg.min_improvement)
    streak = _streak(history, cfg.min_improvement)
    best = _best(history)
    prev = before[-1].value if before and before[-1].round == now.round - 1 else None
    change = None if now.value is None or prev is None else round(now.value - prev, 6)
    evidence = _evidence(now, best_before, cfg)
    if now.round >= cfg.max_rounds:
        action, why = "stop", f"reached max_rounds {cfg.max_rounds}"
    elif streak >= cfg.patience:
        action = "stop"
        why = f"no improvement for {streak} round{'s' * (streak > 1)} (patience {cfg.patience})"
    else:
        action = "continue"
        why = "" if improved else f"{streak} of {cfg.patience} rounds of patience used"
    return LoopDecision(
        round=now.round,
        metric=cfg.metric,
        value=now.value,
        previous=prev,
        change=change,
        best_round=None if best is None else best.round,
        best_value=None if best is None else best.value,
        improved=improved,
        rounds_without_improvement=streak,
        action=action,
        reason="; ".join(x for x in (evidence, why) if x),
    )


def scores_from_history(
    rows: Iterable[Mapping[str, Any]], metric: str, prefix: str = VAL_PREFIX
) -> list[RoundScore]:
    """history.jsonl rows (``{"round": k, "val_<metric>": v, ...}``) as round scores; a row
    without the key (an older evaluation, or no selection pass) scores None."""
    out = []
    for row in rows:
        v = row.get(prefix + metric)
        out.append(RoundScore(round=int(row["round"]), value=None if v is None else float(v)))
    return out


HISTORY = "history.jsonl"  # in each evaluate folder: every round so far, `val_<name>` keys too
DECISIONS = "decisions"  # <store>/<run>/decisions/round-<k>.json


def decide_after(evaluate_dir: Path, cfg: LoopConfig) -> LoopDecision:
    """The decision after the round ``evaluate_dir`` evaluated, over its ``history.jsonl``."""
    rows = [json.loads(x) for x in (Path(evaluate_dir) / HISTORY).open() if x.strip()]
    return decide(scores_from_history(rows, cfg.metric), cfg)


def record_decision(store: Path, run: str, decision: LoopDecision) -> Path:
    """Write ``decision`` to ``<store>/<run>/decisions/round-<k>.json`` (atomically: a
    temporary file, then a rename); a later decision on the same round replaces it."""
    folder = Path(store) / run / DECISIONS
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"round-{decision.round}.json"
    tmp = folder / f".{path.name}.{uuid.uuid4().hex[:8]}"
    tmp.write_text(decision.model_dump_json(indent=2) + "\n")
    os.replace(tmp, path)
    return path
