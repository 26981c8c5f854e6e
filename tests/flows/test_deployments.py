"""The deployments users run (`fire-mpo/<name>`), the single-stage and next-round flows, and
`make serve` / `make stop` end to end (slow).

The fast tests register against the session's Prefect test server; the slow one starts its own
server with `make serve` on a free port and a private PREFECT_HOME, and drives it with the
`prefect` CLI exactly as a user would.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
    FlowFilter,
    FlowFilterName,
)
from prefect.client.schemas.schedules import CronSchedule, IntervalSchedule
from prefect.exceptions import PrefectHTTPStatusError
from prefect.flows import load_flow_from_entrypoint
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.utilities.callables import parameter_schema

from deployments.register import (
    GPU_POOL,
    GPU_REPO_ENV,
    LOOP_AUTOMATION,
    LOOP_TRIGGER,
    NEXT_ROUND_SLUG,
    POOL,
    REPO,
    ensure_compute_limit,
    register,
)
from fire_mpo_core.config import STAGES
from fire_mpo_core.store import ArtifactStore
from flows.full_cycle import fire_mpo, parse_args
from flows.next_round import main as next_round_main
from flows.next_round import next_round, rounds_done
from flows.remote import check_shared_store
from flows.stage import main as stage_main
from flows.stage import rerun_stage, target_round
from tasks.events import LOOP_CONTINUE
from testing_support.flow_runs import (
    ALL_RUNS,
    CACHED_RUN,
    NEVER_CACHED,
    ROUND_STAGES,
    SMALL,
    task_states,
)

EXPECTED = {
    "fire-mpo/full-cycle",
    *(f"fire-mpo/stage-{s}" for s in STAGES),
    "fire-mpo/next-round",
    "fire-mpo/full-cycle-gpu",
    "fire-mpo/stage-train-gpu",
    "fire-mpo/compare",
}


@pytest.fixture(scope="module")
def registered(prefect_harness) -> dict:
    ids = register()
    assert set(ids) == EXPECTED
    return ids


def _read(name: str):
    with get_client(sync_client=True) as client:
        return client.read_deployment_by_name(name)


def _task_states(flow_run_id) -> dict[str, str]:
    return task_states(flow_run_id)


def _refused(deployment: str, parameters: dict) -> str:
    """The API's reason for refusing a run of `deployment` with `parameters`."""
    dep = _read(deployment)
    with get_client(sync_client=True) as client, pytest.raises(PrefectHTTPStatusError) as err:
        client.create_flow_run_from_deployment(dep.id, parameters=parameters)
    assert err.value.response.status_code == 409
    return err.value.response.json()["detail"]


def test_deployments_have_the_names_users_run(registered):
    for name in EXPECTED:
        dep = _read(name)
        assert dep.id == registered[name]
        flow = load_flow_from_entrypoint(dep.entrypoint)  # what the worker imports
        assert flow.name == "fire-mpo", name
        if name.endswith("-gpu"):
            assert dep.work_pool_name == GPU_POOL
            step = {"directory": f"{{{{ ${GPU_REPO_ENV} }}}}"}
        else:
            assert dep.work_pool_name == POOL
            assert dep.job_variables == {"working_dir": str(REPO)}
            step = {"directory": str(REPO)}
        assert dep.pull_steps == [{"prefect.deployments.steps.set_working_directory": step}]

    # full-cycle's parameters mirror the CLI's options, with the flow's own schema.
    full = _read("fire-mpo/full-cycle")
    cli = set(vars(parse_args(["--config", "x.yaml"])))
    assert set(full.parameter_openapi_schema["properties"]) == cli
    assert full.parameter_openapi_schema == parameter_schema(fire_mpo).model_dump(
        exclude_unset=True
    )
    assert full.parameters == {}

    # stage-<name> fixes its stage: shown read-only, the only value the API accepts.
    for stage in STAGES:
        dep = _read(f"fire-mpo/stage-{stage}")
        assert dep.parameters == {"stage": stage}
        prop = dep.parameter_openapi_schema["properties"]["stage"]
        assert prop["readOnly"] is True and prop["enum"] == [stage]


def test_compute_tag_limit_is_created_once_and_kept(registered):
    """Model-heavy stages share the `compute` tag; its limit is created by `register` and a
    value the user set later survives registering again."""
    from tasks.evaluate import evaluate
    from tasks.train import train

    assert "compute" in train.tags and "compute" in evaluate.tags
    with get_client(sync_client=True) as client:
        assert client.read_concurrency_limit_by_tag("compute").concurrency_limit == 1
        client.create_concurrency_limit(tag="compute", concurrency_limit=3)  # upsert, as the CLI
    assert ensure_compute_limit() == 3
    register(only=["full-cycle"])
    with get_client(sync_client=True) as client:
        assert client.read_concurrency_limit_by_tag("compute").concurrency_limit == 3
        client.create_concurrency_limit(tag="compute", concurrency_limit=1)


def test_registering_again_updates_in_place(registered):
    again = register(only=["full-cycle", "stage-evaluate"])
    assert again == {k: registered[k] for k in ("fire-mpo/full-cycle", "fire-mpo/stage-evaluate")}
    with get_client(sync_client=True) as client:
        deps = client.read_deployments(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["fire-mpo"]))
        )
    assert sorted(f"fire-mpo/{d.name}" for d in deps) == sorted(EXPECTED)
    with pytest.raises(ValueError, match="stage-polish"):
        register(only=["stage-polish"])


def test_bad_parameters_are_refused_by_the_api(registered):
    detail = _refused("fire-mpo/full-cycle", {"stages": ["polish"]})
    assert "stages[0]" in detail and "'polish' is not one of" in detail
    assert "'evaluate'" in detail  # the message lists the valid names
    assert "rounds" in _refused("fire-mpo/full-cycle", {"rounds": "two"})
    assert "'train' is not one of ['evaluate']" in _refused(
        "fire-mpo/stage-evaluate", {"stage": "train"}
    )
    assert "minimum of 0" in _refused("fire-mpo/stage-evaluate", {"round": -1})
    assert "run" in _refused("fire-mpo/next-round", {"run": "a/b"})

    # Valid values pass; the runs stay Scheduled (no worker here) and are removed again.
    full = _read("fire-mpo/full-cycle")
    with get_client(sync_client=True) as client:
        run = client.create_flow_run_from_deployment(
            full.id, parameters={"stages": ["evaluate"], "rounds": 2}
        )
        assert run.parameters == {"stages": ["evaluate"], "rounds": 2}
        client.delete_flow_run(run.id)


def test_next_round_schedule_is_declared_inactive_and_user_changes_survive(registered):
    dep = _read("fire-mpo/next-round")
    (sched,) = dep.schedules
    assert sched.slug == NEXT_ROUND_SLUG and sched.active is False
    assert isinstance(sched.schedule, CronSchedule) and sched.schedule.timezone == "UTC"
    assert dep.global_concurrency_limit is not None and dep.global_concurrency_limit.limit == 1
    assert not _read("fire-mpo/full-cycle").schedules

    # A user switches the schedule on and adds one of their own to full-cycle...
    full = _read("fire-mpo/full-cycle")
    with get_client(sync_client=True) as client:
        client.update_deployment_schedule(dep.id, sched.id, active=True)
        client.create_deployment_schedules(
            full.id, [(IntervalSchedule(interval=datetime.timedelta(hours=6)), False)]
        )
    # ...and `make serve` registers again: both are kept.
    try:
        register(only=["full-cycle", "next-round"])
        assert [s.active for s in _read("fire-mpo/next-round").schedules] == [True]
        (kept,) = _read("fire-mpo/full-cycle").schedules
        assert kept.schedule.interval == datetime.timedelta(hours=6) and kept.active is False
    finally:
        with get_client(sync_client=True) as client:
            client.update_deployment_schedule(dep.id, sched.id, active=False)
            for s in _read("fire-mpo/full-cycle").schedules:
                client.delete_deployment_schedule(full.id, s.id)


def _next_round_runs(deployment_id, timeout_s: float = 0.0) -> list:
    """The flow runs of next-round, polled until there is one or `timeout_s` passed."""
    deadline = time.monotonic() + timeout_s
    while True:
        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[deployment_id]))
            )
        if runs or time.monotonic() > deadline:
            return runs
        time.sleep(0.5)


def test_loop_automation_starts_next_round_from_the_event_and_keeps_user_state(
    registered, tmp_path
):
    """The closed loop's automation, created by `register`: a `fire-mpo.loop.continue` event
    makes the server itself create a next-round run with parameters rendered from the event;
    registering again keeps a user's disabled state and removes copies (each would start its
    own run)."""
    from prefect.events import emit_event
    from prefect.events.schemas.automations import AutomationCore

    nxt = _read("fire-mpo/next-round")
    with get_client(sync_client=True) as client:
        (auto,) = client.read_automations_by_name(LOOP_AUTOMATION)
    assert auto.enabled and auto.trigger.expect == {LOOP_CONTINUE}
    (action,) = auto.actions
    assert action.type == "run-deployment" and action.deployment_id == nxt.id
    assert auto.owner_resource is None  # not deleted when the deployment is applied again
    assert not _next_round_runs(nxt.id)

    payload = {"run": "lp", "store": str(tmp_path / "store"), "config": "/x/loop.yaml", "round": 2}
    # A decision of a run that no deployment started (`make run`) starts nothing; one from a
    # deployment run (Prefect relates the deployment to the events of its runs) does.
    emit_event(
        LOOP_CONTINUE, resource={"prefect.resource.id": "fire-mpo.run.lp.round.2"}, payload=payload
    )
    emit_event(
        LOOP_CONTINUE,
        resource={"prefect.resource.id": "fire-mpo.run.lp.round.3"},
        related=[{"prefect.resource.id": f"prefect.deployment.{nxt.id}",
                  "prefect.resource.role": "deployment"}],
        payload={**payload, "round": 3},
    )  # fmt: skip
    runs = _next_round_runs(nxt.id, timeout_s=60)
    time.sleep(2)  # the first event, had it triggered, was processed before the second
    runs = _next_round_runs(nxt.id)
    assert len(runs) == 1, f"expected one next-round run (the deployment run's event): {runs}"
    assert runs[0].parameters == {
        "config": "/x/loop.yaml",
        "store": str(tmp_path / "store"),
        "run": "lp",
        "after_round": 3,  # an int: a single `{{ }}` renders to the value's JSON type
    }
    with get_client(sync_client=True) as client:
        client.delete_flow_run(runs[0].id)  # no worker here: it would stay Scheduled
        client.pause_automation(auto.id)  # a user disables it in the UI...
    register(only=["next-round"])  # ...and `make serve` registers again
    with get_client(sync_client=True) as client:
        (kept,) = client.read_automations_by_name(LOOP_AUTOMATION)
        assert kept.id == auto.id and kept.enabled is False
        client.create_automation(AutomationCore(**auto.model_dump(exclude={"id"})))  # a copy
    register(only=["next-round"])
    with get_client(sync_client=True) as client:
        (kept,) = client.read_automations_by_name(LOOP_AUTOMATION)
    # Still disabled (and left so: later tests' loop events start nothing on this server).
    assert kept.enabled is False


def _finished(store: ArtifactStore, run: str, round_: int, stage: str) -> None:
    """A finished (empty) stage output, as a stage task would leave it."""
    store.run_stage(
        run=run, round_=round_, stage=stage, config={}, inputs={}, code="c", fn=lambda w: {}
    )


def test_target_round_and_rounds_done(tmp_path):
    store = ArtifactStore(tmp_path)
    # Nothing built: a stage's first round (evaluate exists from round 0, the SFT base).
    assert [target_round(s, None, store, "r") for s in STAGES] == [0, 0, 1, 1, 1, 1, 1, 0]
    assert rounds_done(tmp_path, "r") == 0
    for k in (1, 2):
        for stage in ("train", "evaluate"):
            _finished(store, "r", k, stage)
    _finished(store, "r", 3, "sample")  # round 3 started, not trained
    assert target_round("evaluate", None, store, "r") == 2
    assert target_round("sample", None, store, "r") == 3
    assert target_round("evaluate", 0, store, "r") == 0
    assert rounds_done(tmp_path, "r") == 2
    with pytest.raises(ValueError, match="round 0"):
        target_round("sft", 2, store, "r")
    with pytest.raises(ValueError, match=">= 1"):
        target_round("train", 0, store, "r")
    with pytest.raises(ValueError, match=">= 0"):
        target_round("evaluate", -1, store, "r")


def test_clis_fail_fast_on_bad_input(tmp_path, capsys):
    cfg = tmp_path / "small.yaml"
    cfg.write_text(yaml.safe_dump(SMALL))
    assert stage_main(["--stage", "sft", "--round", "1", "--config", str(cfg)]) == 2
    assert "round 0" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: -1\n")
    assert stage_main(["--stage", "train", "--config", str(bad)]) == 2
    assert next_round_main(["--config", str(bad)]) == 2
    assert "train.lr" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        stage_main(["--stage", "polish"])


def test_stage_and_next_round_flows(prefect_harness, tmp_path):
    """In process: rerun one stage of one round, then continue the run by one round."""
    cfg = tmp_path / "small.yaml"
    cfg.write_text(yaml.safe_dump({**SMALL, "store": str(tmp_path / "store")}))
    first = fire_mpo(config=str(cfg), return_state=True)
    assert first.is_completed()

    # Default round: the latest evaluated one (1); cached, and the only stage of the run (round
    # 1 is offered for `best` again: it stays).
    state = rerun_stage(stage="evaluate", config=str(cfg), return_state=True)
    promoted = {"promote-r1": "Completed"}
    assert _task_states(state.state_details.flow_run_id) == {"evaluate-r1": "Cached", **promoted}
    assert Path(state.result()) == Path(first.result()).parent
    # An explicit round: only that task.
    state = rerun_stage(stage="evaluate", round=0, config=str(cfg), return_state=True)
    assert _task_states(state.state_details.flow_run_id) == {"evaluate-r0": "Cached"}
    # Forced: recomputed. (Round 1, the last: evaluate's metrics.json holds a throughput, so a
    # recomputed evaluation has a new content digest and would re-key the next round's.)
    state = rerun_stage(stage="evaluate", round=1, config=str(cfg), refresh=True, return_state=True)
    assert _task_states(state.state_details.flow_run_id) == {"evaluate-r1": "Completed", **promoted}
    # A stage whose inputs are missing for that round is a clear error.
    with pytest.raises(RuntimeError, match="needs"):
        rerun_stage(stage="judge", round=2, config=str(cfg))

    state = next_round(config=str(cfg), return_state=True)
    states = _task_states(state.state_details.flow_run_id)
    assert {k for k, v in states.items() if v == "Cached"} == set(ALL_RUNS) - NEVER_CACHED
    assert {k for k, v in states.items() if v == "Completed"} == {
        *(f"{s}-r2" for s in ROUND_STAGES),
        *NEVER_CACHED,
        "promote-r2",
    }, states
    assert Path(state.result()).parent.parent.parent.name == "round-2"
    assert rounds_done(tmp_path / "store", SMALL["run"]) == 2


# ------------------------------------------------------------------ make serve, end to end


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sh(args: list[str], env: dict, timeout: float) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.perf_counter()
    out = subprocess.run(
        args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    return out, time.perf_counter() - t0


class Served:
    """A `make serve` instance on a free port with a private PREFECT_HOME (see `served`)."""

    def __init__(self, tmp: Path):
        self.port = _free_port()
        self.home = tmp / "prefect-home"
        self.bin = Path(sys.executable).parent
        env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API_")}
        env.update(
            PREFECT_HOME=str(self.home),
            PREFECT_SERVER_API_PORT=str(self.port),
            PREFECT_SERVER_ANALYTICS_ENABLED="false",
            BIN=str(self.bin),
            # Two slots: a full cycle waits on the stage it runs through run_deployment.
            FIRE_MPO_WORKER_LIMIT="2",
        )
        self.env = env
        self.url = f"http://127.0.0.1:{self.port}"
        self.api = f"{self.url}/api"
        self.run_env = {**env, "PREFECT_API_URL": self.api}
        self.cfg = tmp / "small.yaml"
        # loop.max_rounds 1: round 1 decides `stop`, so the loop's automation adds no round
        # to these tests' runs (tests/flows/test_loop_served.py drives the loop).
        small = {**SMALL, "store": str(tmp / "store"), "loop": {"max_rounds": 1}}
        self.cfg.write_text(yaml.safe_dump(small))
        self.timings: dict[str, float] = {}
        self.runs: dict[str, str] = {}
        self.pids: dict[str, int] = {}
        # The Makefile's own install step is not what is tested here (it may need the network).
        self.make = ["make", "-o", ".venv/.installed"]

    def deploy_run(self, name: str, *params: str, label: str, cfg: Path | None = None) -> str:
        """`prefect deployment run NAME --watch`; asserts Completed; returns the flow run id."""
        args = [str(self.bin / "prefect"), "deployment", "run", name, "--watch"]
        for p in (f"config={cfg or self.cfg}", *params):
            args += ["-p", p]
        out, self.timings[label] = _sh(args, self.run_env, 900)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "Flow run finished successfully in 'Completed'" in out.stdout
        self.runs[label] = re.search(r"UUID: ([0-9a-f-]{36})", out.stdout).group(1)
        return self.runs[label]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`make serve` once for the tests below; `make stop` (again, harmlessly) at the end."""
    srv = Served(tmp_path_factory.mktemp("serve"))
    try:
        out, srv.timings["make serve"] = _sh([*srv.make, "serve"], srv.env, 600)
        assert out.returncode == 0, out.stdout + out.stderr
        assert f"Dashboard:  {srv.url}" in out.stdout and "make stop" in out.stdout
        assert f"export PREFECT_API_URL={srv.api}" in (srv.home / "serve.env").read_text()
        srv.pids = {n: int((srv.home / f"{n}.pid").read_text()) for n in ("server", "worker")}
        yield srv
    finally:
        _sh([*srv.make, "stop"], srv.env, 120)
        print("\ntimings (s):", json.dumps({k: round(v, 1) for k, v in srv.timings.items()}))


@pytest.mark.slow
def test_served_full_cycle_then_cached_then_one_stage(served):
    first = served.deploy_run("fire-mpo/full-cycle", label="full-cycle, first run")
    again = served.deploy_run("fire-mpo/full-cycle", label="full-cycle, cached rerun")
    evaluate = served.deploy_run(
        "fire-mpo/stage-evaluate", "refresh=true", label="stage-evaluate, forced"
    )
    with temporary_settings({PREFECT_API_URL: served.api}):
        assert _task_states(first) == dict.fromkeys(ALL_RUNS, "Completed")
        assert _task_states(again) == CACHED_RUN
        assert _task_states(evaluate) == {"evaluate-r1": "Completed", "promote-r1": "Completed"}
    cmd = [str(served.bin / "prefect"), "deployment", "run", "fire-mpo/full-cycle"]
    bad, _ = _sh([*cmd, "-p", 'stages=["polish"]'], served.run_env, 120)
    assert bad.returncode != 0 and "'polish' is not one of" in bad.stdout


@pytest.mark.slow
def test_served_remote_stage_through_run_deployment(served, tmp_path):
    """`remote_stages: {train: fire-mpo/stage-train}`: the cycle runs `train` as another
    deployment's flow run (the GPU pool's mechanism, here on the local pool) and goes on."""
    cfg = yaml.safe_load(served.cfg.read_text())
    cfg["remote_stages"] = {"train": "fire-mpo/stage-train"}
    cfg["train"]["lr"] = 1.5e-3  # a new train key: the stage must really run
    remote_cfg = tmp_path / "remote.yaml"
    remote_cfg.write_text(yaml.safe_dump(cfg))
    parent = served.deploy_run(
        "fire-mpo/full-cycle", label="full-cycle, train remote", cfg=remote_cfg
    )
    with temporary_settings({PREFECT_API_URL: served.api}):
        states = _task_states(parent)
        assert "train-r1" not in states and states["evaluate-r1"] == "Completed"
        with get_client(sync_client=True) as client:
            dep = client.read_deployment_by_name("fire-mpo/stage-train")
            (child,) = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id]))
            )
        assert child.state.is_completed() and child.parameters["store_id"]
        assert _task_states(child.id) == {"train-r1": "Completed"}
    # The same store is checked, not assumed: another folder is refused, naming both ids.
    other = tmp_path / "elsewhere"
    with pytest.raises(RuntimeError, match="not the caller's store"):
        check_shared_store(other, "0123")


@pytest.mark.slow
def test_served_dashboard_in_headless_chromium(served, tmp_path):
    """The flow run page, rendered by Debian's headless Chromium, names every stage."""
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("headless browser check skipped: no `chromium` on PATH (apt install chromium)")
    run_id = served.runs.get("full-cycle, first run") or served.deploy_run(
        "fire-mpo/full-cycle", label="full-cycle, for the browser"
    )
    page = f"{served.url}/runs/flow-run/{run_id}"
    shot = Path(os.environ.get("FIRE_MPO_SCREENSHOT", tmp_path / "flow-run.png"))
    common = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        "--window-size=1600,1000",
        "--virtual-time-budget=25000",
    ]
    out, served.timings["chromium dump-dom"] = _sh([*common, "--dump-dom", page], served.env, 180)
    assert out.returncode == 0, out.stderr[-2000:]
    for name in ALL_RUNS:
        if name not in NEVER_CACHED:
            assert name in out.stdout, f"{name} not on the flow run page"
    out, _ = _sh([*common, f"--screenshot={shot}", page], served.env, 180)
    assert out.returncode == 0 and shot.stat().st_size > 10_000, out.stderr[-2000:]


def _readme_serving_block() -> list[str]:
    text = (REPO / "README.md").read_text()
    block = text.split("## Serving", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    return [ln.split("  #", 1)[0].strip() for ln in block.splitlines() if ln.strip()]


@pytest.mark.slow
def test_readme_serving_commands_in_a_fresh_shell(served):
    """The README's serving commands, pasted in order into a new shell that knows nothing (no
    venv on PATH, no PREFECT_* variables): `source .prefect/serve.env` must be enough."""
    if "full-cycle, first run" not in served.runs:  # stage-evaluate needs a cycle's outputs
        served.deploy_run("fire-mpo/full-cycle", label="full-cycle, first run")
    lines = _readme_serving_block()
    assert lines[:2] == ["make serve", "source .prefect/serve.env"] and lines[-1] == "make stop"
    script = ["set -euo pipefail"]
    for ln in lines[1:-1]:  # `make serve` / `make stop`: the fixture runs them, the same way
        if "<SCHEDULE_ID>" in ln:  # a placeholder the user fills in from `schedule ls`
            continue
        ln = ln.replace(".prefect/serve.env", str(served.home / "serve.env"))
        if "deployment run" in ln:
            if "--watch" not in ln or "full-cycle" in ln or "next-round" in ln:
                continue  # full cycles at the default size: test_served_full_cycle runs them
            ln += f" -p config={served.cfg}"  # the small config, not the default's size
        script.append(ln)
    assert any("deployment run" in ln for ln in script) and any(
        "schedule ls" in ln for ln in script
    )
    script.insert(2, 'echo "prefect is $(command -v prefect)"')
    env = {"HOME": os.environ.get("HOME", "/root"), "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}
    out, served.timings["README commands"] = _sh(
        ["bash", "--noprofile", "--norc", "-c", "\n".join(script)], env, 600
    )
    assert out.returncode == 0, "\n".join(script) + "\n" + out.stdout + out.stderr
    assert f"prefect is {served.bin / 'prefect'}" in out.stdout
    assert "Flow run finished successfully in 'Completed'" in out.stdout


@pytest.mark.slow
def test_make_stop_stops_worker_then_server(served):
    stopped, served.timings["make stop"] = _sh([*served.make, "stop"], served.env, 120)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    assert not list(served.home.glob("*.pid")) and not (served.home / "serve.env").exists()
    for name, pid in served.pids.items():
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)  # gone
        assert f"Stopping the {name}" in stopped.stdout
    # Stopping twice is harmless.
    out, _ = _sh([*served.make, "stop"], served.env, 60)
    assert out.returncode == 0 and "No worker to stop" in out.stdout


def test_prefect_yaml_is_generated_from_the_specs():
    """prefect.yaml (for `prefect deploy --all`) is the register specs, regenerated."""
    from deployments.register import PREFECT_YAML, prefect_yaml

    assert PREFECT_YAML.read_text() == prefect_yaml(), (
        "prefect.yaml is stale: python -m deployments.register --write-prefect-yaml"
    )
    deps = yaml.safe_load(PREFECT_YAML.read_text())["deployments"]
    assert {f"fire-mpo/{d['name']}" for d in deps} == EXPECTED
    for d in deps:  # what `prefect deploy` imports: the flow named fire-mpo
        assert load_flow_from_entrypoint(d["entrypoint"]).name == "fire-mpo"
    # The loop's trigger as `prefect deploy` parses it: the automation `register` creates.
    from prefect.cli.deploy._triggers import _initialize_deployment_triggers

    (nxt,) = [d for d in deps if d["name"] == "next-round"]
    (trigger,) = _initialize_deployment_triggers("next-round", nxt["triggers"])
    assert trigger.model_dump() == LOOP_TRIGGER.model_dump()


def test_store_id_is_created_once_and_checked(tmp_path):
    from flows.remote import store_id

    assert store_id(tmp_path / "s") is None
    first = store_id(tmp_path / "s", create=True)
    assert first and store_id(tmp_path / "s", create=True) == first  # never replaced
    check_shared_store(tmp_path / "s", first)
    with pytest.raises(RuntimeError, match="not the caller's store"):
        check_shared_store(tmp_path / "other", first)
    assert [p.name for p in (tmp_path / "s").iterdir()] == [".store-id"]  # no temp left
