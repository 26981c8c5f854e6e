"""Endpoint faults (issue #7, item 3) and the `openai` sampler's fan-out (issue #9, item 2),
through the real `sample` and `judge` stage bodies against fake OpenAI servers on 127.0.0.1.

429 with Retry-After, 500, replies slower than the timeout and dropped connections are retried
with backoff, a bounded number of times, then the record is rejected with the reason; an outage
that rejects too much fails the stage, and the rerun asks only for the records not done yet.
Fan-out: two servers share the requests, and the output file is byte-identical whatever the
number of servers, their order or the concurrency.

    .venv/bin/python -m pytest tests/tasks/test_endpoint_faults.py -q
"""

from __future__ import annotations

import hashlib
import json
import time

import pytest

from fire_mpo_core.store import ArtifactStore, TooManyRejects
from tasks import judge as judge_task
from tasks import sample as sample_task
from tasks.common import StageCall
from testing_support.fake_openai import FakeOpenAI, drop, hang, ok, rate_limited, server_error
from testing_support.stage_inputs import GOOD_REPLY, RESPONSE, dataset, finished, png
from testing_support.stage_inputs import record_line as _line

KEY_ENV = "FIRE_MPO_TEST_ENDPOINT_KEY"


pytestmark = pytest.mark.usefixtures("no_progress_bars")


@pytest.fixture(autouse=True)
def _env(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "sk-endpoint-0123456789")


def _question(body: dict) -> str:
    return body["messages"][0]["content"][1]["text"]


def _answer(body: dict) -> list[str]:
    """A deterministic 'model': the answer depends on the request only (question and seed)."""
    h = hashlib.sha256(f"{_question(body)}|{body.get('seed')}".encode()).hexdigest()
    return [f"answer {h[:8]} {k}" for k in range(int(body.get("n") or 1))]


def _endpoint(urls: list[str], **kw) -> dict:
    return {
        "base_urls": urls,
        "model": "policy",
        "api_key_env": KEY_ENV,
        "timeout_s": 0.3,
        "max_retries": 3,
        "backoff_base_s": 0.01,
        "backoff_max_s": 1.0,
        "max_concurrency": 1,
        **kw,
    }


def _prepare(store: ArtifactStore, n: int):
    lines = [_line(f"rec-{i:02d}", question=f"Question {i}?") for i in range(n)]
    files = {f"images/rec-{i:02d}.png": png(seed=i) for i in range(n)}
    return dataset(store, lines, files)


def _sample(store, prep, endpoint: dict, n: int = 1, **extra):
    policy = finished(store, "policy", lambda p: (p / "policy.json").write_text("{}"))
    config = {"sample": {"engine": "openai", "n": n, "openai": endpoint}, **extra}
    inputs = {"prepare": prep, "policy": policy}
    call = StageCall(
        store=store.root, run="r", round=1, stage="sample", config=config, inputs=inputs
    )
    return store.run_stage(
        run="r",
        round_=1,
        stage="sample",
        config=config,
        inputs=inputs,
        code="t",
        fn=lambda w: sample_task.body(call, w),
        resumable=True,  # as the sample task is
        max_reject_fraction=config.get("max_reject_fraction"),
    )


def _rows(path) -> list[dict]:
    return [json.loads(x) for x in (path / "data.jsonl").read_text().splitlines()]


def _rejects(path) -> dict[str, str]:
    lines = (path / "rejects.jsonl").read_text().splitlines()
    return {r["id"]: r["reason"] for r in map(json.loads, lines)}


def test_transient_faults_are_retried_and_every_record_completes(store):
    prep = _prepare(store, 3)
    with FakeOpenAI(lifetime_s=60) as fake:
        fake.set_default(ok(_answer))
        # good-0 meets every fault kind in turn before its answer.
        fake.script(rate_limited(0.25), server_error(500), hang(2.0), drop())
        res = _sample(store, prep, _endpoint([fake.base_url], max_retries=4))
        reqs = fake.requests
    rows = _rows(res.path)
    assert sorted(r["record_id"] for r in rows) == sorted(["good-0", "good-1", *_ids(3)])
    assert _rejects(res.path) == {}
    assert len(reqs) == 5 + 4  # 5 records, 4 of good-0's attempts failed
    # The retry after the 429 waited at least its Retry-After (0.25 s), not the 0.01 s backoff.
    assert reqs[1].t - reqs[0].t >= 0.25


def _ids(n: int) -> list[str]:
    return [f"rec-{i:02d}" for i in range(n)]


@pytest.mark.parametrize(
    ("fault", "reason"),
    [
        (rate_limited(0.01), "HTTP 429"),
        (server_error(500), "HTTP 500"),
        (hang(2.0), "timed out after 0.3 s"),
        (drop(), "connection error"),
    ],
    ids=["429", "500", "timeout", "dropped"],
)
def test_persistent_fault_rejects_after_bounded_retries(store, fault, reason):
    prep = _prepare(store, 2)
    with FakeOpenAI(lifetime_s=60) as fake:
        # Every request about "Question 1?" fails; the others are answered.
        fake.set_default(lambda body: fault if _question(body) == "Question 1?" else ok(_answer))
        t0 = time.monotonic()
        res = _sample(store, prep, _endpoint([fake.base_url], max_retries=2))
        elapsed = time.monotonic() - t0
        failing = [r for r in fake.requests if _question(r.body) == "Question 1?"]
    assert len(failing) == 3  # 1 + max_retries, then given up
    rejects = _rejects(res.path)
    assert list(rejects) == ["rec-01"]
    assert "gave up after 3 attempts" in rejects["rec-01"] and reason in rejects["rec-01"]
    assert {r["record_id"] for r in _rows(res.path)} == {"good-0", "good-1", "rec-00"}
    assert elapsed < 15  # bounded: timeouts and backoff caps, no hang


def test_outage_fails_the_stage_then_the_rerun_asks_only_for_what_is_missing(store):
    prep = _prepare(store, 6)  # 8 records with the two GOOD ones
    with FakeOpenAI(lifetime_s=60) as fake:
        # The first 3 records are answered, then the endpoint goes down (503 on every try).
        fake.script(*[ok(_answer)] * 3)
        fake.set_default(server_error(503))
        endpoint = _endpoint([fake.base_url], max_retries=1)
        with pytest.raises(TooManyRejects, match=r"5 of 8 records rejected"):
            _sample(store, prep, endpoint, max_reject_fraction=0.5)
        assert len(fake.requests) == 3 + 5 * 2
        fake.set_default(ok(_answer))  # the endpoint is back
        before = len(fake.requests)
        res = _sample(store, prep, endpoint, max_reject_fraction=0.5)
        asked = [_question(r.body) for r in fake.requests[before:]]
    assert len(asked) == 5  # only the 5 records that were not done
    assert len(_rows(res.path)) == 8 and _rejects(res.path) == {}
    assert res.manifest["counts"]["skipped"] == 3


def _fanout_file(store, prep, urls, concurrency) -> bytes:
    res = _sample(store, prep, _endpoint(urls, max_concurrency=concurrency), n=2)
    return (res.path / "data.jsonl").read_bytes()


def test_fan_out_over_two_servers_gives_the_same_file_in_record_order(tmp_path):
    """Two replicas share the load; the output is byte-identical to one server, sequential."""
    outputs = []
    with FakeOpenAI(lifetime_s=60) as a, FakeOpenAI(lifetime_s=60) as b:
        for fake in (a, b):
            fake.set_default(ok(lambda body: _answer(body), delay_s=0.02))
        runs = [([a.base_url], 1), ([a.base_url, b.base_url], 4), ([b.base_url, a.base_url], 3)]
        for i, (urls, conc) in enumerate(runs):
            if i == 2:  # and with one replica failing now and then: its requests move over
                a.script(server_error(500), drop())
            store = ArtifactStore(tmp_path / f"s{i}")
            prep = _prepare(store, 10)
            outputs.append(_fanout_file(store, prep, urls, conc))
        assert len(a.requests) > 12 and len(b.requests) > 12  # both served a share
        assert max(a.max_in_flight, b.max_in_flight) >= 2  # concurrently
    assert outputs[0] == outputs[1] == outputs[2]
    rows = [json.loads(x) for x in outputs[0].decode().splitlines()]
    order = [r["record_id"] for r in rows]
    assert order == [rid for rid in ["good-0", "good-1", *_ids(10)] for _ in range(2)]


# --------------------------------------------------------------------------- the LLM judge


def _judge_stage(store, fake, max_retries: int):
    prep = dataset(store, [], {})
    rollouts = [
        {"id": f"{rid}#0", "record_id": rid, "sample_index": 0, "question": "Where?",
         "response": RESPONSE, "engine": "openai", "model_key": "m", "seed": 0}
        for rid in ["good-0", "good-1"]
    ]  # fmt: skip
    sample = finished(
        store, "sample", lambda p: (p / "data.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rollouts))
    )  # fmt: skip
    endpoint = _endpoint([fake.base_url], max_retries=max_retries, model="judge")
    config = {"judge": {"name": "llm", "llm": {"endpoint": endpoint}}}
    inputs = {"prepare": prep, "sample": sample}
    call = StageCall(
        store=store.root, run="r", round=1, stage="judge", config=config, inputs=inputs
    )
    return store.run_stage(
        run="r", round_=1, stage="judge", config=config, inputs=inputs, code="t",
        fn=lambda w: judge_task.body(call, w),
    )  # fmt: skip


def test_llm_judge_stage_retries_transient_faults(store):
    with FakeOpenAI(lifetime_s=60) as fake:
        fake.set_default(ok(GOOD_REPLY))
        fake.script(rate_limited(0.05), server_error(502), hang(2.0), drop())
        res = _judge_stage(store, fake, max_retries=4)
        assert len(fake.requests) == 2 + 4
    assert {json.loads(x)["id"] for x in (res.path / "data.jsonl").read_text().splitlines()} == {
        "good-0#0",
        "good-1#0",
    }
    assert _rejects(res.path) == {}


def test_llm_judge_stage_rejects_after_bounded_retries(store):
    with FakeOpenAI(lifetime_s=60) as fake:
        fake.set_default(server_error(500))
        res = _judge_stage(store, fake, max_retries=2)
        assert len(fake.requests) == 2 * 3
    rejects = _rejects(res.path)
    assert sorted(rejects) == ["good-0#0", "good-1#0"]
    assert all("endpoint failed" in r and "HTTP 500" in r for r in rejects.values())
    assert res.manifest["counts"]["pairs"] == 0


def test_llm_judge_outage_fails_the_stage_then_the_rerun_asks_only_for_the_rest(store):
    """The judge stage is resumable: judged rollouts are journaled in its working folder, so
    after an outage (too many endpoint rejects: the stage fails) only those are asked again."""
    prep = _prepare(store, 4)
    ids = [f"good-{i}" for i in range(2)] + [f"rec-{i:02d}" for i in range(4)]
    rollouts = [
        {"id": f"{rid}#0", "record_id": rid, "sample_index": 0, "question": "Where?",
         "response": RESPONSE, "engine": "openai", "model_key": "m", "seed": 0}
        for rid in ids
    ]  # fmt: skip
    sample = finished(
        store, "sample", lambda p: (p / "data.jsonl").write_text(
            "".join(json.dumps(r) + "\n" for r in rollouts))
    )  # fmt: skip
    with FakeOpenAI(lifetime_s=60) as fake:
        endpoint = _endpoint([fake.base_url], max_retries=0, model="judge")
        config = {"judge": {"name": "llm", "llm": {"endpoint": endpoint}}}
        inputs = {"prepare": prep, "sample": sample}
        call = StageCall(
            store=store.root, run="r", round=1, stage="judge", config=config, inputs=inputs
        )

        def run():
            return store.run_stage(
                run="r", round_=1, stage="judge", config=config, inputs=inputs, code="t",
                fn=lambda w: judge_task.body(call, w), resumable=True, max_reject_fraction=0.5,
            )  # fmt: skip

        fake.script(ok(GOOD_REPLY), ok(GOOD_REPLY))  # two answered, then the endpoint is down
        fake.set_default(server_error(503))
        with pytest.raises(TooManyRejects):
            run()
        fake.set_default(ok(GOOD_REPLY))
        before = len(fake.requests)
        res = run()
        again = len(fake.requests) - before
    assert again == len(ids) - 2  # the two judged before the outage are not asked again
    assert not (res.path / judge_task.JOURNAL).exists()  # scratch: not part of the output
    got = {json.loads(x)["id"] for x in (res.path / "data.jsonl").read_text().splitlines()}
    rejected = set(_rejects(res.path))
    assert got | rejected == {f"{i}#0" for i in ids} and not got & rejected
