#!/usr/bin/env bash
# Stop what scripts/serve.sh started (`make stop`): the worker first, so no flow run is handed
# out to a dying API, then the server. Both were started in sessions of their own by serve.sh.
#
# The worker: its flow runs (Prefect starts each in a session of its own) get SIGTERM first, so
# they record themselves as Crashed while the API is still up (a rerun resumes: every finished
# stage is cached, `train` restarts from its last checkpoint); then the worker's process group.
# Prefect's worker turns a first SIGTERM into a graceful stop that waits for its runs and, once
# it has run one, can hang; a second SIGTERM is its own "stop now". So: SIGTERM, 5 s, SIGTERM,
# and SIGKILL for anything left after FIRE_MPO_STOP_TIMEOUT seconds (default 30).
# Safe to run when nothing is running.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATE=${PREFECT_HOME:-$REPO/.prefect}
TIMEOUT=${FIRE_MPO_STOP_TIMEOUT:-30}

# Every descendant pid of $1 (children first found through their parent, so before it exits).
descendants() {
    local child
    for child in $(ps -o pid= --ppid "$1" 2>/dev/null); do
        echo "$child"
        descendants "$child"
    done
}

# True while any of the pids $@ is alive.
any_alive() {
    local pid
    for pid in "$@"; do
        kill -0 "$pid" 2>/dev/null && return 0
    done
    return 1
}

stop() {
    local name=$1 pidfile="$STATE/$1.pid" pid
    if [[ ! -f "$pidfile" ]]; then
        echo "No $name to stop."
        return
    fi
    pid=$(cat "$pidfile")
    # serve.sh started it with setsid: its pid is its process group id. Only that group is
    # signalled, never a lone process that may have reused the pid.
    if ! kill -0 -- "-$pid" 2>/dev/null; then
        echo "No $name running (stale $pidfile)."
        rm -f "$pidfile"
        return
    fi
    local -a kids
    mapfile -t kids < <(descendants "$pid")
    echo "Stopping the $name (process group $pid${kids[*]:+, descendants ${kids[*]}})..."
    local t0=$SECONDS k again=1
    for k in "${kids[@]}"; do kill -TERM "$k" 2>/dev/null || true; done
    while any_alive "${kids[@]}" && ((SECONDS - t0 < TIMEOUT)); do sleep 0.5; done
    kill -TERM -- "-$pid" 2>/dev/null || true
    local t1=$SECONDS
    while kill -0 -- "-$pid" 2>/dev/null || any_alive "${kids[@]}"; do
        if ((again && SECONDS - t1 >= 5)); then
            kill -TERM -- "-$pid" 2>/dev/null || true # Prefect's second signal: stop now
            again=0
        fi
        if ((SECONDS - t0 >= TIMEOUT)); then
            echo "  still running after ${TIMEOUT}s: SIGKILL"
            kill -KILL -- "-$pid" 2>/dev/null || true
            for k in "${kids[@]}"; do kill -KILL "$k" 2>/dev/null || true; done
            break
        fi
        sleep 0.5
    done
    rm -f "$pidfile"
    echo "  stopped after $((SECONDS - t0))s"
}

stop worker
stop server
rm -f "$STATE/serve.env"
