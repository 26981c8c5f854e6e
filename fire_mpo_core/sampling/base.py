"""The sampling-engine contract and the resumable writer shared by every engine.

An engine turns prompts into on-policy answers::

    engine = make_engine(cfg, policy)                  # see fire_mpo_core.sampling
    items = items_from_records(records, dataset_root)  # images load lazily, when sampled
    stats = sample_to_file(engine, items, out / "rollouts.jsonl", on_reject=writer.reject)

``engine.sample(items)`` yields, per item and in input order, either its ``engine.n``
:class:`~fire_mpo_core.data.records.Rollout` rows (ids ``'<record id>#<k>'``) or one
:class:`Reject` (id = the record id, with the reason). :func:`sample_to_file` appends the rows
line by line and, called again on the same file after a crash, skips the records already
complete there, so a stage resumes record by record.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, TypeVar, runtime_checkable

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from fire_mpo_core.data.io import open_image
from fire_mpo_core.data.records import Rollout, VQARecord

__all__ = [
    "PolicyLike",
    "Reject",
    "SampleItem",
    "SampleStats",
    "SamplingEngine",
    "batched",
    "derive_seed",
    "items_from_records",
    "sample_to_file",
]

T = TypeVar("T")


class Reject(BaseModel):
    """A record the stage could not process: a line of ``rejects.jsonl``."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(description="Record id.")
    reason: str = Field(description="Why it failed (secrets redacted).")


@dataclass(frozen=True)
class SampleItem:
    """One prompt: a record id, its image (a PIL image or a zero-argument loader) and question."""

    record_id: str
    image: Image.Image | Callable[[], Image.Image]
    question: str

    def load_image(self) -> Image.Image:
        """The image as RGB (vision towers take 3 channels); loaders run only now."""
        im = self.image() if callable(self.image) else self.image
        return im if im.mode == "RGB" else im.convert("RGB")


class PolicyLike(Protocol):
    """What engines need of a policy (``fire_mpo_core.policy.PolicyRef`` fits)."""

    base: str
    adapter: str | None


@runtime_checkable
class SamplingEngine(Protocol):
    """Draws ``n`` answers per item. ``name`` is the engine's registry name, ``model_key`` what
    the rollouts record as their model. An engine that sends requests to an endpoint also sets
    ``uses_endpoint = True`` and keeps a ``usage`` ledger
    (:class:`~fire_mpo_core.openai_client.UsageLedger`), which the stage reports."""

    name: str
    n: int
    model_key: str

    def sample(self, items: list[SampleItem]) -> Iterator[Rollout | Reject]: ...


def items_from_records(records: Iterable[VQARecord], root: Path) -> list[SampleItem]:
    """Sample items for dataset records, each image opened only when an engine needs it."""
    root = Path(root)
    return [SampleItem(r.id, _Loader(root, r.image), r.question) for r in records]


@dataclass(frozen=True)
class _Loader:
    root: Path
    rel: str

    def __call__(self) -> Image.Image:
        return open_image(self.root, self.rel)


def batched(seq: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(seq), size):
        yield seq[start : start + size]


def derive_seed(seed: int, record_ids: Iterable[str]) -> int:
    """A 31-bit seed from the config seed and the ids of a batch: the same batch gets the same
    samples whether the stage ran in one go or resumed (batches of a resumed run restart from the
    first unfinished record, so their ids, not their position, must decide the seed)."""
    h = hashlib.sha256(f"{seed}\0".encode() + "\0".join(record_ids).encode())
    return int.from_bytes(h.digest()[:4], "big") & 0x7FFFFFFF


def rollouts_for(
    item: SampleItem, responses: Sequence[str], engine: str, model_key: str, seed: int
) -> list[Rollout]:
    """The rows of one item: sample k gets id ``'<record id>#<k>'``."""
    return [
        Rollout(
            id=f"{item.record_id}#{k}",
            record_id=item.record_id,
            sample_index=k,
            question=item.question,
            response=text,
            engine=engine,
            model_key=model_key,
            seed=seed,
        )
        for k, text in enumerate(responses)
    ]


def load_images(
    items: Sequence[SampleItem],
) -> tuple[list[tuple[SampleItem, Image.Image]], list[Reject]]:
    """Load the images of a batch; an unreadable image rejects its record, not the batch."""
    ok: list[tuple[SampleItem, Image.Image]] = []
    bad: list[Reject] = []
    for it in items:
        try:
            ok.append((it, it.load_image()))
        except (OSError, ValueError) as e:  # missing file, not an image, escapes the root
            bad.append(Reject(id=it.record_id, reason=f"image: {type(e).__name__}: {e}"[:500]))
    return ok, bad


# --------------------------------------------------------------------------- resumable writer


@dataclass
class SampleStats:
    """What one :func:`sample_to_file` call did."""

    records: int = 0  # records newly written (all n rollouts)
    rollouts: int = 0  # rows newly written
    skipped: int = 0  # records already complete in the file or in done_ids
    rejected: int = 0  # records the engine rejected this time
    repaired: int = 0  # rows of unfinished records (or a torn last line) dropped on resume


def _complete_records(path: Path, n: int) -> tuple[set[str], int]:
    """Record ids with all ``n`` rollouts in ``path``; rewrites the file without the rows of
    unfinished records and any torn line (a crash mid-write), so they are redone whole."""
    if not path.exists():
        return set(), 0
    rows: list[tuple[str, bytes]] = []
    dropped = 0
    with path.open("rb") as f:
        for raw in f:
            if not raw.endswith(b"\n"):  # torn last line
                dropped += 1
                continue
            try:
                r = Rollout.model_validate(json.loads(raw))
            except (ValueError, ValidationError):
                dropped += 1
                continue
            rows.append((r.record_id, raw))
    counts = Counter(rid for rid, _ in rows)
    done = {rid for rid, c in counts.items() if c >= n}
    keep = [raw for rid, raw in rows if rid in done]
    dropped += len(rows) - len(keep)
    if dropped:
        tmp = path.with_name(f".{path.name}.repair")
        with tmp.open("wb") as f:
            f.writelines(keep)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return done, dropped


def sample_to_file(
    engine: SamplingEngine,
    items: Iterable[SampleItem],
    out_path: Path,
    done_ids: Iterable[str] = (),
    on_reject: Callable[[str, str], None] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> SampleStats:
    """Append the engine's rollouts for ``items`` to ``out_path`` (JSONL), resumably.

    Records already complete in the file (all ``engine.n`` rows) and ids in ``done_ids`` are
    skipped; rows of a record left unfinished by a crash are dropped first and the record is
    sampled again. Every row is flushed as it is written. Rejected records go to
    ``on_reject(id, reason)`` (e.g. ``StageWriter.reject``) and are not written, so a later call
    tries them again. ``on_progress(done, total)`` is called as records finish (counting the
    ones already in the file), e.g. to update a dashboard progress bar.
    """
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    stats = SampleStats()
    done, stats.repaired = _complete_records(out_path, engine.n)
    done |= set(done_ids)
    todo: list[SampleItem] = []
    seen: set[str] = set()
    for it in items:
        if it.record_id in done or it.record_id in seen:
            stats.skipped += it.record_id in done
            continue
        seen.add(it.record_id)
        todo.append(it)
    total = stats.skipped + len(todo)
    if on_progress is not None:
        on_progress(stats.skipped, total)
    if not todo:
        return stats
    with out_path.open("a", encoding="utf-8") as f:
        current, count = None, 0
        for row in engine.sample(todo):
            if isinstance(row, Reject):
                stats.rejected += 1
                if on_reject is not None:
                    on_reject(row.id, row.reason)
                if on_progress is not None:
                    on_progress(stats.skipped + stats.records + stats.rejected, total)
                continue
            f.write(json.dumps(row.model_dump(mode="json"), ensure_ascii=False, sort_keys=True))
            f.write("\n")
            f.flush()
            stats.rollouts += 1
            if row.record_id != current:
                current, count = row.record_id, 0
            count += 1
            if count == engine.n:
                stats.records += 1
                if on_progress is not None:
                    on_progress(stats.skipped + stats.records + stats.rejected, total)
        os.fsync(f.fileno())
    return stats
