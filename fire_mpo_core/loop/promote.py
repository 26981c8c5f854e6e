"""The best round, promoted: a stable pointer ``<store>/<run>/best`` to its `train` folder.

    from fire_mpo_core.loop.promote import Candidate, promote
    cand = Candidate.from_evaluation(round_=2, train_dir=t2, evaluate_dir=e2,
                                     metric="grounded_accuracy")
    p = promote(store, run, cand)     # Promotion: action, round, value, reason, card

Files, per run:

    <store>/<run>/best       symlink to round-<k>/train/<key> (relative: the store can move);
                             replaced atomically (a temporary link, then os.replace)
    <store>/<run>/best.json  round, metric, value, train / evaluate folders (relative to the
                             store), train key, promoted_at
    <train>/adapter/README.md  the model card (fire_mpo_core.loop.card), rewritten at each
                             promotion; left out of content digests, so no key moves

Rule (the same as :func:`fire_mpo_core.loop.decide.decide`'s best round): a candidate
replaces the recorded best only when its validation value is strictly higher, so a worse
round, a rerun of an older round or a ``--stages`` run never moves the pointer backwards; the
returned reason says why it stayed. Explicit cases: the same train folder re-evaluated to
another value updates the record in place (same adapter, newer measurement; other rounds are
not re-ranked); a recorded folder that no longer exists, or a record of another metric, is
replaced by the candidate.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from fire_mpo_core.loop.card import CARD, CARD_TITLE, model_card
from fire_mpo_core.store import is_finished, read_manifest

BEST = "best"
BEST_JSON = "best.json"
SELECTION_METRICS_FILE = "val_metrics.json"


class Candidate(BaseModel):
    """A round offered for promotion: its train folder and its validation value."""

    model_config = ConfigDict(frozen=True)

    round: int = Field(ge=1, description="Alignment round (round 0, the SFT base, has no adapter).")
    train_dir: Path = Field(description="The round's finished `train` folder (adapter/).")
    evaluate_dir: Path = Field(description="The round's finished `evaluate` folder.")
    metric: str = Field(description="The loop's headline validation metric.")
    value: float | None = Field(description="Its validation value (None: not measured).")

    @classmethod
    def from_evaluation(
        cls, round_: int, train_dir: Path, evaluate_dir: Path, metric: str
    ) -> Candidate:
        """The candidate with its value read from ``evaluate_dir/val_metrics.json``."""
        path = Path(evaluate_dir) / SELECTION_METRICS_FILE
        value = json.loads(path.read_text()).get(metric) if path.is_file() else None
        return cls(
            round=round_,
            train_dir=Path(train_dir),
            evaluate_dir=Path(evaluate_dir),
            metric=metric,
            value=value,
        )


class BestRecord(BaseModel):
    """``best.json``: which round the pointer names and by what value."""

    round: int
    metric: str
    value: float
    train: str = Field(description="The train folder, relative to the store root.")
    evaluate: str = Field(description="The evaluate folder, relative to the store root.")
    key: str = Field(description="The train folder's store key.")
    promoted_at: float = Field(description="Unix time of the promotion.")


class Promotion(BaseModel):
    """What :func:`promote` did: the best after the call, and why."""

    action: Literal["promoted", "updated", "kept"] = Field(
        description="promoted: the candidate is the new best; updated: the same adapter's "
        "record follows a new evaluation; kept: the recorded best stays."
    )
    round: int | None = Field(description="The best round after the call (None: none yet).")
    metric: str
    value: float | None = Field(description="The best round's value.")
    train: str | None = Field(description="The best train folder, relative to the store.")
    card: str | None = Field(description="Path of the best adapter's model card.")
    reason: str = Field(description="One sentence: why it moved or stayed.")


def _rel(path: Path, root: Path) -> str:
    return Path(path).resolve().relative_to(root).as_posix()


def read_best(store: Path, run: str) -> BestRecord | None:
    """The run's ``best.json``, or None before the first promotion."""
    path = Path(store) / run / BEST_JSON
    return BestRecord.model_validate_json(path.read_text()) if path.is_file() else None


def _verdict(cand: Candidate, rec: BestRecord | None, store: Path) -> tuple[str, str]:
    """(action, reason) of the promotion rule in the module docstring."""
    m, v = cand.metric, cand.value
    if v is None:
        return "kept", f"round {cand.round} has no validation {m}: the best is unchanged"
    if rec is None:
        return "promoted", f"round {cand.round} ({m} {v:.4g}) is the first promoted round"
    if rec.metric != m:
        return "promoted", f"metric changed from {rec.metric} to {m}: round {cand.round} restarts"
    if not is_finished(store / rec.train):
        return "promoted", f"the recorded best {rec.train} is gone: round {cand.round} replaces it"
    if _rel(cand.train_dir, store) == rec.train:
        if v == rec.value:
            return "kept", f"round {cand.round} is already the best ({m} {v:.4g})"
        return "updated", (
            f"round {cand.round} re-evaluated: {m} {rec.value:.4g} -> {v:.4g} on the same "
            "adapter; the record follows (other rounds are not re-ranked)"
        )
    again = " (recomputed in a new train folder)" if cand.round == rec.round else ""
    if v > rec.value:
        return "promoted", (
            f"round {cand.round}{again} ({m} {v:.4g}) beats round {rec.round} ({rec.value:.4g})"
        )
    return "kept", (
        f"round {rec.round} stays best ({m} {rec.value:.4g} >= {v:.4g} of round "
        f"{cand.round}{again}); the pointer never moves backwards"
    )


def _link(store: Path, run: str, train_dir: Path) -> None:
    """Point ``<store>/<run>/best`` at ``train_dir`` atomically, by a relative link."""
    run_dir = store / run
    tmp = run_dir / f".{BEST}.{uuid.uuid4().hex[:8]}"
    os.symlink(os.path.relpath(Path(train_dir).resolve(), run_dir), tmp)
    os.replace(tmp, run_dir / BEST)


def _write_json(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_text(text)
    os.replace(tmp, path)


def promote(store: str | Path, run: str, candidate: Candidate) -> Promotion:
    """Offer ``candidate`` for ``<store>/<run>/best`` (rule and files: module docstring)."""
    store = Path(store).resolve()
    rec = read_best(store, run)
    action, reason = _verdict(candidate, rec, store)
    if action != "kept":
        rec = BestRecord(
            round=candidate.round,
            metric=candidate.metric,
            value=candidate.value,
            train=_rel(candidate.train_dir, store),
            evaluate=_rel(candidate.evaluate_dir, store),
            key=read_manifest(candidate.train_dir)["key"],
            promoted_at=time.time(),
        )
        _link(store, run, candidate.train_dir)
        _write_json(store / run / BEST_JSON, rec.model_dump_json(indent=2) + "\n")
    card = None
    if rec is not None and is_finished(store / rec.train):
        card_path = store / rec.train / "adapter" / CARD
        # Rewritten on a change, or when the adapter's README is not ours (peft writes its own
        # card whenever a train folder of that key is rebuilt).
        ours = card_path.is_file() and CARD_TITLE in card_path.read_text()
        if action != "kept" or not ours:
            text = model_card(store / rec.train, store / rec.evaluate, rec.round, rec.metric, run)
            _write_json(card_path, text)
        card = str(card_path)
    return Promotion(
        action=action,
        round=None if rec is None else rec.round,
        metric=candidate.metric,
        value=None if rec is None else rec.value,
        train=None if rec is None else rec.train,
        card=card,
        reason=reason,
    )
