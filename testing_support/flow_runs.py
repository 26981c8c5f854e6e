"""Test helper (not product code): the small flow config of the flow tests and the Prefect
task-run states of a flow run.

    cfg = {**SMALL, "store": str(tmp / "store")}
    assert task_states(flow_run_id) == CACHED_RUN      # a rerun: every stage cached
"""

from __future__ import annotations

SMALL = {
    "run": "t",
    "rounds": 1,
    "num_threads": 1,
    "data": {
        "n_train_images": 24,
        "n_val_images": 0,
        "n_test_images": 8,
        "questions_per_image": 2,
        "report_fraction": 0.25,
    },
    "model": {"hidden_size": 64, "num_heads": 2, "vocab_size": 300, "patch_size": 16},
    # Enough SFT for the answer format (not the image): the judge needs answers to edit.
    "sft": {
        "max_steps": 60,
        "batch_size": 8,
        "lr": 3e-3,
        "include_reports": False,
        "vision_warmup": {"steps": 4, "batch_size": 8, "pretrain_scans": 8},
    },
    "sample": {"max_new_tokens": 8, "max_records": 24},
    "train": {"max_steps": 2, "batch_size": 4, "save_every": None},
    "evaluate": {"max_new_tokens": 8, "batch_size": 16},
}
ROUND_STAGES = ["sample", "judge", "corrupt", "reference", "train", "evaluate"]
#: Tasks that run every time (never cached): the dashboard report and round 1's promotion to
#: `<store>/<run>/best` (both cheap, and both must see the store as it is now).
NEVER_CACHED = {"dashboard", "promote-r1"}
ALL_RUNS = sorted(
    ["prepare-r0", "sft-r0", "evaluate-r0", *NEVER_CACHED] + [f"{s}-r1" for s in ROUND_STAGES]
)


#: Task run states of a run whose stages are all cached.
CACHED_RUN = {**dict.fromkeys(ALL_RUNS, "Cached"), **dict.fromkeys(NEVER_CACHED, "Completed")}


def task_states(flow_run_id, settle_s: float = 20.0) -> dict[str, str]:
    """Task run name -> final state name of a flow run.

    Prefect 3 records task-run states through its events pipeline, asynchronously: right after a
    flow returns, the API may still show a task as Running (or not at all). Poll until every
    task run is in a final state and two reads agree.
    """
    import time

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    final = {"Completed", "Cached", "Failed", "Crashed", "Cancelled"}
    last: dict[str, str] | None = None
    deadline = time.monotonic() + settle_s
    while True:
        with get_client(sync_client=True) as client:
            runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
            )
        states = {r.name: r.state.name for r in runs}
        settled = bool(states) and set(states.values()) <= final
        if (settled and states == last) or time.monotonic() > deadline:
            return states
        last = states if settled else None
        time.sleep(0.5)
