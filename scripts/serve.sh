#!/usr/bin/env bash
# Start a local Prefect server, register the FiRe-MPO deployments, start a worker (`make serve`).
#
#   scripts/serve.sh            # then: prefect deployment run fire-mpo/full-cycle --watch
#   scripts/stop.sh             # worker first, then server (`make stop`)
#
# Environment:
#   PREFECT_HOME                     state folder (default: <checkout>/.prefect): the SQLite
#                                    database, and here server.pid/.log, worker.pid/.log, serve.env
#   PREFECT_SERVER_API_PORT          port (default 4200; the server listens on 127.0.0.1 only)
#   PREFECT_API_DATABASE_CONNECTION_URL  e.g. postgresql+asyncpg://user:pw@host:5432/prefect
#                                    instead of SQLite
#   FIRE_MPO_WORKER_LIMIT            flow runs the worker runs at once (default 1: on a small
#                                    CPU machine two cycles would only slow each other down)
#   FIRE_MPO_SERVE_TIMEOUT           seconds to wait for the server to answer (default 180)
# Idempotent: a server or worker this script started that is still alive is reused.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"
BIN=${BIN:-$REPO/.venv/bin}
export PREFECT_HOME=${PREFECT_HOME:-$REPO/.prefect}
export PREFECT_SERVER_ANALYTICS_ENABLED=${PREFECT_SERVER_ANALYTICS_ENABLED:-false}
HOST=127.0.0.1
PORT=${PREFECT_SERVER_API_PORT:-4200}
URL="http://$HOST:$PORT"
POOL=fire-mpo
LIMIT=${FIRE_MPO_WORKER_LIMIT:-1}
# Concurrency leases on disk, shared with `make run`'s temporary API (same PREFECT_HOME), so a
# slot held by a killed run can be found and freed at the next start (tasks/runs.py).
export PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE=${PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE:-prefect.server.concurrency.lease_storage.filesystem}
# Poll the local API every 2 s (Prefect: 10 s): a submitted run starts sooner, at no real cost.
export PREFECT_WORKER_QUERY_SECONDS=${PREFECT_WORKER_QUERY_SECONDS:-2}
TIMEOUT=${FIRE_MPO_SERVE_TIMEOUT:-180}
mkdir -p "$PREFECT_HOME"
STATE=$(cd "$PREFECT_HOME" && pwd)

alive() { [[ -f "$STATE/$1.pid" ]] && kill -0 "$(cat "$STATE/$1.pid")" 2>/dev/null; }
healthy() { curl -sf --max-time 5 "$URL/api/health" >/dev/null 2>&1; }
port_busy() { (exec 3<>"/dev/tcp/$HOST/$PORT") 2>/dev/null; }

# Start a command in its own session (so stop.sh can end it and its children as one process
# group), detached from this shell, with its output in $STATE/<name>.log.
start() {
    local name=$1
    shift
    setsid nohup "$@" >"$STATE/$name.log" 2>&1 </dev/null &
    echo $! >"$STATE/$name.pid"
}

# ---------------------------------------------------------------- server
if alive server && healthy; then
    echo "Server already running (pid $(cat "$STATE/server.pid")) at $URL"
else
    if port_busy; then
        echo "error: port $PORT on $HOST is in use by another program;" \
            "set PREFECT_SERVER_API_PORT to a free port" >&2
        exit 1
    fi
    echo "Starting Prefect server at $URL (home $STATE, log $STATE/server.log)"
    # The server itself must not be pointed at an API (it is the API).
    start server env -u PREFECT_API_URL "$BIN/prefect" --no-prompt server start \
        --host "$HOST" --port "$PORT"
    t0=$SECONDS
    until healthy; do
        if ! alive server; then
            echo "error: the server exited; last lines of $STATE/server.log:" >&2
            tail -n 30 "$STATE/server.log" >&2
            exit 1
        fi
        if ((SECONDS - t0 > TIMEOUT)); then
            echo "error: no answer from $URL/api/health after ${TIMEOUT}s" >&2
            tail -n 30 "$STATE/server.log" >&2
            exit 1
        fi
        sleep 1
    done
    echo "Server healthy after $((SECONDS - t0))s"
fi
export PREFECT_API_URL="$URL/api"
# What a new shell needs for the README's `prefect ...` commands: the API, this home, and the
# venv's `prefect` on PATH (without it: "prefect: command not found").
cat >"$STATE/serve.env" <<ENV
export PREFECT_API_URL=$PREFECT_API_URL
export PREFECT_HOME=$STATE
export PATH="$(cd "$BIN" && pwd):\$PATH"
ENV

# ---------------------------------------------------------------- pools + deployments
"$BIN/python" -m deployments.register

# ---------------------------------------------------------------- worker
if alive worker; then
    echo "Worker already running (pid $(cat "$STATE/worker.pid")) on pool $POOL"
else
    echo "Starting a process worker on pool $POOL (log $STATE/worker.log)"
    start worker "$BIN/prefect" --no-prompt worker start --pool "$POOL" --type process \
        --name "$POOL-$(hostname)-$PORT" --limit "$LIMIT" --install-policy never
    # Wait until the API lists it online, so a run submitted right after is picked up.
    t0=$SECONDS
    until curl -sf --max-time 5 -X POST -H 'Content-Type: application/json' \
        -d '{"workers": {"status": {"any_": ["ONLINE"]}}}' \
        "$PREFECT_API_URL/work_pools/$POOL/workers/filter" | grep -q '"status":"ONLINE"'; do
        if ! alive worker; then
            echo "error: the worker exited; last lines of $STATE/worker.log:" >&2
            tail -n 30 "$STATE/worker.log" >&2
            exit 1
        fi
        if ((SECONDS - t0 > 120)); then
            echo "error: the worker did not come online in 120s; see $STATE/worker.log" >&2
            exit 1
        fi
        sleep 1
    done
fi

cat <<EOF

FiRe-MPO is served.
  Dashboard:  $URL
  First, in each new shell:   source $STATE/serve.env
              (sets PREFECT_API_URL=$PREFECT_API_URL and puts $BIN on PATH)
  Run:        prefect deployment run fire-mpo/full-cycle --watch
              prefect deployment run fire-mpo/full-cycle -p config=configs/default.yaml -p rounds=2
              prefect deployment run fire-mpo/stage-evaluate --watch     (one stage, inputs from the store)
              prefect deployment run fire-mpo/next-round --watch         (one more round)
  Loop:       a round whose validation decision is "continue" starts fire-mpo/next-round by
              itself (automation "fire-mpo: next round on improvement", dashboard -> Automations;
              prefect automation pause "fire-mpo: next round on improvement" to switch it off)
  Schedule:   next-round's nightly schedule is off: switch it on in the dashboard (Deployments ->
              next-round) or: prefect deployment schedule ls fire-mpo/next-round
                              prefect deployment schedule resume fire-mpo/next-round <ID>
  Logs:       $STATE/server.log, $STATE/worker.log
  Stop:       make stop
EOF
