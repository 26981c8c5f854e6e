"""LLM-judge and sampler accounting in the stage tables (issue 18, item 7), through the real
`judge` and `sample` stage bodies against the fake OpenAI server on 127.0.0.1, whose replies
report known ``usage``: requests, failures, retries, 429s, tokens, journal hits on a resumed
judge, the cost at the endpoint's prices, and a price change that re-runs nothing.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/tasks/test_llm_accounting.py -q
"""

from __future__ import annotations

import json

import pytest

import tasks.common
from fire_mpo_core.store import ArtifactStore, StageResult, TooManyRejects
from tasks import judge as judge_task
from tasks import sample as sample_task
from tasks.common import StageCall
from testing_support.fake_openai import FakeOpenAI, ok, rate_limited, server_error
from testing_support.stage_inputs import (
    GOOD,
    GOOD_REPLY,
    RESPONSE,
    dataset,
    finished,
    png,
    record_line,
    run_body,
)

KEY_ENV = "FIRE_MPO_TEST_ACCOUNTING_KEY"
PRICES = {"price_per_million_input_tokens": 1.0, "price_per_million_output_tokens": 4.0}


pytestmark = pytest.mark.usefixtures("no_progress_bars")


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-accounting-0123456789")


def _endpoint(url: str, **kw) -> dict:
    return {
        "base_urls": [url],
        "model": "m",
        "api_key_env": KEY_ENV,
        "timeout_s": 5.0,
        "max_retries": 3,
        "backoff_base_s": 0.01,
        "backoff_max_s": 1.0,
        "max_concurrency": 1,
        **kw,
    }


def _judge_inputs(store: ArtifactStore, ids: list[str]) -> dict:
    """A dataset holding the records ``ids`` and a sample folder with one rollout each."""
    extra = [rid for rid in ids if rid not in GOOD]
    prep = dataset(
        store,
        [record_line(rid) for rid in extra],
        {f"images/{rid}.png": png(seed=i) for i, rid in enumerate(extra)},
    )
    rollouts = [
        {"id": f"{rid}#0", "record_id": rid, "sample_index": 0, "question": "Where?",
         "response": RESPONSE, "engine": "openai", "model_key": "m", "seed": 0}
        for rid in ids
    ]  # fmt: skip
    sample = finished(
        store, "sample", lambda p: (p / "data.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rollouts))
    )  # fmt: skip
    return {"prepare": prep, "sample": sample}


def _table(store: ArtifactStore, res: StageResult, monkeypatch) -> dict:
    """The dashboard's stage table of ``res`` as metric -> value (the rows the task publishes
    with Prefect's create_table_artifact, captured here instead of sent to an API)."""
    tables: list[list[dict]] = []
    monkeypatch.setattr(
        tasks.common, "create_table_artifact", lambda rows, **k: tables.append(rows)
    )
    call = StageCall(store=store.root, run="r", round=1, stage="judge", config={}, inputs={})
    tasks.common.publish_summary(call, res)
    return {r["metric"]: r["value"] for r in tables[0]}


def _judge(store, inputs, endpoint: dict, **kw) -> StageResult:
    config = {"judge": {"name": "llm", "llm": {"endpoint": endpoint}}}
    return run_body(store, "judge", judge_task.body, config, inputs, resumable=True, **kw)


def test_judge_table_counts_retries_tokens_and_cost(store, monkeypatch):
    inputs = _judge_inputs(store, GOOD)
    with FakeOpenAI(lifetime_s=60) as fake:
        fake.set_default(ok(GOOD_REPLY, tokens=(100, 20)))
        fake.script(rate_limited(0.01), server_error(500))  # good-0 is asked 3 times
        res = _judge(store, inputs, _endpoint(fake.base_url, **PRICES))
    counts = res.manifest["counts"]
    assert counts["pairs"] == 2
    assert counts["llm_requests"] == 4 and counts["llm_failed_requests"] == 2
    assert counts["llm_retries"] == 2 and counts["llm_rate_limited"] == 1
    assert (counts["llm_prompt_tokens"], counts["llm_completion_tokens"]) == (200, 40)
    assert counts["llm_cache_hits"] == 0
    assert counts["llm_cost_usd"] == 0.00036  # (200 * 1.0 + 40 * 4.0) / 1e6
    # ... and the dashboard's stage table shows them.
    rows = _table(store, res, monkeypatch)
    assert rows["llm_requests"] == 4 and rows["llm_cost_usd"] == 0.00036


def test_resumed_judge_counts_its_journal_hits(store, monkeypatch):
    ids = [*GOOD, "rec-00", "rec-01", "rec-02", "rec-03"]
    inputs = _judge_inputs(store, ids)
    with FakeOpenAI(lifetime_s=60) as fake:
        endpoint = _endpoint(fake.base_url, max_retries=0)
        fake.script(ok(GOOD_REPLY, tokens=(100, 20)), ok(GOOD_REPLY, tokens=(100, 20)))
        fake.set_default(server_error(503))  # two judged, then an outage fails the stage
        with pytest.raises(TooManyRejects):
            _judge(store, inputs, endpoint, max_reject_fraction=0.5)
        fake.set_default(ok(GOOD_REPLY, tokens=(90, 10)))
        res = _judge(store, inputs, endpoint, max_reject_fraction=0.5)
    counts = res.manifest["counts"]
    # This attempt: 2 rollouts from the journal, 4 asked, each answered at once.
    assert counts["llm_cache_hits"] == 2
    assert counts["llm_requests"] == 4 and counts["llm_retries"] == 0
    assert (counts["llm_prompt_tokens"], counts["llm_completion_tokens"]) == (360, 40)
    assert counts["llm_cost_usd"] is None  # no prices configured: not estimated ...
    assert _table(store, res, monkeypatch)["llm_cost_usd"] == "n/a"  # ... and shown as such


def test_unsharded_judge_keeps_max_concurrency_requests_in_flight(store):
    """The stage without shards still asks the endpoint `max_concurrency` at a time (the LLM
    judge's judge_many per journal chunk), and writes the pairs in rollout order."""
    ids = [*GOOD, "rec-00", "rec-01", "rec-02", "rec-03"]
    inputs = _judge_inputs(store, ids)
    with FakeOpenAI(lifetime_s=60) as fake:
        fake.set_default(ok(GOOD_REPLY, delay_s=0.2))
        res = _judge(store, inputs, _endpoint(fake.base_url, max_concurrency=4))
        assert fake.max_in_flight > 1
    written = [json.loads(x)["id"] for x in (res.path / "data.jsonl").open()]
    assert written == [f"{rid}#0" for rid in ids]


def test_a_price_change_reruns_nothing(store):
    inputs = _judge_inputs(store, GOOD)
    with FakeOpenAI(lifetime_s=60) as fake:
        fake.set_default(ok(GOOD_REPLY, tokens=(100, 20)))
        first = _judge(store, inputs, _endpoint(fake.base_url, **PRICES))
        asked = len(fake.requests)
        cheaper = {k: v / 2 for k, v in PRICES.items()}
        again = _judge(store, inputs, _endpoint(fake.base_url, **cheaper))
        assert len(fake.requests) == asked  # the judge was not asked again
    assert again.cached and again.path == first.path
    # The recorded estimate is the one made at run time, with the prices of then.
    assert again.manifest["counts"]["llm_cost_usd"] == first.manifest["counts"]["llm_cost_usd"]


def test_sample_table_counts_the_openai_engine(store):
    prep = dataset(store, [], {})
    policy = finished(store, "policy", lambda p: (p / "policy.json").write_text("{}"))
    with FakeOpenAI(lifetime_s=60) as fake:
        fake.set_default(ok(["a b", "c d"], tokens=(50, 8)))
        fake.script(server_error(503))
        endpoint = _endpoint(fake.base_url, **PRICES)
        config = {"sample": {"engine": "openai", "n": 2, "openai": endpoint}}
        res = run_body(
            store,
            "sample",
            sample_task.body,
            config,
            {"prepare": prep, "policy": policy},
            resumable=True,
        )
    counts = res.manifest["counts"]
    assert counts["rollouts"] == 4  # 2 records x n = 2, both choices from one request each
    # 3 requests: the 503 failed and was retried once.
    assert counts["llm_requests"] == 3
    assert counts["llm_failed_requests"] == counts["llm_retries"] == 1
    assert (counts["llm_prompt_tokens"], counts["llm_completion_tokens"]) == (100, 16)
    assert counts["llm_cost_usd"] == 0.000164  # (100 * 1.0 + 16 * 4.0) / 1e6
    assert "llm_cache_hits" not in counts  # the sampler has no journal


def test_offline_judge_table_has_no_llm_rows(store):
    inputs = _judge_inputs(store, GOOD)  # rules judge: "yes" asked, the response names a lung
    res = run_body(
        store, "judge", judge_task.body, {"judge": {"name": "rules"}}, inputs, resumable=True
    )
    counts = res.manifest["counts"]
    assert counts["rollouts"] == 2
    assert not [k for k in counts if k.startswith("llm_")]
