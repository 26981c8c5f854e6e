"""The one fake OpenAI-compatible server of the tests: a real HTTP server on 127.0.0.1 (a free
port), stdlib ``http.server`` in a background thread, scriptable per test::

    from testing_support.fake_openai import FakeOpenAI, ok, rate_limited, server_error, hang, drop

    with FakeOpenAI() as fake:                       # fake.base_url = "http://127.0.0.1:PORT/v1"
        fake.script(rate_limited(0.05), server_error(500), ok("yes"))
        ...                                          # point a client at fake.base_url
        fake.requests[0].body["model"], fake.requests[0].headers["authorization"]

Each POST /v1/chat/completions takes the next scripted behaviour (or ``default`` once the script
is used up; ``default`` may also be a function of the request body returning a behaviour, to
route by request): ``ok`` (content, a list of choice contents, or a function of the request body;
the reply's ``usage`` reports ``tokens=(prompt, completion)``, or is left out with ``usage=False``),
``rate_limited`` (429 + Retry-After), ``server_error`` (any status), ``hang`` (sleep, e.g. past
the client timeout, then answer), ``drop`` (close the connection without a response),
``malformed`` (200 with a body that is not JSON). Received requests are recorded with their
headers and JSON body; ``max_in_flight`` is the most requests handled at once. Nothing is ever
printed (the auth header stays in ``requests``). Sleeps are bounded and interrupted by
:meth:`FakeOpenAI.stop`; the server also stops by itself after ``lifetime_s``. In tests, the
``fake_openai`` fixture (tests/conftest.py) is a started server, stopped after the test.

**The vLLM variant** (``FakeOpenAI(vllm=VLLMModels(...))``) also speaks the parts of vLLM's
OpenAI server the ``vllm_server`` engine uses, as vLLM 0.32 answers them: ``GET /health``,
``GET /v1/models`` (the base with ``parent: null``, adapters with ``parent: <base>``),
``POST /v1/load_lora_adapter`` / ``unload_lora_adapter`` (only with ``runtime_lora``; 400
"already been loaded" on a repeat) and a 404 for a chat request naming an unknown model; its
default reply is ``n`` choices, each ``"<model>|<question>|<k>"``. Without ``vllm`` there is no
``GET`` at all (not a vLLM server). As a process it stands in for vLLM's server command, for the
fast lifecycle tests of the `vllm_server` engine (no vLLM needed)::

    python -m testing_support.fake_openai --model BASE --host 127.0.0.1 --port P \\
        --served-model-name base [--enable-lora --lora-modules name=path ...] [other vLLM flags]

Like vLLM it then starts a child process (its "engine core"), so a test can check that the whole
process group is stopped. Unknown flags are ignored. Behaviour from the environment:
``FAKE_VLLM_START_DELAY`` (seconds before listening), ``FAKE_VLLM_EXIT_AT_START`` (exit code,
after printing an error), ``FAKE_VLLM_DIE_AFTER`` (die with SIGKILL after that many chat
requests, mid-stage), ``FAKE_VLLM_REPLY_DELAY`` (seconds per chat request),
``FAKE_VLLM_IGNORE_TERM`` (ignore SIGTERM, so stop() must SIGKILL) and ``FAKE_VLLM_LIFETIME``
(exit by itself after that many seconds; default 120); ``VLLM_ALLOW_RUNTIME_LORA_UPDATING`` turns
``runtime_lora`` on, as in vLLM.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

Content = str | list[str] | Callable[[dict[str, Any]], str | list[str]]


@dataclass(frozen=True)
class Behaviour:
    """What the server does with one request."""

    kind: str  # ok | status | hang | drop | malformed
    content: Content | None = None
    status: int = 200
    retry_after: str | None = None
    delay_s: float = 0.0
    message: str | None = None
    tokens: tuple[int, int] | None = None  # (prompt, completion) reported in `usage`
    usage: bool = True  # False: no `usage` object, as some servers reply


def ok(
    content: Content = "ok",
    delay_s: float = 0.0,
    tokens: tuple[int, int] | None = None,
    usage: bool = True,
) -> Behaviour:
    """200 with ``content`` as every choice (a list: one choice each, possibly fewer than n).
    The reply's ``usage`` reports ``tokens`` = (prompt, completion) if given, else 10 prompt
    tokens and one completion token per word of all choices; ``usage=False`` leaves it out."""
    return Behaviour("ok", content=content, delay_s=delay_s, tokens=tokens, usage=usage)


def rate_limited(retry_after: float | str = 0.05) -> Behaviour:
    return Behaviour("status", status=429, retry_after=str(retry_after))


def server_error(status: int = 500, message: str | None = None) -> Behaviour:
    """An HTTP error status with an OpenAI-style error body (``message`` or a default)."""
    return Behaviour("status", status=status, message=message)


def hang(seconds: float = 1.0, content: Content = "late") -> Behaviour:
    """Sleep (past the client's timeout, typically), then answer if anyone is still there."""
    return Behaviour("ok", content=content, delay_s=seconds)


def drop() -> Behaviour:
    """Close the connection without sending a response."""
    return Behaviour("drop")


def malformed() -> Behaviour:
    """200, ``Content-Type: application/json``, a truncated JSON body."""
    return Behaviour("malformed")


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: Any
    t: float


@dataclass
class VLLMModels:
    """What the vLLM variant serves: the base model and its LoRA adapters (name -> path)."""

    base: str
    root: str | None = None  # the base's path (``root`` in /v1/models); default: ``base``
    adapters: dict[str, str] = field(default_factory=dict)
    runtime_lora: bool = False  # POST /v1/load_lora_adapter and unload allowed
    die_after: int = 0  # SIGKILL the process group at the chat request after this many (0: never)
    reply_delay_s: float = 0.0

    def echo(self, body: dict[str, Any]) -> Behaviour:
        """The default reply: ``"<model>|<question>|<k>"`` for each of the ``n`` choices."""
        model, q = body.get("model"), _question(body.get("messages", []))
        texts = [f"{model}|{q}|{k}" for k in range(int(body.get("n") or 1))]
        return ok(texts, delay_s=self.reply_delay_s)


def _question(messages: list) -> str:
    """The first text of a chat request (the question)."""
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            for part in content:
                if part.get("type") == "text":
                    return part["text"]
        elif isinstance(content, str):
            return content
    return ""


@dataclass
class _State:
    script: collections.deque = field(default_factory=collections.deque)
    requests: list[Received] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    stopping: threading.Event = field(default_factory=threading.Event)


def _choices(content: Content, body: dict[str, Any]) -> list[str]:
    n = int(body.get("n") or 1)
    value = content(body) if callable(content) else content
    if isinstance(value, str):
        return [value] * n
    return list(value)[:n]


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # silent: never print headers
        return

    def _leave(self) -> None:
        """The request stops counting as in flight (before its answer is written: once the
        client has the answer it may send the next request before this thread goes on)."""
        if getattr(self, "_counted", False):
            self._counted = False
            with self.server.state.lock:
                self.server.state.in_flight -= 1

    def _send(self, status: int, payload: bytes, headers: dict[str, str] | None = None) -> None:
        self._leave()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(payload)

    def _error(self, status: int, message: str) -> None:
        self._send(status, json.dumps({"error": {"message": message, "code": status}}).encode())

    def do_GET(self) -> None:
        vllm = self.server.vllm
        if vllm is None:  # a plain OpenAI endpoint: no health or model list
            self.send_error(501, f"Unsupported method ({self.command!r})")
        elif self.path == "/health":
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == "/v1/models":
            base = {
                "id": vllm.base,
                "object": "model",
                "root": vllm.root or vllm.base,
                "parent": None,
            }
            data = [base]
            with self.server.state.lock:
                data += [
                    {"id": n, "object": "model", "root": p, "parent": vllm.base}
                    for n, p in vllm.adapters.items()
                ]
            self._send(200, json.dumps({"object": "list", "data": data}).encode())
        else:
            self._error(404, "Not Found")

    def _vllm_lora(self, vllm: VLLMModels, body: dict[str, Any]) -> None:
        if not vllm.runtime_lora:
            return self._error(404, "Not Found")
        name = body.get("lora_name")
        with self.server.state.lock:
            if self.path.endswith("unload_lora_adapter"):
                vllm.adapters.pop(name, None)
                return self._send(200, json.dumps({"message": f"removed {name}"}).encode())
            if name in vllm.adapters:
                return self._error(400, f"The lora adapter '{name}' has already been loaded.")
            if not os.path.isdir(body.get("lora_path", "")):
                return self._error(404, f"Loading lora {name} failed: No adapter found")
            vllm.adapters[name] = body["lora_path"]
        return self._send(200, json.dumps({"message": f"added {name}"}).encode())

    def do_POST(self) -> None:
        state = self.server.state
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
        vllm = self.server.vllm
        if vllm is not None and self.path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
            return self._vllm_lora(vllm, body if isinstance(body, dict) else {})
        with state.lock:
            state.requests.append(
                Received(
                    self.path,
                    {k.lower(): v for k, v in self.headers.items()},
                    body,
                    time.monotonic(),
                )
            )
            chats = len(state.requests)
            behaviour = state.script.popleft() if state.script else self.server.default
        if vllm is not None and isinstance(body, dict) and self.path == "/v1/chat/completions":
            if vllm.die_after and chats > vllm.die_after:
                os.killpg(os.getpgid(0), signal.SIGKILL)  # a crash: the whole server, at once
            with state.lock:
                known = body.get("model") in (vllm.base, *vllm.adapters)
            if not known:
                return self._error(404, f"The model `{body.get('model')}` does not exist.")
        if not isinstance(behaviour, Behaviour):  # a router: request body -> behaviour
            behaviour = behaviour(body if isinstance(body, dict) else {})
        with state.lock:
            state.in_flight += 1
            state.max_in_flight = max(state.max_in_flight, state.in_flight)
        self._counted = True
        try:
            self._respond(behaviour, body)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout): nothing to answer
        finally:
            self._leave()

    def _respond(self, b: Behaviour, body: Any) -> None:
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._send(404, b'{"error": {"message": "not found"}}')
            return
        if not isinstance(body, dict):
            self._send(400, b'{"error": {"message": "request body is not JSON"}}')
            return
        if b.delay_s:
            # Bounded, and cut short when the server stops.
            self.server.state.stopping.wait(min(b.delay_s, self.server.max_sleep_s))
        if b.kind == "drop":
            self.close_connection = True
            return
        if b.kind == "malformed":
            self._send(200, b'{"id": "chatcmpl-x", "choices": [{"message": ')
            return
        if b.kind == "status":
            msg = b.message or f"fake error {b.status}"
            err = {"error": {"message": msg, "type": "fake", "code": None}}
            headers = {"Retry-After": b.retry_after} if b.retry_after is not None else {}
            self._send(b.status, json.dumps(err).encode(), headers)
            return
        texts = _choices(b.content if b.content is not None else "ok", body)
        prompt, completion = b.tokens or (10, sum(len(t.split()) for t in texts))
        reply: dict[str, Any] = {
            "id": f"chatcmpl-{len(self.server.state.requests)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model"),
            "choices": [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": t},
                    "finish_reason": "stop",
                    "logprobs": None,
                }
                for i, t in enumerate(texts)
            ],
        }
        if b.usage:  # the real protocol's usage object (CompletionUsage)
            reply["usage"] = {
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "total_tokens": prompt + completion,
            }
        self._send(200, json.dumps(reply).encode())


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    state: _State
    default: Behaviour | Callable[[dict[str, Any]], Behaviour]
    max_sleep_s: float
    vllm: VLLMModels | None


class FakeOpenAI:
    """The fake server; a context manager (or :meth:`start` / :meth:`stop`). ``vllm``: the vLLM
    variant (its default reply is :meth:`VLLMModels.echo` unless ``default`` is given)."""

    def __init__(
        self,
        default: Behaviour | Callable[[dict[str, Any]], Behaviour] | None = None,
        max_sleep_s: float = 5.0,
        lifetime_s: float = 120.0,
        vllm: VLLMModels | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
    ):
        self._server = _Server((host, port), _Handler)
        self._server.state = _State()
        self._server.default = default or (vllm.echo if vllm is not None else ok())
        self._server.max_sleep_s = max_sleep_s
        self._server.vllm = vllm
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        # A forgotten server stops by itself.
        self._watchdog = threading.Timer(lifetime_s, self.stop)
        self._watchdog.daemon = True
        self._started = False
        self._stopped = False

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}/v1"

    def start(self) -> FakeOpenAI:
        self._started = True
        self._thread.start()
        self._watchdog.start()
        return self

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._watchdog.cancel()
        self._server.state.stopping.set()
        if self._started:  # shutdown() waits for serve_forever, which must be running
            self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> FakeOpenAI:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def script(self, *behaviours: Behaviour) -> None:
        """Queue behaviours for the next requests, in order."""
        with self._server.state.lock:
            self._server.state.script.extend(behaviours)

    def set_default(self, behaviour: Behaviour | Callable[[dict[str, Any]], Behaviour]) -> None:
        self._server.default = behaviour

    @property
    def requests(self) -> list[Received]:
        with self._server.state.lock:
            return list(self._server.state.requests)

    @property
    def max_in_flight(self) -> int:
        return self._server.state.max_in_flight

    @property
    def pending(self) -> int:
        """Scripted behaviours not used yet."""
        with self._server.state.lock:
            return len(self._server.state.script)

    def serve_forever(self) -> None:
        """Serve in this thread until the process ends (the process form)."""
        self._server.serve_forever(poll_interval=0.05)


def main(argv: list[str] | None = None) -> int:
    """The vLLM variant as a process, in place of vLLM's server command (see the module doc)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--served-model-name", default=None)
    ap.add_argument("--lora-modules", nargs="*", default=[])
    ap.add_argument("--enable-lora", action="store_true")
    args, _unknown = ap.parse_known_args(argv)

    env = os.environ
    print("fake vLLM: starting", " ".join(sys.argv[1:]), flush=True)
    if env.get("FAKE_VLLM_EXIT_AT_START"):
        print("fake vLLM: ValueError: something is wrong with this model", flush=True)
        return int(env["FAKE_VLLM_EXIT_AT_START"])
    if env.get("FAKE_VLLM_IGNORE_TERM"):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # The "engine core": a child in the same process group, as vLLM's.
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    print(f"fake vLLM: engine core pid {child.pid}", flush=True)
    time.sleep(float(env.get("FAKE_VLLM_START_DELAY", "0")))

    models = VLLMModels(
        base=args.served_model_name or args.model,
        root=args.model,
        adapters=dict(spec.partition("=")[::2] for spec in args.lora_modules),
        runtime_lora=env.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "").lower() in ("1", "true"),
        die_after=int(env.get("FAKE_VLLM_DIE_AFTER", "0")),
        reply_delay_s=float(env.get("FAKE_VLLM_REPLY_DELAY", "0")),
    )
    lifetime = float(env.get("FAKE_VLLM_LIFETIME", "120"))
    server = FakeOpenAI(vllm=models, host=args.host, port=args.port, lifetime_s=lifetime)
    threading.Timer(lifetime, os._exit, args=(3,)).start()
    print(f"fake vLLM: listening on http://{args.host}:{args.port}", flush=True)
    try:
        server.serve_forever()
    finally:
        child.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
