"""A stand-in for vLLM's OpenAI server process, for the fast lifecycle tests of the
`vllm_server` engine (no vLLM needed)::

    python -m tests.fake_vllm_server --model BASE --host 127.0.0.1 --port P \\
        --served-model-name base [--enable-lora --lora-modules name=path ...] [other vLLM flags]

It speaks the parts of the protocol the engine uses, as vLLM 0.32 answers them: ``GET /health``,
``GET /v1/models`` (the base with ``parent: null``, adapters with ``parent: <base>``),
``POST /v1/load_lora_adapter`` / ``unload_lora_adapter`` (only with
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``; 400 "already been loaded" on a repeat) and
``POST /v1/chat/completions`` (404 for an unknown model; ``n`` choices, each
``"<model>|<question>|<k>"``). Like vLLM it starts a child process (its "engine core"), so a test
can check that the whole process group is stopped. Unknown flags are ignored.

Behaviour from the environment: ``FAKE_VLLM_START_DELAY`` (seconds before listening),
``FAKE_VLLM_EXIT_AT_START`` (exit code, after printing an error), ``FAKE_VLLM_DIE_AFTER`` (die
with SIGKILL after that many chat requests, mid-stage), ``FAKE_VLLM_REPLY_DELAY`` (seconds per
chat request), ``FAKE_VLLM_IGNORE_TERM`` (ignore SIGTERM, so stop() must SIGKILL), and
``FAKE_VLLM_LIFETIME`` (exit by itself after that many seconds; default 120).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def _question(messages: list) -> str:
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            for part in content:
                if part.get("type") == "text":
                    return part["text"]
        elif isinstance(content, str):
            return content
    return ""


def main(argv: list[str] | None = None) -> int:
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

    base = args.served_model_name or args.model
    adapters: dict[str, str] = {}
    for spec in args.lora_modules:
        name, _, path = spec.partition("=")
        adapters[name] = path
    runtime = env.get("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "").lower() in ("1", "true")
    die_after = int(env.get("FAKE_VLLM_DIE_AFTER", "0"))
    reply_delay = float(env.get("FAKE_VLLM_REPLY_DELAY", "0"))
    lock = threading.Lock()
    counter = {"chat": 0}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format, *a):  # quiet
            return

        def _send(self, status: int, payload: dict) -> None:
            body = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _err(self, status: int, message: str) -> None:
            self._send(status, {"error": {"message": message, "code": status}})

        def do_GET(self) -> None:
            if self.path == "/health":
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()
            elif self.path == "/v1/models":
                data = [{"id": base, "object": "model", "root": args.model, "parent": None}]
                with lock:
                    data += [
                        {"id": n, "object": "model", "root": p, "parent": base}
                        for n, p in adapters.items()
                    ]
                self._send(200, {"object": "list", "data": data})
            else:
                self._err(404, "Not Found")

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            body = json.loads(raw or b"{}")
            if self.path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
                if not runtime:
                    return self._err(404, "Not Found")
                name = body.get("lora_name")
                with lock:
                    if self.path.endswith("unload_lora_adapter"):
                        adapters.pop(name, None)
                        return self._send(200, {"message": f"removed {name}"})
                    if name in adapters:
                        return self._err(400, f"The lora adapter '{name}' has already been loaded.")
                    if not os.path.isdir(body.get("lora_path", "")):
                        return self._err(404, f"Loading lora {name} failed: No adapter found")
                    adapters[name] = body["lora_path"]
                return self._send(200, {"message": f"added {name}"})
            if self.path != "/v1/chat/completions":
                return self._err(404, "Not Found")
            model = body.get("model")
            with lock:
                known = model == base or model in adapters
                counter["chat"] += 1
                count = counter["chat"]
            if die_after and count > die_after:
                os.killpg(os.getpgid(0), signal.SIGKILL)  # a crash: the whole server, at once
            if not known:
                return self._err(404, f"The model `{model}` does not exist.")
            if reply_delay:
                time.sleep(reply_delay)
            q = _question(body.get("messages", []))
            n = int(body.get("n") or 1)
            choices = [
                {
                    "index": k,
                    "message": {"role": "assistant", "content": f"{model}|{q}|{k}"},
                    "finish_reason": "stop",
                }
                for k in range(n)
            ]
            self._send(
                200,
                {
                    "id": f"chatcmpl-{count}",
                    "object": "chat.completion",
                    "created": int(time.time()),
                    "model": model,
                    "choices": choices,
                    "usage": {"prompt_tokens": 1, "completion_tokens": n, "total_tokens": 1 + n},
                },
            )

    server = ThreadingHTTPServer((args.host, args.port), Handler)
    server.daemon_threads = True
    threading.Timer(float(env.get("FAKE_VLLM_LIFETIME", "120")), os._exit, args=(3,)).start()
    print(f"fake vLLM: listening on http://{args.host}:{args.port}", flush=True)
    try:
        server.serve_forever(poll_interval=0.05)
    finally:
        child.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
