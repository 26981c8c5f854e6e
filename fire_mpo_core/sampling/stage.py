"""The `sample` stage's contract and its one entry point, :func:`run_sample`.

Inputs: the `prepare` folder (dataset) and the `policy` folder (the SFT base in round 1, round
k-1's `train` after). Output: ``data.jsonl`` of :class:`~fire_mpo_core.data.records.Rollout`
rows, written record by record, so a crashed or retried run continues where it stopped::

    from fire_mpo_core.sampling.stage import SampleInputs, run_sample
    counts = run_sample(SampleInputs(prepare=..., policy=...), SampleConfig(), out_dir,
                        reject=lambda id, reason: print(id, reason), scratch=[])

With ``engine: vllm_server`` the stage starts the round's vLLM server (or attaches to one) and
always stops it; its log is written to ``out_dir`` and added to ``scratch`` (deleted once the
stage succeeds, kept for a look when it fails). Engines that send requests to an endpoint
(``openai``, ``vllm_server``) report their requests, retries, tokens and estimated cost
(``llm_*`` counts); the local ones (``hf``, ``vllm``) do not.

The Prefect task (`tasks/sample.py`) only resolves the folders, passes its progress bar and
publishes the counts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from fire_mpo_core.data.io import load_records
from fire_mpo_core.openai_client import LLMUsage, estimate_cost
from fire_mpo_core.policy import read_policy
from fire_mpo_core.sampling import SampleConfig, items_from_records, make_engine, sample_to_file
from fire_mpo_core.sampling.base import SamplingEngine
from fire_mpo_core.store import DATA, read_manifest

SERVER_LOG = "vllm_server.log"

Reject = Callable[[str, str], None]
Progress = Callable[[int, int], None]


class SampleInputs(BaseModel):
    """The folders the stage reads."""

    model_config = ConfigDict(frozen=True)

    prepare: Path = Field(description="The dataset root: records and images.")
    policy: Path = Field(description="A stage folder with a policy.json (its key names rows).")


class SampleCounts(BaseModel):
    """What the stage reports (manifest counts, dashboard table)."""

    records_in: int = Field(description="Records of the split (after max_records).")
    records: int = Field(description="Records newly written (all n rollouts).")
    rollouts: int = Field(description="Rows newly written.")
    skipped: int = Field(description="Records already complete from an earlier attempt.")
    rejected: int = Field(description="Records the engine rejected in this attempt.")
    repaired: int = Field(description="Rows of unfinished records dropped on resume.")
    server: dict[str, Any] | None = Field(
        default=None, description="What a vllm_server engine did (start and load seconds ...)."
    )
    llm: LLMUsage | None = Field(
        default=None, description="The endpoint's usage by this attempt; None: local engine."
    )
    llm_cost_usd: float | None = Field(
        default=None, description="Estimated cost of `llm` (None: no prices configured)."
    )

    def as_counts(self) -> dict[str, Any]:
        out = self.model_dump(exclude={"server", "llm", "llm_cost_usd"})
        if self.server:
            out["server"] = self.server
        if self.llm is not None:  # an hf / vllm table stays free of llm_* zeros
            out |= self.llm.as_counts(self.llm_cost_usd)
        return out


def _engine(inputs: SampleInputs, cfg: SampleConfig, out_dir: Path, scratch: list[Path]):
    log_path = None
    if cfg.engine == "vllm_server":
        log_path = out_dir / SERVER_LOG
        scratch.append(log_path)
    return make_engine(
        cfg,
        read_policy(inputs.policy) if cfg.engine != "openai" else None,
        model_key=read_manifest(inputs.policy)["key"],
        log_path=log_path,
    )


def _usage(engine: SamplingEngine, cfg: SampleConfig) -> tuple[LLMUsage | None, float | None]:
    if not getattr(engine, "uses_endpoint", False):
        return None, None
    usage = engine.usage.snapshot()  # type: ignore[attr-defined]
    return usage, estimate_cost(usage, cfg.openai)


def run_sample(
    inputs: SampleInputs,
    cfg: SampleConfig,
    out_dir: Path,
    reject: Reject,
    scratch: list[Path],
    on_progress: Progress | None = None,
) -> SampleCounts:
    """Sample the split's records into ``out_dir / data.jsonl``, resumably (module docstring)."""
    records = load_records(inputs.prepare, splits=(cfg.split,), on_reject=reject)
    if cfg.max_records:
        records = records[: cfg.max_records]
    engine = _engine(inputs, cfg, out_dir, scratch)
    try:
        stats = sample_to_file(
            engine,
            items_from_records(records, inputs.prepare),
            out_dir / DATA,
            on_reject=reject,
            on_progress=on_progress,
        )
    finally:
        # A vllm_server engine holds a server process group: stopped on success, failure and
        # Ctrl-C alike.
        close = getattr(engine, "close", None)
        if close is not None:
            close()
    info = getattr(engine, "info", None)
    usage, cost = _usage(engine, cfg)
    return SampleCounts(
        records_in=len(records),
        **asdict(stats),
        server={k: v for k, v in info.items() if k != "url"} if info else None,
        llm=usage,
        llm_cost_usd=cost,
    )
