"""Optional LLM scoring (open-answer judge, GREEN-style report score) against a real HTTP fake
OpenAI server: parsing, retries on bad replies, per-record rejects, the score formula."""

from __future__ import annotations

import json

import pytest

from fire_mpo_core.evaluation.llm_judge import (
    OpenItem,
    ReportItem,
    green_score,
    green_scores,
    judge_open_answers,
)
from fire_mpo_core.openai_client import OpenAIEndpointConfig
from testing_support.fake_openai import FakeOpenAI, ok, server_error


def _cfg(fake: FakeOpenAI, **kw) -> OpenAIEndpointConfig:
    return OpenAIEndpointConfig(
        base_urls=[fake.base_url],
        model="judge",
        api_key_env=None,
        max_retries=kw.pop("max_retries", 2),
        backoff_base_s=0.01,
        backoff_max_s=0.02,
        max_concurrency=1,  # scripted replies in request order
        **kw,
    )


def test_open_answer_judge_parses_retries_and_rejects():
    items = [
        OpenItem("a", "Which organ?", "liver", "the liver"),
        OpenItem("b", "Which side?", "left", "right"),
        OpenItem("c", "What modality?", "CT", "CT scan"),
    ]
    rejects: list[tuple[str, str]] = []
    with FakeOpenAI() as fake:
        fake.script(
            ok('```json\n{"correct": true}\n```'),  # code fence tolerated
            ok("I think it is wrong"),  # not JSON: retried
            ok('{"correct": false}'),
            server_error(500),
            server_error(500),
            server_error(500),  # c: 1 + 2 retries all fail -> reject
        )
        got = judge_open_answers(_cfg(fake), items, lambda i, r: rejects.append((i, r)))
        body = fake.requests[0].body
    assert got == {"a": True, "b": False}
    assert [i for i, _ in rejects] == ["c"] and "HTTP 500" in rejects[0][1]
    user = body["messages"][1]["content"]
    assert "Reference answer: liver" in user and "Candidate answer: the liver" in user
    assert body["temperature"] == 0.0 and body["model"] == "judge"


def test_green_score_formula():
    assert green_score(3, 1) == pytest.approx(0.75)
    assert green_score(0, 0) == 0.0  # nothing matched
    assert green_score(2, 0) == 1.0


def test_green_scores_counts_errors_from_the_reply():
    reply = {
        "significant_errors": {"a": 1, "b": 0, "c": 1, "d": 0, "e": 0, "f": 0},
        "matched_findings": 2,
    }
    with FakeOpenAI() as fake:
        fake.script(
            ok(json.dumps({"significant_errors": {"a": -1}, "matched_findings": 2})),  # invalid
            ok(json.dumps(reply)),
        )
        got = green_scores(
            _cfg(fake), [ReportItem("r1", "No effusion.", "Small left effusion.")], None
        )
    # matched 2, significant errors 1 + 1 = 2 -> 2 / (2 + 2).
    assert got["r1"]["green"] == pytest.approx(0.5)
    assert got["r1"]["significant_errors"]["c"] == 1


def test_evaluate_policy_with_both_endpoints(tiny_world, tmp_path):
    """Wiring: open answers go to the judge, reports to the GREEN prompt; metrics and rows."""
    import torch

    from fire_mpo_core.config import EvaluateConfig
    from fire_mpo_core.evaluation.llm_judge import GREEN_SYSTEM
    from fire_mpo_core.evaluation.vqa import evaluate_policy
    from fire_mpo_core.policy import PolicyRef

    torch.set_num_threads(1)
    root = tiny_world(
        data={"n_train_images": 4, "n_val_images": 0, "n_test_images": 3, "report_fraction": 1.0},
        data_defaults={},
        data_dir="",
        models={"m": {"hidden_size": 64, "num_heads": 2, "vocab_size": 300}},
    )["root"]

    def reply(body):
        if body["messages"][0]["content"] == GREEN_SYSTEM:
            return json.dumps({"significant_errors": {"b": 1}, "matched_findings": 3})
        return '{"correct": true}'

    used: dict = {}
    with FakeOpenAI(default=ok(reply, tokens=(30, 5))) as fake:
        judge = _cfg(fake, price_per_million_input_tokens=1.0, price_per_million_output_tokens=2.0)
        green = _cfg(fake, price_per_million_input_tokens=3.0, price_per_million_output_tokens=4.0)
        cfg = EvaluateConfig(max_new_tokens=4, grounding=False, llm_judge=judge, green=green)
        m = evaluate_policy(
            PolicyRef(base=str(root / "m")), root, cfg, tmp_path / "out", on_usage=used.update
        )
    assert m["open_llm_accuracy"] == 1.0 and m["n_open_llm_judged"] == m["n_open"] > 0
    assert m["report_green"] == pytest.approx(0.75) and m["n_report_green"] == m["n_report"] > 0
    # One request per open answer and per report, 30 + 5 tokens each; the cost per endpoint is
    # (30 * in + 5 * out) / 1e6: 40e-6 per judged answer, 110e-6 per GREEN-scored report.
    n_open, n_report = m["n_open"], m["n_report"]
    assert used["llm_requests"] == n_open + n_report and used["llm_retries"] == 0
    assert used["llm_prompt_tokens"] == 30 * (n_open + n_report)
    assert used["llm_completion_tokens"] == 5 * (n_open + n_report)
    assert used["llm_cost_usd"] == pytest.approx((40 * n_open + 110 * n_report) / 1e6)
    assert not any(k.startswith("llm_") for k in m)  # usage is not a metric
    rows = [json.loads(x) for x in (tmp_path / "out" / "data.jsonl").read_text().splitlines()]
    assert all(("llm_correct" in r) == (r["answer_type"] == "open") for r in rows)
