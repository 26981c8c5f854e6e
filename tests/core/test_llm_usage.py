"""LLM accounting in the shared OpenAI client (issue 18, item 7): the usage ledger against the
fake server on 127.0.0.1 with known ``usage`` per reply, the cost estimate, and prices kept out
of stage keys.

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest tests/core/test_llm_usage.py -q
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest
from pydantic import ValidationError

from fire_mpo_core.judge.stage import JudgeCounts
from fire_mpo_core.openai_client import (
    PRICE_FIELDS,
    ChatClient,
    ChatFailure,
    LLMUsage,
    OpenAIEndpointConfig,
    RetryableError,
    estimate_cost,
    usage_counts,
)
from fire_mpo_core.sampling.stage import SampleCounts
from fire_mpo_core.store import UNKEYED_FIELDS, stage_key
from testing_support.fake_openai import ok, rate_limited, server_error

MESSAGES = [{"role": "user", "content": "hi"}]


def _client(fake, waited: list[float], **kw) -> ChatClient:
    cfg = OpenAIEndpointConfig(
        base_urls=[fake.base_url],
        model="m",
        api_key_env=None,
        backoff_base_s=0.01,
        backoff_max_s=1.0,
        **kw,
    )
    return ChatClient(cfg, sleep=waited.append)  # records each backoff instead of sleeping


def test_ledger_counts_a_call_retried_after_a_429_and_a_500(fake_openai):
    fake_openai.script(rate_limited(0.25), server_error(500), ok("a b c", tokens=(12, 3)))
    waited: list[float] = []
    client = _client(fake_openai, waited, max_retries=3)
    client.complete(MESSAGES)
    used = client.usage.snapshot()
    # 3 attempts: the 429 and the 500 failed, so 2 retries; only the reply reported tokens.
    assert used.requests == 3 and used.failed_requests == 2 and used.retries == 2
    assert used.rate_limited == 1
    assert (used.prompt_tokens, used.completion_tokens, used.unmetered_replies) == (12, 3, 0)
    assert len(waited) == 2 and used.wait_s == pytest.approx(sum(waited))
    assert waited[0] >= 0.25  # the Retry-After floor is what was waited


def test_a_refused_reply_was_billed_so_its_tokens_count(fake_openai):
    fake_openai.script(ok("bad", tokens=(7, 1)), ok("good", tokens=(7, 2)))
    client = _client(fake_openai, [], max_retries=1)

    def check(completion):
        text = completion.choices[0].message.content
        if text != "good":
            raise RetryableError("not good")
        return text

    assert client.complete(MESSAGES, validate=check) == "good"
    used = client.usage.snapshot()
    assert (used.requests, used.failed_requests, used.retries) == (2, 1, 1)
    assert (used.prompt_tokens, used.completion_tokens) == (14, 3)


def test_permanent_error_and_a_reply_without_usage(fake_openai):
    fake_openai.script(server_error(401), ok("x", usage=False))
    client = _client(fake_openai, [], max_retries=3)
    with pytest.raises(ChatFailure):
        client.complete(MESSAGES)  # 401: not retried
    client.complete(MESSAGES)
    used = client.usage.snapshot()
    assert (used.requests, used.failed_requests, used.retries) == (2, 1, 0)
    assert used.unmetered_replies == 1 and used.prompt_tokens == used.completion_tokens == 0
    assert used.as_counts(None)["llm_unmetered_replies"] == 1  # tokens are a lower bound


def test_ledger_is_exact_under_concurrent_calls(fake_openai):
    fake_openai.set_default(ok("x", tokens=(5, 2)))
    client = _client(fake_openai, [], max_concurrency=8)
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda _: client.complete(MESSAGES), range(40)))
    used = client.usage.snapshot()
    assert (used.requests, used.prompt_tokens, used.completion_tokens) == (40, 200, 80)


def test_cost_is_tokens_times_price_per_million():
    cfg = OpenAIEndpointConfig(
        price_per_million_input_tokens=2.5, price_per_million_output_tokens=10.0
    )
    used = LLMUsage(prompt_tokens=1234, completion_tokens=567)
    # (1234 * 2.5 + 567 * 10) / 1e6 = (3085 + 5670) / 1e6
    assert estimate_cost(used, cfg) == 0.008755
    assert estimate_cost(used, OpenAIEndpointConfig()) is None  # no prices: not estimated
    summed = used + LLMUsage(requests=2, prompt_tokens=66, completion_tokens=33, wait_s=0.5)
    assert (summed.requests, summed.prompt_tokens, summed.completion_tokens) == (2, 1300, 600)
    assert summed.wait_s == 0.5


def test_prices_come_in_pairs_and_are_not_negative():
    with pytest.raises(ValidationError, match="price_per_million_input_tokens and price_per"):
        OpenAIEndpointConfig(price_per_million_input_tokens=1.0)
    with pytest.raises(ValidationError, match="price_per_million_output_tokens"):
        OpenAIEndpointConfig(
            price_per_million_input_tokens=1.0, price_per_million_output_tokens=-1.0
        )


def test_prices_stay_out_of_the_stage_key():
    assert set(PRICE_FIELDS) == set(UNKEYED_FIELDS) <= set(OpenAIEndpointConfig.model_fields)

    def key(**endpoint) -> str:
        cfg = OpenAIEndpointConfig(base_urls=["http://h:1/v1"], model="judge", **endpoint)
        config = {"judge": {"name": "llm", "llm": {"endpoint": cfg.model_dump(mode="json")}}}
        return stage_key("judge", config, {}, "code")

    unpriced = key()
    priced = key(price_per_million_input_tokens=3.0, price_per_million_output_tokens=15.0)
    repriced = key(price_per_million_input_tokens=0.5, price_per_million_output_tokens=2.0)
    assert priced == unpriced == repriced  # a new price re-runs nothing
    assert key(max_retries=5) != unpriced  # any other field still keys the stage
    # A config dumped before the price fields existed keeps its key.
    old = OpenAIEndpointConfig(base_urls=["http://h:1/v1"], model="judge").model_dump(mode="json")
    for f in PRICE_FIELDS:
        del old[f]
    config = {"judge": {"name": "llm", "llm": {"endpoint": old}}}
    assert stage_key("judge", config, {}, "code") == unpriced


def test_offline_stage_tables_have_no_llm_rows_and_endpoint_ones_do():
    judge = JudgeCounts(
        rollouts=4, pairs=3, incorrect=2, correct=1, statistics={}, rejected={"omission": 1}
    )
    assert not [k for k in judge.as_counts() if k.startswith("llm_")]
    assert judge.as_counts()["pair_rate"] == 0.75
    priced = judge.model_copy(
        update={"llm": LLMUsage(requests=4), "llm_cache_hits": 2, "llm_cost_usd": 0.01}
    ).as_counts()
    assert priced["llm_requests"] == 4 and priced["llm_cache_hits"] == 2
    assert priced["llm_cost_usd"] == 0.01
    sample = SampleCounts(records_in=2, records=2, rollouts=2, skipped=0, rejected=0, repaired=0)
    assert not [k for k in sample.as_counts() if k.startswith("llm_")]
    with_endpoint = sample.model_copy(update={"llm": LLMUsage(prompt_tokens=9)}).as_counts()
    assert with_endpoint["llm_prompt_tokens"] == 9 and with_endpoint["llm_cost_usd"] is None


def test_usage_of_several_endpoints_sums_and_prices_only_when_all_are_priced():
    priced = OpenAIEndpointConfig(
        price_per_million_input_tokens=1.0, price_per_million_output_tokens=2.0
    )
    a = LLMUsage(requests=2, prompt_tokens=100, completion_tokens=10)
    b = LLMUsage(requests=1, retries=1, prompt_tokens=50, completion_tokens=5)
    both = usage_counts([(a, priced), (b, priced)])
    assert (both["llm_requests"], both["llm_retries"], both["llm_prompt_tokens"]) == (3, 1, 150)
    assert both["llm_cost_usd"] == 0.00018  # (150 * 1.0 + 15 * 2.0) / 1e6
    assert usage_counts([(a, priced), (b, OpenAIEndpointConfig())])["llm_cost_usd"] is None
