"""Test helper (not product code): hand-made stage inputs for the stage-body tests: PNG scans,
raw record lines, a finished `prepare`-like dataset folder, rollouts, and the LLM judge's replies.

    prep = dataset(store, [record_line("rec-0")], {"images/rec-0.png": png()})
    policy = finished(store, "policy", lambda p: (p / "policy.json").write_text("{}"))
    res = run_body(store, "judge", tasks.judge.body, {"judge": {...}}, {"prepare": prep, ...})
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fire_mpo_core.data.records import Rollout, VQARecord
from fire_mpo_core.store import ArtifactStore, StageResult


def png(size=(16, 16), mode="RGB", seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, format="PNG")
    return buf.getvalue()


def record(rid: str, **kw: Any) -> dict[str, Any]:
    return {
        "id": rid,
        "image": f"images/{rid}.png",
        "question": "Is there a lesion?",
        "answer": "yes",
        "answer_type": "closed",
        "question_type": "presence",
        "split": "train",
        **kw,
    }


GOOD = ["good-0", "good-1"]


def record_line(rid: str, **kw: Any) -> bytes:
    return json.dumps(record(rid, **kw)).encode()


def finished(store: ArtifactStore, stage: str, build: Callable[[Path], None]) -> Path:
    """A finished stage folder whose files `build(folder)` writes."""

    def fn(w):
        build(w.path)
        return {}

    return store.run_stage(
        run="r", round_=0, stage=stage, config={"fixture": stage}, inputs={}, code="t", fn=fn
    ).path


def dataset(store: ArtifactStore, lines: list[bytes], files: dict[str, bytes]) -> Path:
    """A `prepare`-like folder: data.jsonl from raw lines, files, and images of GOOD records."""

    def build(root: Path) -> None:
        (root / "images").mkdir()
        for rid in GOOD:
            (root / "images" / f"{rid}.png").write_bytes(png(seed=len(rid)))
        for rel, data in files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_bytes(data)
        good = [json.dumps(record(rid)).encode() for rid in GOOD]
        (root / "data.jsonl").write_bytes(b"\n".join(good + lines) + b"\n")

    return finished(store, "prepare", build)


RESPONSE = "The lesion is in the right lung."


def judge_reply(verdict: str, edited: str, changes: list[tuple[str, str]]) -> str:
    return json.dumps(
        {
            "verdict": verdict,
            "edited_response": edited,
            "changes": [{"original": o, "edited": e} for o, e in changes],
        }
    )


GOOD_REPLY = judge_reply("incorrect", "The lesion is in the left lung.", [("right", "left")])


def rollout(
    record_id: str,
    response: str,
    *,
    k: int = 0,
    sample_index: int | None = None,
    question: str = "q",
    model_key: str = "m",
) -> Rollout:
    """Sample ``k`` of a record (id ``<record_id>#<k>``; ``sample_index`` defaults to ``k``), as
    the hf engine would write it."""
    return Rollout(
        id=f"{record_id}#{k}",
        record_id=record_id,
        sample_index=k if sample_index is None else sample_index,
        question=question,
        response=response,
        engine="hf",
        model_key=model_key,
        seed=0,
    )


def wrong_answers(records: Sequence[VQARecord]) -> list[list[str]]:
    """Per record (in order), the answers of the other records of its question type that differ
    from its own (repeats kept): wrong answers a policy could give."""
    by_type: dict[str, list[str]] = {}
    for r in records:
        by_type.setdefault(r.question_type, []).append(r.answer)
    return [[a for a in by_type[r.question_type] if a != r.answer] for r in records]


def run_body(
    store: ArtifactStore,
    stage: str,
    body: Callable,
    config: dict[str, Any],
    inputs: dict[str, Path],
    *,
    resumable: bool = False,
    **kw: Any,
) -> StageResult:
    """Run a stage task's ``body`` on ``store`` the way its Prefect task does
    (tasks.common.stage_task: the store's run_stage, ``max_reject_fraction`` from the config),
    without Prefect: run "r", round 1, code version "t"."""
    from tasks.common import StageCall  # tasks sit above the core this module otherwise uses

    call = StageCall(store=store.root, run="r", round=1, stage=stage, config=config, inputs=inputs)
    kw.setdefault("max_reject_fraction", config.get("max_reject_fraction"))
    return store.run_stage(
        run="r", round_=1, stage=stage, config=config, inputs=inputs, code="t",
        fn=lambda w: body(call, w), resumable=resumable, **kw,
    )  # fmt: skip
