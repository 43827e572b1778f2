#!/usr/bin/env bash
# A local Ray head for development and job-submission tests, stopped by its own PID
# (never `ray stop`: it kills every Ray process on the machine by name).
#
#   cluster/local.sh start     # background head on 127.0.0.1; dashboard http://127.0.0.1:$RAY_DASHBOARD_PORT
#   cluster/local.sh stop      # SIGTERM to the head's PID, wait for it to drain
#   cluster/local.sh status
#
# Settings (environment): RAY_PORT (6380), RAY_DASHBOARD_PORT (8265), RAY_NUM_CPUS (all cores),
# RAY_AGENT_PORT (52365: the job agent; give another when a second Ray runs on this machine),
# RAY_CLIENT_PORT (10001), RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S (5: how long `stop` lets Ray drain),
# SAERAY_RAY_DIR (state: pid file, logs, Ray temp dir; default ./.ray-local). Start it from the
# project's venv (or with .venv/bin first on PATH): jobs run with the `python` the head was started with.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
dir=${SAERAY_RAY_DIR:-$here/.ray-local}
pidfile=$dir/head.pid
port=${RAY_PORT:-6380}
dport=${RAY_DASHBOARD_PORT:-8265}
ray_bin=${RAY_BIN:-$(command -v ray || echo "$here/.venv/bin/ray")}

running() { [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }

case "${1:-}" in
  start)
    if running; then echo "head already running (pid $(cat "$pidfile"))"; exit 0; fi
    mkdir -p "$dir"
    # Ray's unix sockets need a short temp path
    tmp=$(mktemp -d /tmp/saeray-ray-XXXXXX)
    echo "$tmp" > "$dir/tempdir"
    export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 RAY_AUTH_MODE=${RAY_AUTH_MODE:-disabled} RAY_USAGE_STATS_ENABLED=0
    export RAY_TRAIN_HEALTH_CHECK_INTERVAL_S=${RAY_TRAIN_HEALTH_CHECK_INTERVAL_S:-0.2}
    # on SIGTERM Ray drains the node (up to 30 s by default) so Serve can move its replicas; a local head
    # has none, and once a job has run the drain waited out all 30 s, so `stop` took half a minute
    export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=${RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S:-5}
    "$ray_bin" start --head --block --node-ip-address 127.0.0.1 --dashboard-host 127.0.0.1 \
      --port "$port" --dashboard-port "$dport" --num-cpus "${RAY_NUM_CPUS:-$(nproc)}" \
      --dashboard-agent-listen-port "${RAY_AGENT_PORT:-52365}" --ray-client-server-port "${RAY_CLIENT_PORT:-10001}" \
      --temp-dir "$tmp" --disable-usage-stats --include-dashboard true \
      >"$dir/head.log" 2>&1 &
    echo $! > "$pidfile"
    for _ in $(seq 1 120); do  # bounded wait: 60 s
      if ! running; then echo "head exited; see $dir/head.log" >&2; tail -20 "$dir/head.log" >&2; exit 1; fi
      if python3 - "$dport" <<'PY' 2>/dev/null; then echo "head up: http://127.0.0.1:$dport (pid $(cat "$pidfile"))"; exit 0; fi
import sys, urllib.request
urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/api/version", timeout=1)
urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/api/jobs/", timeout=2)  # the job server, not only the dashboard
PY
      sleep 0.5
    done
    echo "head did not answer on :$dport within 60 s; see $dir/head.log" >&2; exit 1 ;;
  stop)
    if ! running; then echo "no head running"; rm -f "$pidfile"; exit 0; fi
    pid=$(cat "$pidfile")
    kill -TERM "$pid"
    for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    if kill -0 "$pid" 2>/dev/null; then
      # still draining after 30 s (a loaded machine): kill it, and return only once it is gone
      kill -KILL "$pid" 2>/dev/null || true
      for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    fi
    rm -f "$pidfile"
    [ -f "$dir/tempdir" ] && rm -rf "$(cat "$dir/tempdir")" "$dir/tempdir"
    echo "head stopped" ;;
  status)
    if running; then echo "running (pid $(cat "$pidfile"), dashboard :$dport)"; else echo "not running"; exit 1; fi ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
