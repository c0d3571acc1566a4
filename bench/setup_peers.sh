#!/usr/bin/env bash
# Set up the benchmark suite's peer task queues (bench/peers/), idempotently:
#   - bench/.venv-peers: a virtualenv with bench/requirements-peers.txt (never wsq's deps);
#   - bench/node_modules: BullMQ from bench/package-lock.json (npm ci);
#   - Redis answering on 127.0.0.1:6379 (started without persistence if nothing answers).
# PostgreSQL (for pgqueuer and procrastinate) is not started here: the peers use the tests'
# (WSQ_TEST_DATABASE, else 127.0.0.1:5432) and are skipped when none answers.
# Prints one summary line on success; on failure, what failed and its output (stderr).
set -euo pipefail

BENCH="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VENV="$BENCH/.venv-peers"
LOG="$(mktemp)"
trap 'rm -f "$LOG"' EXIT

fail() {
  echo "setup_peers: $1" >&2
  tail -n 40 "$LOG" >&2
  exit 1
}

digest() { sha256sum "$@" | sha256sum | cut -d' ' -f1; }

redis_answers() {
  # PING over bash's /dev/tcp (no redis-cli needed); true if Redis answers +PONG.
  local reply=""
  { exec 3<>/dev/tcp/127.0.0.1/6379; } 2>/dev/null || return 1
  printf 'PING\r\n' >&3
  read -r -t 2 reply <&3 || true
  exec 3<&- 3>&-
  [[ "$reply" == "+PONG"* ]]
}

# -- Python peers ---------------------------------------------------------------------------
py_state="$VENV/.requirements.sha256"
py_want="$(digest "$BENCH/requirements-peers.txt")"
if [[ ! -x "$VENV/bin/python" ]]; then
  python3 -m venv "$VENV" >"$LOG" 2>&1 || fail "python3 -m venv $VENV failed"
fi
if [[ "$(cat "$py_state" 2>/dev/null)" != "$py_want" ]]; then
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    -r "$BENCH/requirements-peers.txt" >"$LOG" 2>&1 || fail "pip install -r requirements-peers.txt failed"
  echo "$py_want" >"$py_state"
fi

# -- BullMQ (Node) ----------------------------------------------------------------------------
command -v npm >/dev/null || fail "npm is missing (BullMQ needs Node 20+ and npm)"
node_state="$BENCH/node_modules/.wsq-bench-lock.sha256"
node_want="$(digest "$BENCH/package.json" "$BENCH/package-lock.json")"
if [[ ! -d "$BENCH/node_modules/bullmq" || "$(cat "$node_state" 2>/dev/null)" != "$node_want" ]]; then
  npm ci --prefix "$BENCH" --no-audit --no-fund --loglevel=error >"$LOG" 2>&1 \
    || fail "npm ci in bench/ failed"
  echo "$node_want" >"$node_state"
fi

# -- Redis ------------------------------------------------------------------------------------
if ! redis_answers; then
  if ! command -v redis-server >/dev/null; then
    export DEBIAN_FRONTEND=noninteractive
    { apt-get install -y redis-server || { apt-get update && apt-get install -y redis-server; }; } \
      >"$LOG" 2>&1 || fail "apt-get install -y redis-server failed"
  fi
  mkdir -p /var/lib/redis /var/log/redis
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log >"$LOG" 2>&1 || fail "redis-server failed"
  for _ in $(seq 100); do
    redis_answers && break
    sleep 0.1
  done
  redis_answers || fail "redis-server started but does not answer on 127.0.0.1:6379"
fi

bullmq="$(sed -n 's/^ *"version": "\(.*\)",*$/\1/p' "$BENCH/node_modules/bullmq/package.json" | head -n 1)"
echo "setup_peers: ok (bench/.venv-peers from requirements-peers.txt, bullmq $bullmq in bench/node_modules, redis on 127.0.0.1:6379)"
