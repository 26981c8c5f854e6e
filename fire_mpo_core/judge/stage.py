"""The `judge` stage's contract and its one entry point, :func:`run_judge`.

Inputs: the `prepare` folder (records: references, answer vocabulary) and the `sample` folder
(rollouts). Output: ``data.jsonl`` of :class:`PreferencePair` in rollout order; every rollout
that gives no pair goes to ``reject(id, "<code>: <reason>")``::

    from fire_mpo_core.judge.stage import JudgeInputs, run_judge
    counts = run_judge(JudgeInputs(prepare=..., sample=...), JudgeConfig(), out_dir,
                       reject=lambda id, reason: print(id, reason), scratch=[])

Resumable: judged rollouts go to a journal in ``out_dir`` as they are judged (its path is added
to ``scratch``, for the store to delete once the stage succeeds), so a retried or restarted
stage does not ask an LLM judge again for what it already answered; those rollouts are the
stage's ``llm_cache_hits``. Endpoint failures (``endpoint_error``) are rejects of this attempt
but stay out of the journal: a rerun asks again.

The Prefect task (`tasks/judge.py`) only resolves the folders, passes its sharded runner as
``judge_all`` when ``judge.shards > 1``, and publishes the counts.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from fire_mpo_core.data.io import load_records
from fire_mpo_core.data.records import PreferencePair, Rollout, VQARecord
from fire_mpo_core.judge import JUDGES, build_judge
from fire_mpo_core.judge.base import Judged, JudgeResult, Rejection, judge_rollouts, judge_usage
from fire_mpo_core.judge.config import JudgeConfig
from fire_mpo_core.judge.journal import TRANSIENT, JudgeJournal
from fire_mpo_core.judge.stats import pair_statistics
from fire_mpo_core.openai_client import LLMUsage, estimate_cost
from fire_mpo_core.store import DATA, read_jsonl, write_jsonl

JOURNAL = "judged.journal.jsonl"  # in the working folder; removed once the stage succeeds
JOURNAL_EVERY = 16  # rollouts judged between journal writes (one fsync each)

Reject = Callable[[str, str], None]
Progress = Callable[[int, int], None]
#: ``judge_all(config, records, rollouts)``: judges every rollout given, e.g. over shards.
JudgeAll = Callable[[JudgeConfig, list[VQARecord], list[Rollout]], Judged]


class JudgeInputs(BaseModel):
    """The folders the stage reads."""

    model_config = ConfigDict(frozen=True)

    prepare: Path = Field(description="The dataset root: records with references.")
    sample: Path = Field(description="The sample stage folder: its data.jsonl of rollouts.")


class JudgeCounts(BaseModel):
    """What the stage reports (manifest counts, dashboard table)."""

    rollouts: int = Field(description="Rollouts read.")
    pairs: int = Field(description="Pairs written.")
    incorrect: int = Field(description="Pairs from a wrong answer (y- = the sample).")
    correct: int = Field(description="Pairs from a right answer (y+ = the sample).")
    statistics: dict[str, float | int | None] = Field(
        description="Span coverage and visual eligibility (judge.stats.pair_statistics)."
    )
    rejected: dict[str, int] = Field(description="Rejected rollouts per reject code.")
    llm: LLMUsage | None = Field(
        default=None, description="The endpoint's usage by this attempt; None: no endpoint."
    )
    llm_cache_hits: int = Field(
        default=0, description="Rollouts taken from the resume journal, not asked again."
    )
    llm_cost_usd: float | None = Field(
        default=None, description="Estimated cost of `llm` (None: no prices configured)."
    )

    def as_counts(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "rollouts": self.rollouts,
            "pairs": self.pairs,
            "pair_rate": round(self.pairs / max(1, self.rollouts), 4),
            "incorrect": self.incorrect,
            "correct": self.correct,
            **self.statistics,
            **{f"rejected_{code}": n for code, n in sorted(self.rejected.items())},
        }
        if self.llm is not None:  # an offline judge's table stays free of llm_* zeros
            out |= {**self.llm.as_counts(self.llm_cost_usd), "llm_cache_hits": self.llm_cache_hits}
        return out


def _judge_in_chunks(
    cfg: JudgeConfig,
    records: list[VQARecord],
    todo: list[Rollout],
    journal: JudgeJournal,
    on_progress: Callable[[int], None] | None,
) -> Judged:
    """Judge ``todo`` in this process, journaling every ``JOURNAL_EVERY`` rollouts (a crash
    loses at most that many answers)."""
    out = Judged()
    if not todo:
        return out
    judge = build_judge(cfg, records)
    for i in range(0, len(todo), JOURNAL_EVERY):
        pairs, rejections = judge_rollouts(judge, records, todo[i : i + JOURNAL_EVERY])
        journal.append([*pairs, *rejections])
        out.pairs += pairs
        out.rejections += rejections
        if on_progress is not None:
            on_progress(len(out.pairs) + len(out.rejections))
    out.usage = judge_usage(judge)
    return out


def _write(
    rollouts: Sequence[Rollout], results: dict[str, JudgeResult], out_dir: Path, reject: Reject
) -> tuple[list[PreferencePair], list[Rejection]]:
    """``data.jsonl`` and the rejects, in rollout order whatever order the (partial) runs judged
    them in: the output is identical."""
    ordered = [results[ro.id] for ro in rollouts if ro.id in results]
    pairs = [r for r in ordered if isinstance(r, PreferencePair)]
    rejections = [r for r in ordered if isinstance(r, Rejection)]
    for r in rejections:
        reject(r.id, f"{r.code}: {r.reason}")
    write_jsonl(out_dir / DATA, pairs)
    return pairs, rejections


def run_judge(
    inputs: JudgeInputs,
    cfg: JudgeConfig,
    out_dir: Path,
    reject: Reject,
    scratch: list[Path],
    judge_all: JudgeAll | None = None,
    on_progress: Progress | None = None,
) -> JudgeCounts:
    """Judge every rollout of ``inputs`` into ``out_dir`` (see the module docstring).
    ``judge_all`` judges the rollouts the journal lacks in one call (the task's shards); by
    default they are judged here in journaled chunks. ``on_progress(done, total)``."""
    records = load_records(inputs.prepare, on_reject=reject)
    rollouts = list(read_jsonl(inputs.sample / DATA, Rollout, reject))
    journal = JudgeJournal(out_dir / JOURNAL)
    scratch.append(journal.path)  # deleted once the stage succeeds; kept for a rerun if not
    done = journal.load()
    todo = [ro for ro in rollouts if ro.id not in done]
    hits = len(rollouts) - len(todo)
    if judge_all is not None:
        new = judge_all(cfg, records, todo)
        journal.append([*new.pairs, *new.rejections])
    else:
        step = None if on_progress is None else lambda n: on_progress(hits + n, len(rollouts))
        new = _judge_in_chunks(cfg, records, todo, journal, step)
    transient = {r.id: r for r in new.rejections if r.code == TRANSIENT}
    pairs, rejections = _write(rollouts, {**journal.load(), **transient}, out_dir, reject)
    verdicts = Counter(p.verdict for p in pairs)
    metered = getattr(JUDGES.get(cfg.name), "uses_endpoint", False)
    usage = (new.usage or LLMUsage()) if metered else None
    return JudgeCounts(
        rollouts=len(rollouts),
        pairs=len(pairs),
        incorrect=verdicts["incorrect"],
        correct=verdicts["correct"],
        statistics=pair_statistics(pairs),
        rejected=dict(Counter(r.code for r in rejections)),
        llm=usage,
        llm_cache_hits=hits,
        llm_cost_usd=estimate_cost(usage, cfg.llm.endpoint) if usage and cfg.llm else None,
    )
