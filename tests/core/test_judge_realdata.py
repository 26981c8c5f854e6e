"""The rules judge on real SLAKE, VQA-RAD and IU X-Ray annotations with synthetic responses.

The records are real (converted by :mod:`fire_mpo_core.data.converters`); the model responses
are made here: the right answer, or a wrong answer drawn from the same dataset's answers to the
same question type (listing as many items), bare or embedded in a sentence. Reports: the real
report, or the report with one finding word changed. Per dataset and answer type we print the
pair rate and the verdict accuracy, and check that every emitted pair passes the validator.
Run with ``-s`` to see the rates. Skips when the real data folder is absent.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections import Counter
from pathlib import Path

import pytest

from fire_mpo_core.clinical.lexicon import content_keys, split_parts
from fire_mpo_core.data.converters import iuxray_records, slake_records, vqarad_records
from fire_mpo_core.data.records import PreferencePair, VQARecord
from fire_mpo_core.judge import JudgeConfig, RulesJudge, validate_pair
from testing_support import REPO
from testing_support.stage_inputs import rollout

REALDATA = Path(os.environ.get("FIRE_MPO_REALDATA", REPO.parent / "shared" / "realdata"))
TEMPLATES = (
    "{}",
    "{}.",
    "The answer is {}.",
    "I think it is {}.",
    "Based on the image, the answer is {}.",
)


@pytest.fixture(scope="module")
def data() -> Path:
    if not (REALDATA / "slake").is_dir() or not (REALDATA / "vqarad").is_dir():
        pytest.skip(f"real data not found at {REALDATA} (set FIRE_MPO_REALDATA)")
    return REALDATA


def _load(path: Path):
    return json.loads(path.read_text(encoding="utf-8"))


def _responses(recs: list[VQARecord], seed: int = 0) -> list[tuple[VQARecord, str, bool]]:
    """(record, response, is_right): even records answered right, odd ones wrong when a wrong
    answer of the same question type (and item count) exists."""
    rng = random.Random(seed)
    vocab: dict[tuple[str, str], set[str]] = {}
    for r in recs:
        vocab.setdefault((r.answer_type, r.question_type), set()).add(r.answer)
    out = []
    for k, r in enumerate(recs):
        keys = content_keys(r.answer)
        if k % 2 == 0:
            ans, right = r.answer, True
        elif keys in {("yes",), ("no",)}:
            ans, right = ("no" if keys == ("yes",) else "yes"), False
        else:
            n = len(split_parts(r.answer))
            alts = sorted(
                a
                for a in vocab[(r.answer_type, r.question_type)]
                if set(content_keys(a)) != set(keys)
                and not set(keys) <= set(content_keys(a))
                and len(split_parts(a)) == n
            )
            if not alts:
                continue
            ans, right = rng.choice(alts), False
        out.append((r, rng.choice(TEMPLATES).format(ans), right))
    return out


def _run(recs: list[VQARecord], cases, label: str) -> dict[str, Counter]:
    judge = RulesJudge(JudgeConfig(), recs)
    stats: dict[str, Counter] = {}
    for k, (r, resp, right) in enumerate(cases):
        ro = rollout(r.id, resp, k=k, sample_index=0, question=r.question, model_key="synthetic")
        res = judge.judge(r, ro)
        st = stats.setdefault(r.answer_type, Counter())
        st["rollouts"] += 1
        if isinstance(res, PreferencePair):
            assert validate_pair(res, resp, judge.config) is None
            st["pairs"] += 1
            st["verdict_ok"] += res.verdict == ("correct" if right else "incorrect")
        else:
            assert res.code != "invalid_pair", res
            st[res.code] += 1
    for at, st in sorted(stats.items()):
        rate = st["pairs"] / st["rollouts"]
        acc = st["verdict_ok"] / max(1, st["pairs"])
        rest = {k: v for k, v in st.items() if k not in {"rollouts", "pairs", "verdict_ok"}}
        print(
            f"\n{label} {at}: {st['rollouts']} rollouts -> {st['pairs']} pairs ({rate:.1%}), "
            f"verdict accuracy {acc:.1%}; rejected: {rest}"
        )
    return stats


def test_converters_keep_real_quirks(data):
    train = _load(data / "vqarad" / "trainset.json")
    recs = vqarad_records(train, "train")
    assert len(recs) == len(train)
    raw_closed_space = [it for it in train if it["answer_type"] == "CLOSED "]
    raw_int = [it for it in train if isinstance(it["answer"], int)]
    assert raw_closed_space and raw_int  # the quirks are there ...
    by_id = {r.id: r for r in recs}
    for it in raw_closed_space:
        assert by_id[f"vqarad-{it['qid']}"].answer_type == "closed"  # ... and normalised
    for it in raw_int:
        assert by_id[f"vqarad-{it['qid']}"].answer == str(it["answer"])
    slake = slake_records(_load(data / "slake" / "validate.json"), "validate")
    assert slake and all(r.split == "val" and r.dataset == "slake" for r in slake)
    assert {r.answer_type for r in slake} == {"closed", "open"}


def test_judge_on_slake(data):
    recs = slake_records(_load(data / "slake" / "test.json"), "test")
    assert len(recs) > 1000  # English half of the 2,094 test questions
    stats = _run(recs, _responses(recs), "SLAKE test (en)")
    closed, opened = stats["closed"], stats["open"]
    assert closed["pairs"] / closed["rollouts"] >= 0.95
    assert opened["pairs"] / opened["rollouts"] >= 0.85
    assert closed["verdict_ok"] == closed["pairs"]
    assert opened["verdict_ok"] / opened["pairs"] >= 0.97


def test_judge_on_vqarad(data):
    recs = vqarad_records(_load(data / "vqarad" / "testset.json"), "test")
    assert len(recs) == 451
    stats = _run(recs, _responses(recs), "VQA-RAD test")
    closed, opened = stats["closed"], stats["open"]
    assert closed["pairs"] / closed["rollouts"] >= 0.95
    assert opened["pairs"] / opened["rollouts"] >= 0.8
    assert closed["verdict_ok"] == closed["pairs"]
    assert opened["verdict_ok"] / opened["pairs"] >= 0.9


_REPORT_SWAPS = (
    ("left", "right"),
    ("right", "left"),
    ("small", "large"),
    ("large", "small"),
    ("mild", "severe"),
    ("upper", "lower"),
    ("lower", "upper"),
    ("No ", "A "),
)


def _wrong_report(text: str) -> str | None:
    for a, b in _REPORT_SWAPS:
        m = re.search(r"\b" + re.escape(a) + (r"\b" if not a.endswith(" ") else ""), text)
        if m:
            return text[: m.start()] + b + text[m.end() :]
    return None


def test_judge_on_iuxray_reports(data):
    path = data / "iuxray" / "r2gen_iu_xray_annotation_sample.json"
    if not path.is_file():
        pytest.skip(f"IU X-Ray sample not found at {path}")
    recs = iuxray_records(_load(path))
    assert len(recs) == 200
    cases = []
    for k, r in enumerate(recs):
        resp = r.answer if k % 2 == 0 else _wrong_report(r.answer)
        if resp is not None:
            cases.append((r, resp, k % 2 == 0))
    st = _run(recs, cases, "IU X-Ray reports")["report"]
    assert st["pairs"] / st["rollouts"] >= 0.9
    # The rules see findings, sides, sizes and presence; some swaps hit words they do not
    # track (e.g. "within normal limits" of an unlisted structure), so the bar is lower.
    assert st["verdict_ok"] / st["pairs"] >= 0.8
