#!/usr/bin/env bash
# The whole test suite, on a fresh machine: starts RabbitMQ, Redis and PostgreSQL if they are
# installed but not running, installs what the out-of-Rust tests drive (Python's pika for the
# front-end interop test, Debian's Chromium for the status page), then runs every test of the
# workspace against the real servers. Extra arguments go to `cargo test` (e.g. `--test core_replies`).
# `.ci/run` calls this after its format and lint checks.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "[test] $*"; }

ensure_rabbitmq() {
  if rabbitmqctl -q status >/dev/null 2>&1; then
    log "rabbitmq is running"
  else
    log "starting rabbitmq"
    rabbitmq-server -detached
  fi
  rabbitmqctl -q await_startup --timeout 120
}

ensure_redis() {
  if redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
    log "redis is running"
  else
    log "starting redis"
    redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no
  fi
}

ensure_postgres() {
  if pg_isready -h 127.0.0.1 -p 5432 >/dev/null 2>&1; then
    log "postgresql is running"
  else
    log "starting postgresql"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start
    for _ in $(seq 60); do pg_isready -h 127.0.0.1 -p 5432 >/dev/null 2>&1 && break; sleep 1; done
  fi
}

ensure_python_deps() {
  # tests/rpc_frontend.rs drives the demo handlers from Python, as a front-end team would.
  if ! python3 -c "import pika" >/dev/null 2>&1; then
    log "installing python test dependencies (pika)"
    python3 -m pip install --quiet -r tests/frontend/requirements.txt
  fi
}

ensure_chromium() {
  # tests/observability_status_page.rs renders the status page in headless Chromium.
  if ! command -v chromium >/dev/null 2>&1; then
    log "installing chromium"
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq chromium >/dev/null
  fi
}

ensure_rabbitmq
ensure_redis
ensure_postgres
ensure_python_deps
ensure_chromium

log "cargo test --workspace $*"
exec cargo test --workspace "$@"
