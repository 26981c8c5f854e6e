"""The `openai` sampling engine: any OpenAI-compatible chat endpoint (a ``vllm serve`` of the
policy, a hosted model), one or several base URLs, many requests in flight.

Each item becomes one user message holding the image as a base64 PNG data URL and the question::

    {"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBOR..."}},
        {"type": "text", "text": "Is there a lesion?"}]}

sent with ``n`` (and again for the rest if a server returns fewer choices), ``temperature``,
``top_p``, ``max_tokens`` and ``seed``. Transport errors and empty replies are retried by
:class:`~fire_mpo_core.openai_client.ChatClient` (backoff with jitter, ``Retry-After``); a record
that still fails becomes a :class:`~fire_mpo_core.sampling.base.Reject` with the reason, and the
stage goes on. Rows come back in input order.

Several ``openai.base_urls`` (replicas serving the same policy) share the requests round-robin,
``openai.max_concurrency`` in flight in all. The output does not depend on which replica answered
or in what order: rows are yielded in record order, and each request carries its own seed,
derived from the config seed and the record id (``derive_seed``), so a server that honours
``seed`` gives the same answers for a record whichever replica gets it, on any rerun.
"""

from __future__ import annotations

import base64
import io
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from PIL import Image

from fire_mpo_core.data.records import Rollout
from fire_mpo_core.openai_client import ChatClient, ChatFailure, RetryableError
from fire_mpo_core.sampling.base import PolicyLike, Reject, SampleItem, derive_seed, rollouts_for
from fire_mpo_core.sampling.config import SampleConfig

__all__ = ["OpenAIEngine", "build_messages", "image_data_url"]


def image_data_url(image: Image.Image) -> str:
    """``data:image/png;base64,...`` of the image (lossless: a scan's intensities survive)."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def build_messages(question: str, image: Image.Image) -> list[dict[str, Any]]:
    """The chat messages of one prompt: one user turn, image first, then the question (the
    order of the chat template the policy was trained with)."""
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": image_data_url(image)}},
                {"type": "text", "text": question},
            ],
        }
    ]


def _answers(completion) -> list[str]:
    texts = [
        c.message.content.strip()
        for c in completion.choices
        if c.message is not None and isinstance(c.message.content, str)
    ]
    if not texts:
        raise RetryableError("reply has no choice with text content")
    return texts


class OpenAIEngine:
    """Sampling over HTTP from an OpenAI-compatible server; ``policy`` is what that server
    serves (only its name ends up in the rows, via ``model_key``). ``usage``: the client's
    :class:`~fire_mpo_core.openai_client.UsageLedger` (requests, retries, tokens so far)."""

    #: The server decides what it serves: no local policy needed (make_engine checks this).
    needs_policy = False
    #: Requests go to an endpoint: the sample stage reports ``usage`` (llm_* rows).
    uses_endpoint = True

    name = "openai"

    def __init__(
        self,
        cfg: SampleConfig,
        policy: PolicyLike | None = None,
        model_key: str | None = None,
        log_path: Path | None = None,  # unused: the server is not ours to log
        client: ChatClient | None = None,
    ):
        self.cfg = cfg
        self.n = cfg.n
        self.client = client or ChatClient(cfg.openai)
        self.usage = self.client.usage
        self.model_key = model_key or str(cfg.openai.model)
        params: dict[str, Any] = {"temperature": cfg.temperature, "max_tokens": cfg.max_new_tokens}
        if cfg.temperature > 0:
            params["top_p"] = cfg.top_p
        self._params = params

    def sample_one(self, item: SampleItem) -> list[Rollout] | Reject:
        """All ``n`` rows of one item, or its reject."""
        try:
            messages = build_messages(item.question, item.load_image())
        except (OSError, ValueError) as e:
            return Reject(id=item.record_id, reason=f"image: {type(e).__name__}: {e}"[:500])
        texts: list[str] = []
        # Bounded: every round adds at least one answer (an empty reply is retried inside).
        for _ in range(self.n):
            need = self.n - len(texts)
            # Per record (and per top-up request, which must not repeat the first's answers).
            seed = derive_seed(self.cfg.seed, [item.record_id, str(len(texts))])
            try:
                got = self.client.complete(
                    messages, validate=_answers, n=need, seed=seed, **self._params
                )
            except ChatFailure as e:
                return Reject(id=item.record_id, reason=f"openai: {e.reason}"[:1000])
            texts.extend(got[:need])
            if len(texts) == self.n:
                break
        return rollouts_for(item, texts, self.name, self.model_key, self.cfg.seed)

    def sample(self, items: list[SampleItem]) -> Iterator[Rollout | Reject]:
        workers = self.cfg.openai.max_concurrency
        # Twice the workers in flight, so one slow record does not idle the pool while rows
        # still come back in input order.
        window = 2 * workers
        source = iter(items)
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="openai-sample")
        pending: deque[Future] = deque()
        try:
            for item in source:
                pending.append(pool.submit(self.sample_one, item))
                if len(pending) >= window:
                    break
            while pending:
                result = pending.popleft().result()
                nxt = next(source, None)
                if nxt is not None:
                    pending.append(pool.submit(self.sample_one, nxt))
                if isinstance(result, Reject):
                    yield result
                else:
                    yield from result
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
