"""One client for OpenAI-compatible chat endpoints, shared by the `openai` sampling engine and the
LLM judge: endpoint config, API key from the environment, round-robin fan-out over several base
URLs, a concurrency bound, and the single retry loop (exponential backoff with jitter, honouring
``Retry-After``) that covers transport failures and invalid replies alike::

    from fire_mpo_core.openai_client import ChatClient, OpenAIEndpointConfig, RetryableError

    client = ChatClient(OpenAIEndpointConfig(base_urls=["http://127.0.0.1:8000/v1"], model="m"))

    def check(completion):                   # raise RetryableError to spend another attempt
        text = completion.choices[0].message.content
        if not text:
            raise RetryableError("empty reply")
        return text

    text = client.complete([{"role": "user", "content": "hi"}], validate=check, temperature=0)

Every client keeps a :class:`UsageLedger` (``client.usage``): requests sent, failed, retried,
rate-limited, seconds waited before retries, and the prompt / completion tokens each reply's
``usage`` reports (replies a validator refused were billed too, so they count).
:func:`estimate_cost` prices a snapshot with the endpoint's optional prices (None without
them: a cost is never made up)::

    used = client.usage.snapshot()              # LLMUsage(requests=3, retries=2, ...)
    estimate_cost(used, client.cfg)             # USD, or None when no prices are configured

A call that still fails after ``max_retries`` retries raises :class:`ChatFailure`, whose
``reason`` (like every message this module builds) has the API key redacted; callers turn it into
a per-record reject, never a crash of the stage. The key itself lives only in the environment
variable named by ``api_key_env`` and inside the ``openai`` client objects.
"""

from __future__ import annotations

import email.utils
import itertools
import json
import math
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import openai
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

__all__ = [
    "PRICE_FIELDS",
    "ChatClient",
    "ChatFailure",
    "LLMUsage",
    "OpenAIEndpointConfig",
    "PermanentError",
    "RetryableError",
    "UsageLedger",
    "backoff_delay",
    "estimate_cost",
    "parse_retry_after",
    "usage_counts",
    "with_retries",
]

T = TypeVar("T")

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# HTTP statuses worth another attempt: timeout, conflict, rate limit, server-side failures.
_RETRY_STATUS = {408, 409, 429}
# Secrets shorter than this are not redacted (replacing "ab" everywhere would garble messages).
_MIN_SECRET_LEN = 4
#: The endpoint's price fields: they price results, they do not change them, so the store leaves
#: them out of stage keys (``fire_mpo_core.store.UNKEYED_FIELDS``; tested to agree).
PRICE_FIELDS = ("price_per_million_input_tokens", "price_per_million_output_tokens")


class OpenAIEndpointConfig(BaseModel):
    """An OpenAI-compatible chat endpoint (or several serving the same model)."""

    # Errors show no input values: a key pasted into api_key_env must not be echoed.
    model_config = ConfigDict(extra="forbid", hide_input_in_errors=True)

    base_urls: list[str] = Field(
        default_factory=list,
        description="Endpoint base URLs (e.g. http://host:8000/v1); several fan out round-robin.",
    )
    model: str | None = Field(default=None, description="Model name sent in every request.")
    api_key_env: str | None = Field(
        default="OPENAI_API_KEY",
        description="NAME of the environment variable holding the API key (never the key "
        "itself); None for servers without authentication.",
        repr=False,
    )
    api_key_secret: str | None = Field(
        default=None,
        description="NAME of a Prefect Secret block holding the API key (`prefect block create "
        "secret`), read by the stage at run time; takes the place of api_key_env when set.",
        repr=False,
    )
    max_concurrency: int = Field(default=8, ge=1, description="Requests in flight at most.")
    timeout_s: float = Field(default=60.0, gt=0, description="Per-request timeout in seconds.")
    max_retries: int = Field(
        default=3, ge=0, description="Retries after the first attempt before a record is rejected."
    )
    backoff_base_s: float = Field(
        default=0.5, gt=0, description="First retry delay; doubles each retry (with jitter)."
    )
    backoff_max_s: float = Field(
        default=30.0, gt=0, description="Cap on any retry delay, Retry-After included."
    )
    price_per_million_input_tokens: float | None = Field(
        default=None,
        ge=0,
        description="USD per million prompt tokens, for the estimated cost in the stage table "
        "(None: cost not estimated). Not part of the stage key: a price change re-runs nothing.",
    )
    price_per_million_output_tokens: float | None = Field(
        default=None,
        ge=0,
        description="USD per million completion tokens; set together with "
        "price_per_million_input_tokens (None: cost not estimated). Not part of the stage key.",
    )

    @field_validator("base_urls")
    @classmethod
    def _urls(cls, v: list[str]) -> list[str]:
        for url in v:
            if not re.match(r"^https?://[^\s/]+", url):
                raise ValueError(f"base URL {url!r} is not an http(s) URL")
        return [u.rstrip("/") for u in v]

    @model_validator(mode="after")
    def _checks(self) -> OpenAIEndpointConfig:
        # Checked here, not in a field validator: a field validator's error carries the bad
        # value, and a value that is not a variable name is most likely the key itself.
        # (api_key_env is also left out of repr, which is what an error on the model shows.)
        if self.api_key_env is not None and not _ENV_NAME.match(self.api_key_env):
            raise ValueError(
                "api_key_env must be the NAME of an environment variable (letters, digits, _), "
                "not the key itself"
            )
        prices = (self.price_per_million_input_tokens, self.price_per_million_output_tokens)
        if (prices[0] is None) != (prices[1] is None):
            raise ValueError(
                "set both price_per_million_input_tokens and price_per_million_output_tokens "
                "(or neither: cost not estimated)"
            )
        if self.backoff_max_s < self.backoff_base_s:
            raise ValueError(
                f"backoff_max_s ({self.backoff_max_s}) must be >= backoff_base_s "
                f"({self.backoff_base_s})"
            )
        return self


# --------------------------------------------------------------------------- accounting


class LLMUsage(BaseModel):
    """What an endpoint was asked and answered: a snapshot of a :class:`UsageLedger`. Snapshots
    add up (``a + b``), e.g. over the shards of a stage."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    requests: int = Field(default=0, description="HTTP requests sent (every attempt).")
    failed_requests: int = Field(
        default=0, description="Attempts that failed: transport, HTTP error, or a refused reply."
    )
    retries: int = Field(default=0, description="Attempts after the first of a call.")
    rate_limited: int = Field(default=0, description="Replies with HTTP 429.")
    wait_s: float = Field(
        default=0.0, description="Seconds slept before retries (backoff, Retry-After included)."
    )
    prompt_tokens: int = Field(default=0, description="Prompt tokens the replies reported.")
    completion_tokens: int = Field(default=0, description="Completion tokens the replies reported.")
    unmetered_replies: int = Field(
        default=0, description="Replies without a `usage` object: their tokens are not counted."
    )

    def __add__(self, other: LLMUsage) -> LLMUsage:
        return LLMUsage(**{k: getattr(self, k) + getattr(other, k) for k in LLMUsage.model_fields})

    def as_counts(self, cost_usd: float | None) -> dict[str, int | float | None]:
        """The stage-table rows (``llm_*``); ``cost_usd`` from :func:`estimate_cost`."""
        rows: dict[str, int | float | None] = {
            f"llm_{k}": v for k, v in self.model_dump().items() if k != "unmetered_replies"
        }
        rows["llm_wait_s"] = round(self.wait_s, 3)
        if self.unmetered_replies:  # only then: a lower bound on tokens and cost
            rows["llm_unmetered_replies"] = self.unmetered_replies
        rows["llm_cost_usd"] = cost_usd
        return rows


class UsageLedger:
    """A thread-safe running :class:`LLMUsage` (a client's requests run on many threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._totals = dict.fromkeys(LLMUsage.model_fields, 0)

    def add(self, **delta: float) -> None:
        with self._lock:
            for k, v in delta.items():
                self._totals[k] += v

    def record_reply(self, usage: Any) -> None:
        """Count one reply's ``usage`` (an OpenAI ``CompletionUsage``, or None if absent)."""
        prompt = getattr(usage, "prompt_tokens", None)
        completion = getattr(usage, "completion_tokens", None)
        if prompt is None or completion is None:
            self.add(unmetered_replies=1)
        else:
            self.add(prompt_tokens=prompt, completion_tokens=completion)

    def snapshot(self) -> LLMUsage:
        with self._lock:
            return LLMUsage(**self._totals)


def estimate_cost(usage: LLMUsage, cfg: OpenAIEndpointConfig) -> float | None:
    """USD for the tokens of ``usage`` at the endpoint's prices (per million tokens), rounded to
    1e-6; None when the endpoint has no prices."""
    p_in, p_out = cfg.price_per_million_input_tokens, cfg.price_per_million_output_tokens
    if p_in is None or p_out is None:
        return None
    return round((usage.prompt_tokens * p_in + usage.completion_tokens * p_out) / 1e6, 6)


def usage_counts(parts: Iterable[tuple[LLMUsage, OpenAIEndpointConfig]]) -> dict[str, Any]:
    """The ``llm_*`` stage-table rows of one or more endpoints' usage: the sums, and the sum of
    their costs (None unless every endpoint has prices)."""
    total, cost = LLMUsage(), 0.0
    for usage, cfg in parts:
        total += usage
        each = estimate_cost(usage, cfg)
        cost = None if each is None or cost is None else cost + each
    return total.as_counts(None if cost is None else round(cost, 6))


def add_counts(parts: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """:func:`usage_counts` rows of several runs (e.g. evaluate's two passes) added key by key;
    a value that is None in any part (a cost without prices) stays None."""
    out: dict[str, Any] = {}
    for part in parts:
        for k, v in part.items():
            if k not in out:
                out[k] = v
            elif out[k] is None or v is None:
                out[k] = None
            else:
                out[k] = round(out[k] + v, 6)
    return out


# --------------------------------------------------------------------------- retry policy


class RetryableError(Exception):
    """One attempt failed in a way another attempt may fix (429, 5xx, timeout, bad reply)."""

    def __init__(self, reason: str, retry_after: float | None = None):
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class PermanentError(Exception):
    """An attempt failed in a way retrying cannot fix (401, 404, 400 ...)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class ChatFailure(Exception):
    """A call gave up: after ``attempts`` attempts, or at once on a permanent error."""

    def __init__(self, reason: str, attempts: int):
        super().__init__(reason)
        self.reason = reason
        self.attempts = attempts


def backoff_delay(
    retry: int,
    base_s: float,
    max_s: float,
    retry_after: float | None = None,
    rng: random.Random | None = None,
) -> float:
    """Seconds to wait before retry number ``retry`` (0 = the first retry).

    Exponential with "equal jitter": ``d = min(max_s, base_s * 2**retry)``, wait uniform in
    ``[d/2, d]`` (spreads clients that failed together). A server's ``Retry-After`` is a floor
    (never retry earlier than asked), and every delay is capped at ``max_s`` so one reply cannot
    stall a stage indefinitely.
    """
    rng = rng or random
    d = min(max_s, base_s * (2.0**retry))
    delay = d * (0.5 + 0.5 * rng.random())
    if retry_after is not None:
        delay = max(delay, retry_after)
    return min(delay, max_s)


def with_retries(
    attempt: Callable[[int], T],
    max_retries: int,
    base_s: float,
    max_s: float,
    redact: Callable[[str], str] = lambda s: s,
    sleep: Callable[[float], None] = time.sleep,
    rng: random.Random | None = None,
) -> T:
    """Run ``attempt(i)`` for i = 0, 1, ... until it returns, at most ``1 + max_retries`` times.

    ``attempt`` raises :class:`RetryableError` to try again after :func:`backoff_delay`, or
    :class:`PermanentError` to stop now. Raises :class:`ChatFailure` with the (redacted) reasons.
    """
    reasons: list[str] = []
    for i in range(max_retries + 1):
        try:
            return attempt(i)
        except PermanentError as e:
            raise ChatFailure(redact(f"attempt {i + 1}: {e.reason}"), i + 1) from None
        except RetryableError as e:
            reasons.append(redact(e.reason))
            if i < max_retries:
                sleep(backoff_delay(i, base_s, max_s, e.retry_after, rng))
    # The last reason is the one that decided; earlier ones are kept short for the record.
    history = "; ".join(dict.fromkeys(reasons))
    raise ChatFailure(f"gave up after {max_retries + 1} attempts: {history}", max_retries + 1)


def parse_retry_after(headers: Any) -> float | None:
    """Seconds from ``retry-after-ms`` or ``Retry-After`` (seconds or an HTTP date); None if
    absent or unreadable."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        seconds = float(value)
        return max(0.0, seconds) if math.isfinite(seconds) else None
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


# --------------------------------------------------------------------------- client

#: How `api_key_secret` names become keys. The core knows no secret store; the Prefect task layer
#: installs one (`tasks.common`: Prefect Secret blocks) with :func:`set_secret_resolver`.
_secret_resolver: Callable[[str], str] | None = None


def set_secret_resolver(resolver: Callable[[str], str] | None) -> None:
    """Install the function that turns a secret's name into the key (None: uninstall)."""
    global _secret_resolver
    _secret_resolver = resolver


def _resolve_key(env_name: str | None, secret: str | None = None) -> str:
    if secret is not None:
        if _secret_resolver is None:
            raise ValueError(
                f"api_key_secret {secret!r} needs a secret store: run the stage through Prefect "
                "(tasks/), or use api_key_env"
            )
        key = _secret_resolver(secret)
        if not key:
            raise ValueError(f"secret {secret!r} (openai.api_key_secret) is empty")
        return key
    if env_name is None:
        # Servers without auth still need a non-empty key in the openai client; passing one
        # explicitly also stops the client from silently picking up OPENAI_API_KEY.
        return "EMPTY"
    key = os.environ.get(env_name, "")
    if not key:
        raise ValueError(
            f"environment variable {env_name} (openai.api_key_env) is not set; export the API "
            "key there, or set api_key_env: null for a server without authentication"
        )
    return key


class ChatClient:
    """Chat completions against one or more OpenAI-compatible base URLs.

    Thread-safe: call :meth:`complete` from many threads; at most ``max_concurrency`` requests
    are in flight at once across all of them, and attempts rotate over ``base_urls``, so a retry
    usually lands on another endpoint. ``usage`` (a :class:`UsageLedger`, shared if passed in)
    counts every attempt and the tokens of every reply.
    """

    def __init__(
        self,
        cfg: OpenAIEndpointConfig,
        sleep: Callable[[float], None] = time.sleep,
        usage: UsageLedger | None = None,
    ):
        if not cfg.base_urls or not cfg.model:
            raise ValueError("an OpenAI endpoint needs base_urls and model")
        self.cfg = cfg
        key = _resolve_key(cfg.api_key_env, cfg.api_key_secret)
        self._secrets = [key] if len(key) >= _MIN_SECRET_LEN and key != "EMPTY" else []
        # The SDK's own retries are off: one retry loop (ours) decides, so attempts are counted
        # and backed off in one place.
        self._clients = [
            openai.OpenAI(base_url=url, api_key=key, timeout=cfg.timeout_s, max_retries=0)
            for url in cfg.base_urls
        ]
        self._next = itertools.count()
        self._lock = threading.Lock()
        self._slots = threading.BoundedSemaphore(cfg.max_concurrency)
        self._sleep = sleep
        self._rng = random.Random()
        self.usage = usage if usage is not None else UsageLedger()

    def __repr__(self) -> str:  # never the key
        return f"ChatClient(model={self.cfg.model!r}, base_urls={self.cfg.base_urls!r})"

    def redact(self, text: str) -> str:
        """``text`` with every occurrence of the API key replaced by ``[REDACTED]``."""
        for s in self._secrets:
            text = text.replace(s, "[REDACTED]")
        return text

    def _pick(self) -> tuple[str, openai.OpenAI]:
        with self._lock:
            i = next(self._next) % len(self._clients)
        return self.cfg.base_urls[i], self._clients[i]

    def _request(self, messages: list[dict[str, Any]], params: dict[str, Any]):
        url, client = self._pick()
        self.usage.add(requests=1)
        try:
            with self._slots:
                out = client.chat.completions.create(
                    model=self.cfg.model, messages=messages, **params
                )
        except openai.APITimeoutError:
            raise RetryableError(f"{url}: timed out after {self.cfg.timeout_s} s") from None
        except openai.APIConnectionError as e:
            cause = e.__cause__ or e
            raise RetryableError(f"{url}: connection error: {type(cause).__name__}") from None
        except openai.APIStatusError as e:
            reason = f"{url}: HTTP {e.status_code}: {_short(e.message)}"
            if e.status_code == 429:
                self.usage.add(rate_limited=1)
            if e.status_code in _RETRY_STATUS or e.status_code >= 500:
                raise RetryableError(reason, parse_retry_after(e.response.headers)) from None
            raise PermanentError(reason) from None
        except (openai.APIResponseValidationError, json.JSONDecodeError, ValueError) as e:
            raise RetryableError(f"{url}: malformed response: {_short(str(e))}") from None
        # A body that is not JSON can come back as a plain string instead of raising.
        if not hasattr(out, "choices") or not isinstance(out.choices, list):
            raise RetryableError(f"{url}: malformed response: not a chat completion")
        # Counted before the caller's validator: a reply it refuses was billed all the same.
        self.usage.record_reply(getattr(out, "usage", None))
        return out

    def complete(
        self,
        messages: list[dict[str, Any]],
        validate: Callable[[Any], T] | None = None,
        **params: Any,
    ) -> T:
        """Send one chat-completion request (retried as needed) and return ``validate(reply)``.

        Args:
            messages: chat messages in the OpenAI format.
            validate: turns the ``ChatCompletion`` into the caller's result, raising
                :class:`RetryableError` for a reply worth asking again for (invalid JSON, wrong
                spans ...); the default returns the completion itself.
            **params: request parameters (``n``, ``temperature``, ``max_tokens``,
                ``response_format``, ``seed`` ...).

        Raises:
            ChatFailure: after ``1 + max_retries`` failed attempts, or on a permanent HTTP error.
        """
        check = validate or (lambda c: c)

        def attempt(i: int) -> T:
            if i:
                self.usage.add(retries=1)
            try:
                return check(self._request(messages, params))
            except (RetryableError, PermanentError):
                self.usage.add(failed_requests=1)
                raise

        def wait(seconds: float) -> None:
            self.usage.add(wait_s=seconds)
            self._sleep(seconds)

        return with_retries(
            attempt,
            self.cfg.max_retries,
            self.cfg.backoff_base_s,
            self.cfg.backoff_max_s,
            redact=self.redact,
            sleep=wait,
            rng=self._rng,
        )

    def close(self) -> None:
        for c in self._clients:
            c.close()


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."
