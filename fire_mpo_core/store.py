"""The artifact store: stages share data only through folders on disk (docs/design.md section 3).

Layout::

    <root>/<run>/round-<k>/<stage>/<key>/
        data.jsonl       one validated record a line (or a model / adapter / images folder)
        rejects.jsonl    records that failed, each with its id and reason
        manifest.json    written last: stage, key, config, inputs, counts, code version, timings

`key` hashes everything the output depends on (input content digests, the stage config, the
stage's code version), so equal keys mean equal outputs and a rerun can skip the work. A stage is
built in a private temporary folder and renamed into place only after its manifest is written, so
a folder without a manifest is never read as finished. Two processes building the same key
serialise on a lock file; the second finds the first's result and returns it.

Usage::

    store = ArtifactStore("store")
    result = store.run_stage(run="r", round_=0, stage="prepare", config=cfg.model_dump(),
                             inputs={}, code=code_version("tasks.prepare"), fn=build)

where ``code_version`` (:mod:`fire_mpo_core.code_version`) digests the stage's import closure
and ``build(writer)`` writes files under ``writer.path``, calls ``writer.reject(id, reason)``
for bad records and returns a dict of counts.
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from fire_mpo_core.faults import fault_point

MANIFEST = "manifest.json"
DATA = "data.jsonl"
REJECTS = "rejects.jsonl"
KEY_LEN = 16

M = TypeVar("M", bound=BaseModel)


# --------------------------------------------------------------------------- hashing


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace, stable across runs (Paths become strings)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


#: Outputs that are not results. They differ between two runs of the same computation (times,
#: host names, write order of logs), so they stay out of the content digest: a rerun that
#: reproduces the same result must leave every key downstream unchanged. Folders by name, at
#: any depth; files by glob; and in .json / .jsonl files, keys named like a duration or a
#: clock time; in .md files, lines that report one. Model cards (``README.md``: peft's, and the
#: one the loop's promotion writes into the best round's finished ``adapter/``) are
#: documentation about results, rewritten after the stage finished: left out, so a promotion
#: leaves the folder matching its manifest and no key downstream moves (fire_mpo_core/loop).
VOLATILE_DIRS = frozenset({"tensorboard"})
VOLATILE_FILES = ("events.out.tfevents.*", "*.log", "timings.json", "README.md")
_TIMINGS = r"(seconds|elapsed|per_second|per_s|started_at|finished_at)"
_TIMING_KEY = re.compile(rf"(^|_){_TIMINGS}$")
_HAS_TIMING_KEY = re.compile(rf'"(\w+_)?{_TIMINGS}"\s*:'.encode())
_TIMING_LINE = re.compile(rb"^.*(seconds|per_second|per_s\b).*$", re.M)


def is_volatile(rel: str) -> bool:
    """Whether the output file at relative path `rel` is a log or timing, not a result."""
    *dirs, name = rel.split("/")
    return any(d in VOLATILE_DIRS for d in dirs) or any(
        fnmatch.fnmatchcase(name, pat) for pat in VOLATILE_FILES
    )


def _drop_timings(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _drop_timings(v) for k, v in obj.items() if not _TIMING_KEY.search(str(k))}
    if isinstance(obj, list):
        return [_drop_timings(v) for v in obj]
    return obj


def _result_bytes(rel: str, data: bytes) -> bytes:
    """The bytes of a file as far as its results go: timing keys and lines taken out."""
    if rel.endswith((".json", ".jsonl")) and _HAS_TIMING_KEY.search(data):
        try:
            if rel.endswith(".json"):
                return canonical_json(_drop_timings(json.loads(data))).encode()
            return b"\n".join(
                canonical_json(_drop_timings(json.loads(ln))).encode()
                for ln in data.splitlines()
                if ln.strip()
            )
        except ValueError:  # not JSON after all: its bytes as they are
            return data
    if rel.endswith(".md"):
        return _TIMING_LINE.sub(b"", data)
    return data


def digest_files(root: Path, exclude: Iterable[str] = (MANIFEST,)) -> str:
    """sha256 over the results below `root` (relative path + bytes), in sorted order.

    Logs and timings (:func:`is_volatile`, timing keys and lines) are left out; see above.
    """
    h = hashlib.sha256()
    skip = set(exclude)
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if not p.is_file() or rel in skip or is_volatile(rel):
            continue
        h.update(rel.encode() + b"\0")
        if rel.endswith((".json", ".jsonl", ".md")):
            h.update(_result_bytes(rel, p.read_bytes()))
        else:
            with p.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        h.update(b"\0")
    return h.hexdigest()


def stage_key(stage: str, config: Any, inputs: dict[str, Path], code: str) -> str:
    """Content key of a stage output: hash of its config, its inputs' content digests and code."""
    input_digests = {name: read_manifest(p)["content_digest"] for name, p in sorted(inputs.items())}
    payload = {"stage": stage, "config": config, "inputs": input_digests, "code": code}
    return hashlib.sha256(canonical_json(payload).encode()).hexdigest()[:KEY_LEN]


# --------------------------------------------------------------------------- records


def write_jsonl(path: Path, records: Iterable[BaseModel | dict[str, Any]]) -> int:
    """Write records one JSON object a line (stable key order); returns the count."""
    n = 0
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            obj = r.model_dump(mode="json") if isinstance(r, BaseModel) else r
            fault_point("store.write")
            f.write(json.dumps(obj, ensure_ascii=False, sort_keys=True) + "\n")
            n += 1
    return n


def read_jsonl(
    path: Path, model: type[M], on_reject: Callable[[str, str], None] | None = None
) -> Iterator[M]:
    """Yield validated records; a bad line is passed to `on_reject(id, reason)` (or raises)."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            rid = f"{path.name}:{lineno}"
            fault_point("store.read")
            try:
                obj = json.loads(raw.decode("utf-8"))
                if isinstance(obj, dict) and isinstance(obj.get("id"), str):
                    rid = obj["id"]
                yield model.model_validate(obj)
            except ValidationError as e:
                reason = "; ".join(
                    f"{'.'.join(map(str, err['loc'])) or '<record>'}: {err['msg']}"
                    for err in e.errors()
                )[:500]
                if on_reject is None:
                    raise ValueError(f"{path}: record {rid}: {reason}") from e
                on_reject(rid, reason)
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                reason = f"{type(e).__name__}: {str(e)[:300]}"
                if on_reject is None:
                    raise ValueError(f"{path}: record {rid}: {reason}") from e
                on_reject(rid, reason)


def read_manifest(stage_dir: Path) -> dict[str, Any]:
    """The manifest of a finished stage folder; raises FileNotFoundError if unfinished."""
    p = Path(stage_dir) / MANIFEST
    if not p.is_file():
        raise FileNotFoundError(f"{stage_dir} is not a finished stage output (no {MANIFEST})")
    return json.loads(p.read_text())


def input_dirs(stage_dir: Path) -> dict[str, Path]:
    """The input folders a finished stage was built from, as absolute paths. The manifest
    keeps them relative to the store root (``<run>/round-<k>/<stage>/<key>``), so a store that
    is moved or copied whole still resolves them; inputs from outside the store stay absolute."""
    stage_dir = Path(stage_dir)
    root = stage_dir.resolve().parents[3]  # <root>/<run>/round-<k>/<stage>/<key>
    return {n: root / v["path"] for n, v in read_manifest(stage_dir)["inputs"].items()}


def is_finished(stage_dir: Path) -> bool:
    try:
        read_manifest(stage_dir)
        return True
    except (FileNotFoundError, json.JSONDecodeError):
        return False


# --------------------------------------------------------------------------- writing


@dataclass
class StageWriter:
    """Handle given to a stage body: write under `path`, reject bad records, add counts."""

    path: Path
    rejects: list[dict[str, str]] = field(default_factory=list)
    #: Working files (e.g. a resume journal) removed once the stage has succeeded, just before
    #: its manifest: kept when it fails, so a rerun of a resumable stage can use them.
    scratch: list[Path] = field(default_factory=list)

    def reject(self, record_id: str, reason: str) -> None:
        fault_point("store.reject")
        self.rejects.append({"id": str(record_id), "reason": reason})


@dataclass(frozen=True)
class StageResult:
    path: Path
    key: str
    cached: bool
    manifest: dict[str, Any]


class ArtifactStore:
    """Content-keyed stage outputs under one root folder."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()

    def _in_store(self, path: Path) -> str:
        """A path as a manifest records it: relative to the root when inside the store (so the
        store can move), else absolute. :func:`input_dirs` reads it back."""
        path = Path(path).resolve()
        return (
            path.relative_to(self.root).as_posix() if path.is_relative_to(self.root) else str(path)
        )

    def stage_root(self, run: str, round_: int, stage: str) -> Path:
        return self.root / run / f"round-{round_}" / stage

    def stage_dir(self, run: str, round_: int, stage: str, key: str) -> Path:
        return self.stage_root(run, round_, stage) / key

    def latest(self, run: str, round_: int, stage: str) -> Path | None:
        """The most recently finished output of a stage, or None."""
        root = self.stage_root(run, round_, stage)
        # Dot-folders are working folders (.tmp-*, .partial-*, .old-*): a crash can leave one
        # with a manifest, but it is never a finished output.
        done = [
            p
            for p in root.glob("*")
            if not p.name.startswith(".") and p.is_dir() and is_finished(p)
        ]
        if not done:
            return None
        return max(done, key=lambda p: (read_manifest(p)["finished_at"], p.name))

    def latest_round(self, run: str, stage: str) -> int | None:
        """Highest round with a finished output of `stage`, or None."""
        rounds = sorted(
            (int(p.name.split("-", 1)[1]) for p in (self.root / run).glob("round-*")),
            reverse=True,
        )
        return next((k for k in rounds if self.latest(run, k, stage)), None)

    @contextlib.contextmanager
    def _lock(self, path: Path) -> Iterator[None]:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def run_stage(
        self,
        *,
        run: str,
        round_: int,
        stage: str,
        config: dict[str, Any],
        inputs: dict[str, Path],
        code: str,
        fn: Callable[[StageWriter], dict[str, Any] | None],
        refresh: bool = False,
        resumable: bool = False,
        max_reject_fraction: float | None = None,
    ) -> StageResult:
        """Build a stage output unless a finished one with the same key exists.

        `fn` writes into a private temporary folder; the manifest is written last and the folder
        renamed into place atomically. Concurrent callers with the same key serialise on a lock
        and the later ones return the finished result. With `resumable`, the working folder is
        `.partial-<key>` and survives a failure, so a rerun's `fn` finds what was already
        written there (record-by-record resume); it is still only renamed into place when done.

        With `max_reject_fraction`, a stage whose rejects exceed that share of its outcomes
        (rejects / (rejects + rows of `data.jsonl`); a record sampled n times is n rows) fails
        with :class:`TooManyRejects`, whose message summarises the reasons, instead of
        finishing; a resumable working folder is kept for the rerun.
        """
        key = stage_key(stage, config, inputs, code)
        final = self.stage_dir(run, round_, stage, key)
        if not refresh and is_finished(final):
            return StageResult(final, key, True, read_manifest(final))
        with self._lock(final.parent / f".{key}.lock"):
            if not refresh and is_finished(final):
                return StageResult(final, key, True, read_manifest(final))
            tmp = self._working_dir(final, key, resumable, refresh)
            try:
                writer = StageWriter(tmp)
                t0, started = time.perf_counter(), time.time()
                counts = dict(fn(writer) or {})
                write_jsonl(tmp / REJECTS, writer.rejects)
                counts.setdefault("rejects", len(writer.rejects))
                if max_reject_fraction is not None:
                    _check_reject_fraction(stage, tmp, writer, max_reject_fraction)
                for p in writer.scratch:
                    p.unlink(missing_ok=True)
                fault_point("store.before_manifest")
                manifest = {
                    "stage": stage,
                    "key": key,
                    "run": run,
                    "round": round_,
                    "config": config,
                    "inputs": {
                        n: {"path": self._in_store(p), "key": read_manifest(p)["key"]}
                        for n, p in sorted(inputs.items())
                    },
                    "code_version": code,
                    "counts": counts,
                    "content_digest": digest_files(tmp),
                    "started_at": started,
                    "finished_at": time.time(),
                    "seconds": round(time.perf_counter() - t0, 3),
                }
                _write_atomic(tmp / MANIFEST, json.dumps(manifest, indent=2, default=str))
                fault_point("store.before_rename")
                _move_into_place(tmp, final, key)
                fault_point("store.after_rename")
            except BaseException:
                if not resumable:
                    shutil.rmtree(tmp, ignore_errors=True)
                raise
        return StageResult(final, key, False, manifest)

    @staticmethod
    def _working_dir(final: Path, key: str, resumable: bool, refresh: bool) -> Path:
        """The folder a stage builds in (the caller holds the key's lock). Every other working
        folder of this key is a dead process's leftover (a kill leaves them; nothing else
        writes them). Resumable: `.partial-<key>`, kept across failures; else a fresh one."""
        for stale in [*final.parent.glob(f".tmp-{key}-*"), *final.parent.glob(f".old-{key}-*")]:
            shutil.rmtree(stale, ignore_errors=True)
        if not resumable:
            tmp = final.parent / f".tmp-{key}-{uuid.uuid4().hex[:8]}"
            tmp.mkdir(parents=True)
            return tmp
        tmp = final.parent / f".partial-{key}"
        if refresh:
            shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True, exist_ok=True)
        # A kill after the manifest (or mid-way through writing it) must not leave its files in
        # the digest of the resumed output.
        for leftover in [tmp / MANIFEST, *tmp.glob(f".{MANIFEST}.*")]:
            leftover.unlink(missing_ok=True)
        return tmp


def _move_into_place(tmp: Path, final: Path, key: str) -> None:
    """Rename a finished working folder to its final name. Unfinished leftovers (no manifest)
    or a forced refresh's old folder are moved aside in one rename, not deleted in place: a kill
    in the middle of a delete could leave a folder that still has its manifest but lost files."""
    if final.exists():
        old = final.parent / f".old-{key}-{uuid.uuid4().hex[:8]}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


class TooManyRejects(RuntimeError):
    """A stage rejected more than its configured share of records; the message summarises."""


def _check_reject_fraction(stage: str, tmp: Path, writer: StageWriter, limit: float) -> None:
    n_rej = len(writer.rejects)
    data = tmp / DATA
    total = n_rej + (sum(1 for ln in data.open("rb") if ln.strip()) if data.is_file() else 0)
    frac = n_rej / total if total else 0.0
    if frac <= limit:
        return
    reasons = Counter(r["reason"].split(":", 1)[0][:80] for r in writer.rejects)
    top = "; ".join(f"{n} x {why}" for why, n in reasons.most_common(5))
    ids = ", ".join(r["id"] for r in writer.rejects[:5])
    raise TooManyRejects(
        f"stage {stage!r}: {n_rej} of {total} records rejected ({frac:.1%} > "
        f"max_reject_fraction {limit:.1%}); most common reasons: {top}; first ids: {ids}"
    )


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    with tmp.open("w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
