"""A judge stage's resume journal: every judged rollout, appended as soon as it is judged.

    journal = JudgeJournal(work_dir / "judged.journal.jsonl")
    done = journal.load()                  # rollout id -> PreferencePair | Rejection
    journal.append(pairs + rejections)     # flushed and fsync'ed
    writer.scratch.append(journal.path)    # the store deletes it once the stage succeeded

An LLM judge costs a request per rollout; after a crash or a retry, the stage reads the journal
of its (resumable) working folder and judges only the rollouts not in it. A line torn by a
crash mid-write is ignored (that rollout is judged again). Rejections with code
``endpoint_error`` (the endpoint failed, not the answer) are not journaled: a rerun asks again.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from pydantic import ValidationError

from fire_mpo_core.data.records import PreferencePair
from fire_mpo_core.judge.base import JudgeResult, Rejection

TRANSIENT = "endpoint_error"


def _kind(r: JudgeResult) -> str:
    return "pair" if isinstance(r, PreferencePair) else "rejection"


class JudgeJournal:
    def __init__(self, path: Path):
        self.path = Path(path)

    def load(self) -> dict[str, JudgeResult]:
        """The rollouts judged so far (by rollout id); empty if there is no journal."""
        out: dict[str, JudgeResult] = {}
        if not self.path.is_file():
            return out
        for line in self.path.read_bytes().splitlines():
            try:
                row = json.loads(line)
                kind = row.pop("kind")
                res = (PreferencePair if kind == "pair" else Rejection).model_validate(row)
            except (ValueError, KeyError, ValidationError):
                continue  # a torn last line: judged again
            out[res.id] = res
        return out

    def append(self, results: Iterable[JudgeResult]) -> None:
        lines = [
            json.dumps({"kind": _kind(r), **r.model_dump()}, ensure_ascii=False, sort_keys=True)
            for r in results
            if not (isinstance(r, Rejection) and r.code == TRANSIENT)
        ]
        if not lines:
            return
        with self.path.open("a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
            f.flush()
            os.fsync(f.fileno())
