"""Reward-hacking and health diagnostics of one round: its pairs, its training log, its lineage.

    from fire_mpo_core.training.health import RoundHealth
    health = RoundHealth(cfg.health, round_=k, previous=policy_dir, warn=log.warning)
    health.check_pairs(corrupt_dir / "data.jsonl")  # before training: warns, or raises
    counts = health.finish(train_dir)               # after: health.json + a metrics.jsonl record

What is measured (numbers only; thresholds live in :class:`HealthConfig`, and :func:`check`
turns numbers into flags):

* ``pairs`` (before training): ``length_gap_words`` = mean over pairs of words(y+) - words(y-)
  (signed; whitespace words), ``chosen_longer_share``, ``edit_distance`` = mean word-level
  Levenshtein distance / words of the longer side over pairs of at least
  ``edit_distance_min_words`` words (bare answers are all span), ``span_word_share`` = share of
  the response words (both sides) that overlap a marked span (the judge stage's
  ``span_word_share``, over the pairs the trainer reads).
* ``training`` (from ``metrics.jsonl``; each row is a window mean): ``accuracy_saturation`` =
  share of the last ``tail_fraction`` of rows with rewards/accuracy >= ``saturation_accuracy``,
  final KL (forward, reverse) and its growth (final - first row), ``grad_norm_ratio`` = mean
  grad norm of the last rows / of the first rows, the reward margin's first, final and slope.
* ``by_round``: headline numbers of this round and of every earlier round of the lineage,
  read from the previous policy folder's ``health.json`` (round k-1's train folder).

The files hold no thresholds and no flags, so changing a threshold never changes a content
digest downstream; the flags go to the stage's counts (the manifest) and the warning lines.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fire_mpo_core.data.records import PreferencePair
from fire_mpo_core.store import read_jsonl
from fire_mpo_core.training.config import HealthConfig
from fire_mpo_core.training.job import METRICS_FILE

__all__ = [
    "CHECKS",
    "HEALTH_FILE",
    "HEALTH_KIND",
    "Flag",
    "HealthCheckFailed",
    "RoundHealth",
    "check",
    "pair_diagnostics",
    "read_health",
    "read_train_log",
    "training_diagnostics",
    "word_edit_distance",
]

HEALTH_FILE = "health.json"
HEALTH_KIND = "health"  # the "kind" of the health record in metrics.jsonl (step rows have none)
_WORD = re.compile(r"\S+")
Number = float | int | None

# --------------------------------------------------------------------------- pairs


def word_edit_distance(a: Sequence[str], b: Sequence[str]) -> int:
    """Levenshtein distance between two word sequences (insert, delete, substitute: 1 each).
    The common prefix and suffix are dropped first: a minimal edit leaves a tiny middle."""
    i = 0
    while i < min(len(a), len(b)) and a[i] == b[i]:
        i += 1
    j = 0
    while j < min(len(a), len(b)) - i and a[-1 - j] == b[-1 - j]:
        j += 1
    a, b = a[i : len(a) - j], b[i : len(b) - j]
    row = list(range(len(b) + 1))
    for x, wa in enumerate(a, start=1):
        prev, row[0] = row[0], x
        for y, wb in enumerate(b, start=1):
            prev, row[y] = row[y], min(row[y] + 1, row[y - 1] + 1, prev + (wa != wb))
    return row[-1]


def _span_words(text: str, spans: Sequence[tuple[int, int]]) -> tuple[list[str], int]:
    """(words of `text`, how many overlap a span)."""
    found = [(m.group(), m.start(), m.end()) for m in _WORD.finditer(text)]
    inside = sum(1 for _, a, b in found if any(a < e and s < b for s, e in spans))
    return [w for w, _, _ in found], inside


def _mean(values: Sequence[float]) -> float | None:
    return round(sum(values) / len(values), 4) if values else None


def pair_diagnostics(pairs: Iterable[PreferencePair], min_words: int = 4) -> dict[str, Number]:
    """Length gap, chosen-longer share, edit distance and span word share of ``pairs``."""
    gaps, dists, raw = [], [], []
    inside = total = 0
    for p in pairs:
        c, ci = _span_words(p.chosen, p.chosen_spans)
        r, ri = _span_words(p.rejected, p.rejected_spans)
        gaps.append(len(c) - len(r))
        d = word_edit_distance(c, r)
        raw.append(d)
        if max(len(c), len(r)) >= min_words:
            dists.append(d / max(len(c), len(r)))
        inside, total = inside + ci + ri, total + len(c) + len(r)
    return {
        "pairs": len(gaps),
        "length_gap_words": _mean(gaps),
        "chosen_longer_share": _mean([float(g > 0) for g in gaps]),
        "edit_distance": _mean(dists),
        "edit_distance_pairs": len(dists),
        "edit_distance_words": _mean(raw),
        "span_word_share": round(inside / total, 4) if total else None,
    }


# --------------------------------------------------------------------------- training log


def read_train_log(train_dir: Path) -> list[dict[str, Any]]:
    """The per-step rows of a train folder's metrics.jsonl (records with a "kind", such as the
    health record, left out); a missing file gives []."""
    path = Path(train_dir) / METRICS_FILE
    if not path.is_file():
        return []
    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    return [r for r in rows if "kind" not in r and "step" in r]


def _series(rows: Sequence[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    return [(r["step"], float(r[key])) for r in rows if isinstance(r.get(key), int | float)]


def _slope(points: Sequence[tuple[int, float]]) -> float | None:
    """Least-squares slope of value against step (None below two distinct steps)."""
    if len({s for s, _ in points}) < 2:
        return None
    ms = sum(s for s, _ in points) / len(points)
    mv = sum(v for _, v in points) / len(points)
    num = sum((s - ms) * (v - mv) for s, v in points)
    return num / sum((s - ms) ** 2 for s, _ in points)


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 6)


def training_diagnostics(
    rows: Sequence[dict[str, Any]], tail_fraction: float = 0.25, saturation_accuracy: float = 0.99
) -> dict[str, Number]:
    """Saturation, KL, grad-norm collapse and margin trend of a run's logged rows."""
    k = max(1, math.ceil(tail_fraction * len(rows)))
    acc = _series(rows, "rewards/accuracy")
    grad = [v for _, v in _series(rows, "grad_norm")]
    margin = _series(rows, "rewards/margin")
    out: dict[str, Number] = {
        "logged_steps": len(rows),
        "final_step": rows[-1]["step"] if rows else None,
        "reward_accuracy_final": acc[-1][1] if acc else None,
        "accuracy_saturation": _mean([float(v >= saturation_accuracy) for _, v in acc[-k:]]),
        "reward_margin_first": margin[0][1] if margin else None,
        "reward_margin_final": margin[-1][1] if margin else None,
        "reward_margin_slope": _round(_slope(margin)),
    }
    for name in ("forward", "reverse"):
        kl = _series(rows, f"kl/{name}")
        out[f"kl_{name}_final"] = kl[-1][1] if kl else None
        out[f"kl_{name}_growth"] = _round(kl[-1][1] - kl[0][1]) if kl else None
    early, late = grad[:k], grad[-k:]
    out["grad_norm_early"] = _round(sum(early) / len(early)) if early else None
    out["grad_norm_late"] = _round(sum(late) / len(late)) if late else None
    ratio = sum(late) / sum(early) if early and sum(early) > 0 else None
    out["grad_norm_ratio"] = _round(ratio)
    return out


# --------------------------------------------------------------------------- checks


@dataclass(frozen=True)
class Check:
    """One threshold: diagnostic ``section.key`` against ``HealthConfig.<field>``."""

    name: str
    section: str  # "pairs" or "training"
    key: str
    field: str
    upper: bool  # True: flagged above the threshold; False: below
    meaning: Callable[[float, float, HealthConfig], str]
    trend: bool = False  # needs HealthConfig.min_logged_steps rows to mean anything


def _gap(v: float, t: float, _: HealthConfig) -> str:
    side = "longer" if v > 0 else "shorter"
    return (
        f"chosen answers are {abs(v):.1f} words {side} than rejected (threshold {t:.1f}): the "
        "judge or the data may be teaching length, not correctness"
    )


CHECKS: tuple[Check, ...] = (
    Check("length_gap", "pairs", "length_gap_words", "max_length_gap_words", True, _gap),
    Check(
        "chosen_longer",
        "pairs",
        "chosen_longer_share",
        "max_chosen_longer_share",
        True,
        lambda v, t, _: (
            f"the chosen answer is the longer one in {v:.0%} of pairs (threshold "
            f"{t:.0%}): the pairs reward saying more"
        ),
    ),
    Check(
        "edit_distance",
        "pairs",
        "edit_distance",
        "max_edit_distance",
        True,
        lambda v, t, _: (
            f"chosen and rejected differ in {v:.2f} of their words (threshold "
            f"{t:.2f}): the pairs are rewrites, not minimal edits; style is learned with the facts"
        ),
    ),
    Check(
        "span_share",
        "pairs",
        "span_word_share",
        "max_span_word_share",
        True,
        lambda v, t, _: (
            f"{v:.0%} of the response words lie in the marked spans (threshold "
            f"{t:.0%}): the span losses act as sequence-level DPO and no longer localise the error"
        ),
    ),
    Check(
        "accuracy_saturation",
        "training",
        "accuracy_saturation",
        "max_accuracy_saturation",
        True,
        lambda v, t, c: (
            f"reward accuracy is >= {c.saturation_accuracy:g} in {v:.0%} of the last "
            f"logged steps (threshold {t:.0%}): the pairs are separated for good and the margins "
            "now grow on whatever separates them cheapest (often length or style)"
        ),
        trend=True,
    ),
    *(
        Check(
            f"kl_{d}",
            "training",
            f"kl_{d}_final",
            "max_kl",
            True,
            lambda v, t, _, d=d: (
                f"final kl/{d} is {v:.3g} (threshold {t:g}): the policy has "
                "drifted far from the reference on the KL positions; raise loss.alpha or lower lr"
            ),
        )
        for d in ("forward", "reverse")
    ),
    Check(
        "grad_norm_collapse",
        "training",
        "grad_norm_ratio",
        "min_grad_norm_ratio",
        False,
        lambda v, t, _: (
            f"the late grad norm is {v:.3g} of the early one (threshold {t:g}): the "
            "loss is saturated and training has stopped learning"
        ),
        trend=True,
    ),
)


@dataclass(frozen=True)
class Flag:
    """A crossed threshold: which check, the value, the threshold and the one-line message."""

    name: str
    value: float
    threshold: float
    message: str


def check(diagnostics: dict[str, dict[str, Number]], cfg: HealthConfig) -> list[Flag]:
    """The flags of ``{"pairs": ..., "training": ...}`` under ``cfg`` (sections may be absent);
    the length gap is compared by its size, whichever side is longer; trend checks wait for
    ``cfg.min_logged_steps`` logged rows."""
    flags = []
    logged = diagnostics.get("training", {}).get("logged_steps") or 0
    for c in CHECKS:
        value = diagnostics.get(c.section, {}).get(c.key)
        threshold = getattr(cfg, c.field)
        if value is None or threshold is None or (c.trend and logged < cfg.min_logged_steps):
            continue
        size = abs(value) if c.key == "length_gap_words" else value
        if (size > threshold) if c.upper else (size < threshold):
            flags.append(Flag(c.name, float(value), threshold, c.meaning(value, threshold, cfg)))
    return flags


class HealthCheckFailed(ValueError):
    """A health threshold was crossed with ``train.health.fail`` set: the message says which."""


# --------------------------------------------------------------------------- files


def read_health(stage_dir: Path | None) -> dict[str, Any] | None:
    """A folder's health.json, or None where there is none (the SFT base, an older run)."""
    path = Path(stage_dir) / HEALTH_FILE if stage_dir is not None else None
    return json.loads(path.read_text()) if path is not None and path.is_file() else None


#: The per-round numbers carried forward into later rounds' `by_round`.
BY_ROUND = {
    "pairs": ("length_gap_words", "chosen_longer_share", "edit_distance", "span_word_share"),
    "training": (
        "reward_accuracy_final",
        "accuracy_saturation",
        "kl_forward_final",
        "kl_reverse_final",
        "grad_norm_ratio",
    ),
}


class RoundHealth:
    """The health of one train stage run (module docstring): pair checks before training,
    training checks and the files after. ``warn`` gets one line per crossed threshold."""

    def __init__(
        self,
        cfg: HealthConfig,
        round_: int,
        previous: Path | None = None,
        warn: Callable[[str], None] = print,
    ):
        self.cfg, self.round, self.warn = cfg, round_, warn
        self.previous = read_health(previous)
        self.values: dict[str, dict[str, Number]] = {}
        self.flags: list[Flag] = []

    def check_pairs(self, pairs_path: Path) -> dict[str, Number]:
        """Pair diagnostics of the round's pairs file; warns, or raises before any training."""
        pairs = read_jsonl(pairs_path, PreferencePair, on_reject=lambda *_: None)
        self.values["pairs"] = pair_diagnostics(pairs, self.cfg.edit_distance_min_words)
        self._raise_or_warn(check({"pairs": self.values["pairs"]}, self.cfg))
        return self.values["pairs"]

    def finish(self, train_dir: Path) -> dict[str, Any]:
        """Training diagnostics from ``train_dir``'s log; writes health.json and the log's
        health record, warns or raises, and returns the counts for the stage's manifest."""
        cfg = self.cfg
        rows = read_train_log(train_dir)
        self.values["training"] = training_diagnostics(
            rows, cfg.tail_fraction, cfg.saturation_accuracy
        )
        record = {"round": self.round, **self.values, "by_round": self._by_round()}
        (Path(train_dir) / HEALTH_FILE).write_text(json.dumps(record, indent=2) + "\n")
        step = rows[-1]["step"] if rows else 0
        log = Path(train_dir) / METRICS_FILE
        lines = [ln for ln in log.read_text().splitlines() if ln.strip()] if log.is_file() else []
        # A retried stage may find its own earlier record: one health record, always last.
        kept = [ln for ln in lines if json.loads(ln).get("kind") != HEALTH_KIND]
        health_line = {"kind": HEALTH_KIND, "step": step, "round": self.round, **self.values}
        kept.append(json.dumps(health_line, sort_keys=True))
        log.write_text("".join(ln + "\n" for ln in kept))  # step rows untouched, record last
        self._raise_or_warn(check({"training": self.values["training"]}, cfg))
        return self.counts()

    def counts(self) -> dict[str, Any]:
        """Headline diagnostics and the flags, for the stage table on the dashboard."""
        out: dict[str, Any] = {f"health/{k}": v for k, v in self._headline().items()}
        out["health/warnings"] = len(self.flags)
        out["health/flagged"] = ", ".join(f.name for f in self.flags)
        return out

    def _headline(self) -> dict[str, Number]:
        return {
            key: self.values.get(section, {}).get(key)
            for section, keys in BY_ROUND.items()
            for key in keys
        }

    def _by_round(self) -> list[dict[str, Any]]:
        earlier = [r for r in (self.previous or {}).get("by_round", []) if r["round"] < self.round]
        return [*earlier, {"round": self.round, **self._headline()}]

    def _raise_or_warn(self, flags: list[Flag]) -> None:
        self.flags += flags
        lines = [f"round {self.round} health: {f.message}" for f in flags]
        if lines and self.cfg.fail:
            raise HealthCheckFailed("; ".join(lines) + " (train.health.fail is set)")
        for line in lines:
            self.warn(line)
