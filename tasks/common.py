"""Shared machinery of the stage tasks: the call contract, content-keyed caching, dashboard output.

Each stage module in `tasks/` defines a body ``body(call, writer) -> counts`` that resolves its
inputs from the store and calls `fire_mpo_core`, then turns it into a Prefect task with
:func:`stage_task`. Tasks take one :class:`StageCall` and return the output folder's path (a
string): stages never pass objects, only artifacts.

Caching: Prefect's cache key is the store's content key (input content digests + stage config +
code version, the digest of the task module's import closure: fire_mpo_core.code_version). If
that output folder is missing or unfinished, the stale cache record is forgotten first, so
deleting an artifact reruns the stage.

Events and lineage (tasks/events.py): every stage emits `fire-mpo.stage.completed`, computed
(here, in the task) or Cached (:func:`publish_cached_summary`, from the flow), and each task is a
`MaterializingTask` whose output folder is a Prefect asset with its input folders upstream
(:func:`for_call` sets both per call).
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from time import monotonic
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import (
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext
from prefect.exceptions import MissingContextError
from prefect.tasks import MaterializingTask, Task
from pydantic import BaseModel, ConfigDict, Field

from fire_mpo_core.code_version import code_version
from fire_mpo_core.openai_client import set_secret_resolver
from fire_mpo_core.schema import StageName
from fire_mpo_core.store import (
    DATA,
    REJECTS,
    ArtifactStore,
    StageResult,
    StageWriter,
    TooManyRejects,
    is_finished,
    read_manifest,
    stage_key,
)
from tasks import events

CACHE_DIR = "_prefect"  # inside the store root: Prefect's cache records and results


def _prefect_secret(name: str) -> str:
    """An API key from the Prefect Secret block `name` (`openai.api_key_secret`)."""
    from prefect.blocks.system import Secret

    return str(Secret.load(name).get())


# Endpoint configs may name a Prefect Secret block instead of an environment variable.
set_secret_resolver(_prefect_secret)


class StageCall(BaseModel):
    """Everything a stage task needs; one pydantic model in, one folder path out."""

    model_config = ConfigDict(extra="forbid")

    store: Path = Field(description="Artifact store root.")
    run: str = Field(description="Run name inside the store.")
    round: int = Field(ge=0, description="0 for setup stages, k >= 1 for alignment rounds.")
    stage: StageName
    config: dict[str, Any] = Field(description="The stage's config (model_dump of its model).")
    inputs: dict[str, Path] = Field(
        default_factory=dict, description="Named finished input stage folders."
    )
    refresh: bool = Field(default=False, description="Recompute even if a finished output exists.")
    threads: int | None = Field(
        default=None, ge=1, description="torch intra-op threads for this stage (None: default)."
    )

    def key(self, code: str) -> str:
        return stage_key(self.stage, self.config, self.inputs, code)

    def output_dir(self, code: str) -> Path:
        return ArtifactStore(self.store).stage_dir(self.run, self.round, self.stage, self.key(code))


@dataclass
class StageCachePolicy(CachePolicy):
    """Cache key = the store's content key; a missing output folder invalidates the record."""

    code: str = ""

    def compute_key(
        self,
        task_ctx: TaskRunContext,
        inputs: dict[str, Any],
        flow_parameters: dict[str, Any],
        **kwargs: Any,
    ) -> str | None:
        call = inputs["call"]
        if not isinstance(call, StageCall):
            call = StageCall.model_validate(call)
        if call.refresh:
            return None
        # The record's result is the output folder's absolute path, so the key names the store's
        # location too: a store moved or copied elsewhere finds its folders again (run_stage
        # returns them without recomputing) instead of a cached path into the old location.
        where = hashlib.sha256(str(Path(call.store).resolve()).encode()).hexdigest()[:8]
        cache_key = f"{call.run}-r{call.round}-{call.stage}-{call.key(self.code)}-{where}"
        if not is_finished(call.output_dir(self.code)) and self.key_storage is not None:
            (Path(self.key_storage) / cache_key).unlink(missing_ok=True)
        return cache_key


Body = Callable[[StageCall, StageWriter], dict[str, Any] | None]


def retry_condition(resumable: bool) -> Callable[[Any, Any, Any], bool]:
    """Prefect's `retry_condition_fn`: a retry only where it can help. A store that is not a
    writable folder fails the same way again, and so do too many rejects in a stage that
    recomputes from scratch (they cost a 38 s retry and a second traceback). A resumable,
    endpoint-facing stage retries its rejects: the retry asks again only for what failed."""

    def worth_retrying(_task: Any, _run: Any, state: Any) -> bool:
        exc = state.data if isinstance(state.data, BaseException) else None
        if isinstance(exc, NotADirectoryError | PermissionError):
            return False
        if isinstance(exc, TooManyRejects):
            return resumable
        return not (isinstance(exc, OSError) and exc.errno == errno.EROFS)

    return worth_retrying


def stage_task(
    stage: StageName,
    body: Body,
    *,
    retries: int = 1,
    retry_delay_seconds: float | list[float] = 2,
    tags: Sequence[str] = (),
    resumable: bool = False,
) -> Task[[StageCall], str]:
    """Build the Prefect task of one stage around its body. Its code version is the digest of
    the body's module and every project module it imports (:mod:`fire_mpo_core.code_version`)."""
    code = code_version(body.__module__)

    def run(call: StageCall) -> str:
        if call.threads:
            import torch

            torch.set_num_threads(call.threads)
        res = ArtifactStore(call.store).run_stage(
            run=call.run,
            round_=call.round,
            stage=call.stage,
            config=call.config,
            inputs=call.inputs,
            code=code,
            fn=lambda writer: body(call, writer),
            refresh=call.refresh,
            resumable=resumable,
            max_reject_fraction=call.config.get("max_reject_fraction"),
        )
        publish_summary(call, res)
        events.describe_materialization(res)
        events.emit_stage_events(call, res)
        warn_rejects(call, res)
        return str(res.path)

    run.__name__ = f"stage_{stage}"
    run.__qualname__ = run.__name__
    run.__module__ = body.__module__
    # No asset until a call names its folder (for_call): without one it runs as a plain task.
    return MaterializingTask(
        run,
        assets=[],
        materialized_by="fire-mpo",
        name=stage,
        task_run_name=f"{stage}-r{{call.round}}",
        cache_policy=StageCachePolicy(code=code),
        persist_result=True,
        result_serializer="json",
        retries=retries,
        retry_delay_seconds=retry_delay_seconds,
        retry_condition_fn=retry_condition(resumable),
        tags=list(tags),
    )


def bind(t: Task[[StageCall], str], store: Path) -> Task[[StageCall], str]:
    """Point a stage task's cache records and results at `<store>/_prefect`."""
    cache_dir = Path(store).resolve() / CACHE_DIR
    policy = t.cache_policy
    assert isinstance(policy, StageCachePolicy)
    # Separate folders: with one, a record's metadata (named by the cache key) and its result
    # (named by the storage key, which Prefect also derives from the cache key) collide.
    return t.with_options(
        cache_policy=policy.configure(key_storage=cache_dir / "keys"),
        result_storage=cache_dir / "results",
    )


def for_call(t: Task[[StageCall], str], call: StageCall) -> Task[[StageCall], str]:
    """The stage task bound to the call's store (:func:`bind`) and materialising the call's
    output folder as a Prefect asset, its input folders as upstream assets."""
    bound = bind(t, call.store)
    out, upstream = events.stage_assets(call, call.output_dir(t.cache_policy.code))
    if out is None or not isinstance(bound, MaterializingTask):
        return bound
    return bound.with_options(assets=[out], asset_deps=upstream)


def run_stage_task(t: Task[[StageCall], str], call: StageCall) -> str:
    """Run a stage task in the current flow (:func:`for_call`) and return its output folder;
    for a Cached run (its function did not run) publish its table and events from here."""
    state = for_call(t, call)(call, return_state=True)
    path = state.result()
    if state.name == "Cached":
        publish_cached_summary(call, path)
    return path


def publish_summary(call: StageCall, res: StageResult) -> None:
    """A per-stage table on the dashboard: counts, rejects by reason, time, cache hit."""
    m = res.manifest
    # A body's own "seconds" (e.g. SFT's training time) would repeat the stage's row below.
    counts = {k: v for k, v in m.get("counts", {}).items() if k != "seconds"}
    # None is a count that was not measured (e.g. llm_cost_usd without prices): say so.
    rows = [{"metric": k, "value": "n/a" if v is None else v} for k, v in sorted(counts.items())]
    rows += [
        {"metric": f"rejects: {reason}", "value": n}
        for reason, n in rejects_by_reason(res.path / REJECTS).most_common(10)
    ]
    rows += [
        {"metric": "seconds", "value": m.get("seconds")},
        {"metric": "cache_hit", "value": res.cached},
        {"metric": "key", "value": res.key},
        {"metric": "path", "value": str(res.path)},
    ]
    create_table_artifact(
        rows,
        key=artifact_key(f"{call.run}-r{call.round}-{call.stage}"),
        description=f"Stage `{call.stage}` of run `{call.run}`, round {call.round}",
    )


def publish_cached_summary(call: StageCall, path: str) -> None:
    """The stage table and events for a stage Prefect served from its cache (its function did
    not run, so it published nothing): the same table, from the finished folder's manifest."""
    m = read_manifest(Path(path))
    res = StageResult(Path(path), m["key"], True, m)
    publish_summary(call, res)
    events.emit_stage_events(call, res)


def warn_rejects(call: StageCall, res: StageResult) -> None:
    """One warning line whenever a stage rejected anything: counts, top reasons, where."""
    reasons = rejects_by_reason(res.path / REJECTS)
    n = sum(reasons.values())
    if not n:
        return
    data = res.path / DATA
    kept = sum(1 for ln in data.open("rb") if ln.strip()) if data.is_file() else 0
    top = "; ".join(f"{k} x {why}" for why, k in reasons.most_common(3))
    task_logger(call.stage).warning(
        f"{call.stage}-r{call.round}: {n} of {n + kept} records rejected ({n / (n + kept):.0%})"
        f"{' (cached)' if res.cached else ''}: {top}; see {res.path / REJECTS}"
    )


def task_logger(name: str) -> Any:
    """The Prefect run logger, or plain logging (``fire_mpo.<name>``) when a task's function is
    called directly (tests, scripts)."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(f"fire_mpo.{name}")


def rejects_by_reason(path: Path) -> Counter[str]:
    """Reject counts by reason kind: the reason up to its first ':' (e.g. a judge's code, or
    "corruption failed"), so ids and file names in the text do not split the counts."""
    out: Counter[str] = Counter()
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                reason = str(json.loads(line).get("reason", "?"))
            except (ValueError, AttributeError):
                continue
            out[reason.split(":", 1)[0].strip()[:80] or "?"] += 1
    return out


def artifact_key(text: str) -> str:
    """Prefect artifact keys allow lowercase letters, digits and dashes only."""
    out = "".join(c if c.isalnum() else "-" for c in text.lower())
    return "-".join(filter(None, out.split("-")))


class Progress:
    """A dashboard progress bar for a long stage, throttled so that a stage of thousands of
    records makes tens of API calls, not thousands: `Progress(desc)(done, total)`."""

    def __init__(self, description: str, min_seconds: float = 2.0, min_percent: float = 5.0):
        self.id = create_progress_artifact(0.0, description=description)
        self.min_seconds, self.min_percent = min_seconds, min_percent
        self._last_t, self._last_p = monotonic(), 0.0

    def __call__(self, done: int, total: int, *_: Any) -> None:
        pct = 100.0 * done / max(1, total)
        now = monotonic()
        due = pct - self._last_p >= self.min_percent or now - self._last_t >= self.min_seconds
        if pct >= 100.0 or (due and pct > self._last_p):
            update_progress_artifact(self.id, pct)
            self._last_t, self._last_p = now, pct
