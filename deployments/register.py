"""Create the work pools and register (create or update) every FiRe-MPO deployment.

    PREFECT_API_URL=http://127.0.0.1:4200/api python -m deployments.register [--list]

`make serve` runs it after starting the server. It is the single source of the deployment
definitions (see `deployments/README.md` for the table and the reasons) and it is idempotent:
work pools that exist are left as they are, deployments are updated in place by name, and a
schedule the user has switched on (or off) keeps that state when it is registered again. The
closed loop's automation (`LOOP_AUTOMATION`: on a round's `fire-mpo.loop.continue` event, run
`fire-mpo/next-round`) is created or updated by name the same way, keeping its enabled state.

Every deployment runs a module-path entrypoint from this checkout: its pull step
`set_working_directory` (and, on the local pool, the process job's `working_dir`) is the
checkout, so relative config paths such as `configs/default.yaml` and the default `store/`
resolve there, whatever folder the worker was started in. The GPU deployment runs on another
machine, so its working directory is the `FIRE_MPO_REPO` environment variable of its worker.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect import get_client
from prefect.client.schemas.actions import DeploymentScheduleCreate, WorkPoolCreate
from prefect.client.schemas.objects import DeploymentSchedule
from prefect.deployments.runner import EntrypointType, RunnerDeployment
from prefect.events.schemas.automations import AutomationCore
from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.flows import load_flow_from_entrypoint
from prefect.runner.storage import LocalStorage
from prefect.schedules import Cron, Schedule
from prefect.utilities.annotations import freeze
from prefect.workers.process import ProcessWorker

from fire_mpo_core.config import STAGES
from tasks.events import LOOP_CONTINUE

REPO = Path(__file__).resolve().parents[1]
FLOW = "fire-mpo"  # every user-facing deployment belongs to this flow: `fire-mpo/<name>`
POOL = "fire-mpo"  # local process pool, served by `make serve`'s worker
GPU_POOL = "fire-mpo-gpu"  # process pool for a worker on a GPU machine (started by hand)
GPU_REPO_ENV = "FIRE_MPO_REPO"  # the checkout on the GPU machine, exported to its worker
#: The next-round schedule: declared, but off until switched on (UI toggle or
#: `prefect deployment schedule resume fire-mpo/next-round <schedule id>`).
NEXT_ROUND_CRON = "0 2 * * *"
NEXT_ROUND_SLUG = "nightly"

POOLS = {
    POOL: "FiRe-MPO on this machine's CPUs (local process worker; `make serve` starts one).",
    GPU_POOL: (
        "FiRe-MPO on a GPU machine: there, with this repo checked out and installed, run "
        f"`{GPU_REPO_ENV}=<checkout> prefect worker start --pool {GPU_POOL}`."
    ),
}
#: One flow run at a time on the GPU pool: one model fills the GPU.
POOL_LIMITS = {GPU_POOL: 1}
#: Task tag of the model-heavy stages (sft, sample, reference, train, evaluate) and how many may
#: run at once across all flow runs of this server (FIRE_MPO_COMPUTE_LIMIT; created once, a
#: value changed later in the UI or with `prefect concurrency-limit` is kept).
COMPUTE_TAG = "compute"
#: The closed loop: the automation that runs `fire-mpo/next-round` when a round's decision is
#: `continue` (the decision, fire_mpo_core/loop/decide.py, already applies the config's margin,
#: patience and max_rounds; tasks/events.py emits it at the end of a cycle run).
LOOP_AUTOMATION = "fire-mpo: next round on improvement"
LOOP_TRIGGER = DeploymentEventTrigger(
    name=LOOP_AUTOMATION,
    description="When a FiRe-MPO round's validation decision is `continue` (the headline metric "
    "`loop.metric` improved by more than `loop.min_improvement`, fewer than `loop.patience` "
    "rounds without improvement, below `loop.max_rounds`), run fire-mpo/next-round on the same "
    "config, store and run. Disable it to stop the closed loop; next-round's nightly schedule "
    "is the alternative.",
    expect={LOOP_CONTINUE},
    match={"prefect.resource.id": "fire-mpo.run.*"},
    # Only decisions of deployment runs (full-cycle, next-round): a `make run` on the same
    # PREFECT_HOME (its temporary API runs triggers too) must not queue rounds for the worker.
    match_related={"prefect.resource.role": "deployment"},
    posture="Reactive",
    threshold=1,
    within=timedelta(0),
    # Jinja over the triggering event (Prefect renders a single `{{ }}` to its JSON type):
    # `after_round` makes a duplicate or stale event a no-op (flows/next_round.py).
    parameters={
        "config": "{{ event.payload.config }}",
        "store": "{{ event.payload.store }}",
        "run": "{{ event.payload.run }}",
        "after_round": "{{ event.payload.round }}",
    },
)


@dataclass(frozen=True)
class Spec:
    """One deployment: `fire-mpo/<name>` running the flow object at `entrypoint`."""

    name: str
    entrypoint: str  # module path of a Flow object named `fire-mpo`
    description: str
    pool: str = POOL
    parameters: dict[str, Any] = field(default_factory=dict)
    frozen: tuple[str, ...] = ()  # parameters fixed by the deployment (the API rejects others)
    schedules: tuple[Schedule, ...] = ()
    tags: tuple[str, ...] = ()
    concurrency_limit: int | None = None
    triggers: tuple[DeploymentEventTrigger, ...] = ()  # automations that run this deployment


def specs() -> list[Spec]:
    """Every deployment, in the order `register` applies them."""
    out = [
        Spec(
            name="full-cycle",
            entrypoint="flows.full_cycle.fire_mpo",
            description="The full cycle: prepare -> sft -> evaluate, then per round sample -> "
            "judge -> corrupt -> reference -> train -> evaluate. Parameters mirror "
            "`python -m flows.full_cycle`; every stage is content-cached in the store.",
            tags=("fire-mpo",),
        ),
    ]
    for stage in STAGES:
        out.append(
            Spec(
                name=f"stage-{stage}",
                entrypoint="flows.stage.stage_as_fire_mpo",
                description=f"Rerun only `{stage}`, for one round (default: the latest one "
                "built), its inputs read from the store. `refresh=true` recomputes it even "
                "when its output exists.",
                parameters={"stage": stage},
                frozen=("stage",),
                tags=("fire-mpo", "stage"),
            )
        )
    out += [
        Spec(
            name="next-round",
            entrypoint="flows.next_round.next_round_as_fire_mpo",
            description="Continue the run by one round: the full cycle with rounds = the "
            "highest finished `train` round in the store + 1 (all before it is cached). "
            f"Started by the automation `{LOOP_AUTOMATION}` when a round's decision is "
            f"`continue`; schedule `{NEXT_ROUND_SLUG}` ({NEXT_ROUND_CRON} UTC) is off until "
            "switched on.",
            schedules=(Cron(NEXT_ROUND_CRON, timezone="UTC", active=False, slug=NEXT_ROUND_SLUG),),
            triggers=(LOOP_TRIGGER,),
            # Two rounds computed at once would both compute the same round: queue them.
            concurrency_limit=1,
            tags=("fire-mpo", "scheduled"),
        ),
        Spec(
            name="compare",
            entrypoint="flows.compare.compare_as_fire_mpo",
            description="The paper's comparison: train and evaluate every variant x seed of a "
            "compare config (configs/compare.yaml) from one SFT base and one set of pairs; "
            "writes <store>/<run>/compare/<name>/ (table, plots, report). Parameters mirror "
            "`python -m flows.compare`.",
            tags=("fire-mpo", "compare"),
            concurrency_limit=1,
        ),
        Spec(
            name="stage-train-gpu",
            entrypoint="flows.stage.stage_as_fire_mpo",
            pool=GPU_POOL,
            description="`train` on the GPU pool, called by a full cycle whose config has "
            "`remote_stages: {train: fire-mpo/stage-train-gpu}` (run_deployment; the store "
            f"must be one path both workers see). Needs a worker on `{GPU_POOL}` started with "
            f"{GPU_REPO_ENV}=<its checkout>.",
            parameters={"stage": "train"},
            frozen=("stage",),
            tags=("fire-mpo", "gpu", "stage"),
        ),
        Spec(
            name="full-cycle-gpu",
            entrypoint="flows.full_cycle.fire_mpo",
            pool=GPU_POOL,
            description="FiRe-MPO training (the full cycle) on the GPU pool: pass a GPU profile "
            "as `config` (a real model, `model.dtype: bfloat16`, vLLM sampling). Needs a worker "
            f"on `{GPU_POOL}` started with {GPU_REPO_ENV}=<its checkout>.",
            concurrency_limit=1,
            tags=("fire-mpo", "gpu"),
        ),
    ]
    return out


class WorkingDirectory(LocalStorage):
    """Flow code already on the worker's machine: the pull step only changes directory.

    Unlike `LocalStorage`, `directory` may be a `{{ $ENV_VAR }}` placeholder, which Prefect
    resolves from the worker's environment when the flow run starts.
    """

    def __init__(self, directory: str):
        super().__init__(path=".")  # LocalStorage resolves its path; a placeholder is not one
        self.directory = directory

    @property
    def destination(self) -> Path:
        return Path(self.directory)

    def to_pull_step(self) -> dict[str, Any]:
        return {"prefect.deployments.steps.set_working_directory": {"directory": self.directory}}


def ensure_pools() -> None:
    """Create the process work pools that are missing; existing ones are left untouched."""
    template = ProcessWorker.get_default_base_job_template()
    with get_client(sync_client=True) as client:
        for name, description in POOLS.items():
            with contextlib.suppress(ObjectAlreadyExists):  # keep the user's pool settings
                client.create_work_pool(
                    WorkPoolCreate(
                        name=name,
                        type="process",
                        description=description,
                        base_job_template=template,
                        concurrency_limit=POOL_LIMITS.get(name),
                    )
                )


def ensure_compute_limit(limit: int | None = None) -> int:
    """Create the `compute` tag's concurrency limit if it is missing; returns its value."""
    if limit is None:
        limit = int(os.environ.get("FIRE_MPO_COMPUTE_LIMIT", "1"))
    with get_client(sync_client=True) as client:
        try:
            return client.read_concurrency_limit_by_tag(COMPUTE_TAG).concurrency_limit
        except ObjectNotFound:
            client.create_concurrency_limit(tag=COMPUTE_TAG, concurrency_limit=limit)
            return limit


def _existing_schedules(full_name: str) -> list[DeploymentSchedule]:
    """The schedules of a deployment already on the server ([] if it is not there)."""
    with get_client(sync_client=True) as client:
        try:
            return list(client.read_deployment_by_name(full_name).schedules)
        except ObjectNotFound:
            return []


def _schedules(spec: Spec) -> list[Schedule | DeploymentScheduleCreate]:
    """The declared schedules, each keeping the on/off state it has on the server, plus any
    schedule a user added there: registering again must not undo what was set in the UI."""
    existing = _existing_schedules(f"{FLOW}/{spec.name}")
    active = {s.slug: s.active for s in existing if s.slug}
    declared = {s.slug for s in spec.schedules}
    out: list[Schedule | DeploymentScheduleCreate] = [
        replace(s, active=active.get(s.slug, s.active)) for s in spec.schedules
    ]
    out += [
        DeploymentScheduleCreate(
            schedule=s.schedule,
            active=s.active,
            max_scheduled_runs=s.max_scheduled_runs,
            parameters=s.parameters,
            slug=s.slug,
        )
        for s in existing
        if s.slug is None or s.slug not in declared
    ]
    return out


def build(spec: Spec, repo: Path = REPO) -> RunnerDeployment:
    """The RunnerDeployment of one spec (not yet sent to the API)."""
    flow = load_flow_from_entrypoint(spec.entrypoint)
    if flow.name != FLOW:
        raise ValueError(f"{spec.entrypoint} is flow {flow.name!r}, expected {FLOW!r}")
    local = spec.pool == POOL
    params = {k: freeze(v) if k in spec.frozen else v for k, v in spec.parameters.items()}
    dep = flow.to_deployment(
        name=spec.name,
        description=spec.description,
        parameters=params,
        schedules=_schedules(spec),
        tags=list(spec.tags),
        concurrency_limit=spec.concurrency_limit,
        work_pool_name=spec.pool,
        job_variables={"working_dir": str(repo)} if local else {},
        entrypoint_type=EntrypointType.MODULE_PATH,
    )
    # The flow object to import is the `fire-mpo`-named one, not the function it wraps.
    dep.entrypoint = spec.entrypoint
    dep.storage = WorkingDirectory(str(repo) if local else f"{{{{ ${GPU_REPO_ENV} }}}}")
    return dep


def register(repo: Path = REPO, only: Sequence[str] | None = None) -> dict[str, UUID]:
    """Create the pools and apply every deployment (or those named in `only`).

    Returns `fire-mpo/<name>` -> deployment id.
    """
    unknown = sorted(set(only or ()) - {s.name for s in specs()})
    if unknown:
        raise ValueError(f"unknown deployment(s) {unknown}; known: {[s.name for s in specs()]}")
    ensure_pools()
    ensure_compute_limit()
    ids: dict[str, UUID] = {}
    for spec in specs():
        if only and spec.name not in only:
            continue
        ids[f"{FLOW}/{spec.name}"] = build(spec, repo).apply()
        for trigger in spec.triggers:
            ensure_automation(trigger, ids[f"{FLOW}/{spec.name}"])
    return ids


def ensure_automation(trigger: DeploymentEventTrigger, deployment_id: UUID) -> UUID:
    """Create or update (by name) the automation that runs `deployment_id` on `trigger`,
    keeping the enabled state a user set in the UI; returns its id.

    Not owned by the deployment (as `prefect deploy`'s triggers are): applying a deployment
    deletes and recreates the automations it owns, which would reset that state every time.
    """
    trigger = trigger.model_copy(deep=True)
    trigger.set_deployment_id(deployment_id)
    # Without owner_resource (left unset: the API refuses the field in an update).
    automation = AutomationCore(**trigger.as_automation().model_dump(exclude={"owner_resource"}))
    with get_client(sync_client=True) as client:
        existing = client.read_automations_by_name(automation.name)
        if not existing:
            return client.create_automation(automation)
        # The API lists the most recently updated first. Copies (each would start its own run)
        # go; one disabled copy means a user switched the loop off.
        first, *copies = existing
        automation.enabled = all(a.enabled for a in existing)
        client.update_automation(first.id, automation)
        for copy in copies:
            client.delete_automation(copy.id)
        return first.id


def describe() -> str:
    """One line per deployment: name, pool, schedules with their state, fixed parameters."""
    lines = []
    with get_client(sync_client=True) as client:
        for spec in specs():
            try:
                dep = client.read_deployment_by_name(f"{FLOW}/{spec.name}")
            except ObjectNotFound:
                lines.append(f"  {FLOW}/{spec.name:<16} (not registered)")
                continue
            sched = ", ".join(
                f"{s.slug or 'schedule'} {getattr(s.schedule, 'cron', '')} "
                f"{'ACTIVE' if s.active else 'inactive'}"
                for s in dep.schedules
            )
            fixed = ", ".join(f"{k}={dep.parameters[k]}" for k in spec.frozen)
            extra = "; ".join(x for x in (fixed, sched) if x)
            lines.append(
                f"  {FLOW}/{spec.name:<16} pool {dep.work_pool_name}"
                + (f"  ({extra})" if extra else "")
            )
            for trigger in spec.triggers:
                found = client.read_automations_by_name(trigger.name)
                state = ("enabled" if found[0].enabled else "DISABLED") if found else "missing"
                lines.append(f"    automation {trigger.name!r}: {state}")
    return "\n".join(lines)


PREFECT_YAML = REPO / "prefect.yaml"


def prefect_yaml() -> str:
    """`prefect.yaml` generated from `specs()`, for users who deploy with `prefect deploy`.

    `register` stays the source: the file cannot freeze `stage` (there it is only a default) or
    keep a schedule's on/off state across deploys. A test checks that the file is up to date.
    """
    import yaml

    deployments = []
    for spec in specs():
        module, _, attr = spec.entrypoint.rpartition(".")
        local = spec.pool == POOL
        dep: dict[str, Any] = {
            "name": spec.name,
            "description": spec.description,
            "entrypoint": f"{module.replace('.', '/')}.py:{attr}",
            "parameters": dict(spec.parameters),
            "work_pool": {
                "name": spec.pool,
                "job_variables": {"working_dir": "{{ $FIRE_MPO_REPO }}"} if local else {},
            },
            "tags": list(spec.tags),
            "schedules": [
                {"cron": s.cron, "timezone": s.timezone, "active": s.active, "slug": s.slug}
                for s in spec.schedules
            ],
        }
        if spec.concurrency_limit is not None:
            dep["concurrency_limit"] = spec.concurrency_limit
        if spec.triggers:
            dep["triggers"] = [
                {"type": "event", **t.model_dump(mode="json", exclude_unset=True)}
                for t in spec.triggers
            ]
        deployments.append(dep)
    head = (
        "# GENERATED by `python -m deployments.register --write-prefect-yaml` from\n"
        "# deployments/register.py (the source; `make serve` registers from it directly).\n"
        "# For `FIRE_MPO_REPO=$PWD prefect deploy --all` from the checkout. Differences: here\n"
        "# `stage` of stage-<name> is a default, not a fixed value, and a deploy resets the\n"
        "# schedules' on/off state and the loop automation's enabled state (a trigger here is\n"
        "# owned by its deployment: each deploy recreates it).\n"
    )
    body = {
        "name": "fire-mpo",
        "prefect-version": "3.8",
        "pull": [
            {
                "prefect.deployments.steps.set_working_directory": {
                    "directory": "{{ $FIRE_MPO_REPO }}"
                }
            }
        ],
        "deployments": deployments,
    }
    return head + yaml.safe_dump(body, sort_keys=False, width=100)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m deployments.register", description=__doc__.split("\n")[0]
    )
    p.add_argument("--list", action="store_true", help="only list what is registered")
    p.add_argument("--only", nargs="+", metavar="NAME", help="register only these deployments")
    p.add_argument(
        "--write-prefect-yaml", action="store_true", help=f"only (re)write {PREFECT_YAML.name}"
    )
    args = p.parse_args(argv)
    if args.write_prefect_yaml:
        PREFECT_YAML.write_text(prefect_yaml())
        print(f"wrote {PREFECT_YAML}")
        return 0
    if not args.list:
        ids = register(only=args.only)
        print(f"Registered {len(ids)} deployments on work pools {', '.join(POOLS)}:")
        n = ensure_compute_limit()
        print(f"  tag `{COMPUTE_TAG}`: at most {n} model-heavy task run(s) at once")
    print(describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
