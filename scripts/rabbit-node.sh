#!/usr/bin/env bash
# A private RabbitMQ node for disruptive tests (broker restarts, TLS, clusters), fully separate
# from the shared node on 5672: its own node name, ports, data, logs, config and plugins.
#
#   scripts/rabbit-node.sh start  NAME AMQP_PORT [--tls CERTDIR]   # prints the AMQP URL
#   scripts/rabbit-node.sh stop   NAME [AMQP_PORT]
#   scripts/rabbit-node.sh status NAME [AMQP_PORT]
#
# NAME becomes the Erlang node NAME@localhost (use `rabbitmqctl -n NAME@localhost …`).
# AMQP listens on 127.0.0.1:AMQP_PORT; with --tls also amqps on AMQP_PORT+1 using
# CERTDIR/{ca.pem,server.pem,server.key}. Distribution port: AMQP_PORT+20000 (override with
# RABBIT_NODE_DIST_PORT). State lives in ${RABBIT_NODES_DIR:-/tmp/cottontail-nodes}/NAME and
# is deleted by `stop` (set RABBIT_NODE_KEEP=1 to keep it). Management is not enabled.
# The node runs as the `rabbitmq` user when started by root, so it shares the Erlang cookie
# (/var/lib/rabbitmq/.erlang.cookie) that `rabbitmqctl` uses as root.
# RABBIT_NODE_START_TIMEOUT (seconds, default 90) bounds the wait for startup.
set -euo pipefail

usage() {
    echo "usage: $0 start|stop|status NAME AMQP_PORT [--tls CERTDIR]" >&2
    exit 2
}

[ $# -ge 2 ] || usage
cmd=$1
name=$2
port=${3:-}
shift 2
[ $# -gt 0 ] && shift
certdir=
while [ $# -gt 0 ]; do
    case $1 in
        --tls) certdir=${2:?--tls needs a directory}; shift 2 ;;
        *) usage ;;
    esac
done

case $name in
    *@*) node=$name; short=${name%@*} ;;
    *) node=$name@localhost; short=$name ;;
esac
base=${RABBIT_NODES_DIR:-/tmp/cottontail-nodes}
dir=$base/$short
RABBITMQ_LIB=/usr/lib/rabbitmq/bin

# Run a command as the broker's user (root → rabbitmq), keeping the given environment.
as_broker_user() {
    if [ "$(id -u)" = 0 ] && id -u rabbitmq >/dev/null 2>&1; then
        runuser -u rabbitmq -- env HOME="$(getent passwd rabbitmq | cut -d: -f6)" "$@"
    else
        "$@"
    fi
}

port_open() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

node_pid() {
    [ -f "$dir/pid" ] && cat "$dir/pid" 2>/dev/null || true
}

alive() {
    local pid
    pid=$(node_pid)
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null
}

url() {
    echo "amqp://guest:guest@127.0.0.1:$port/%2f"
}

start() {
    [ -n "$port" ] || usage
    if alive; then
        echo "node $node already running (pid $(node_pid))" >&2
        url
        return 0
    fi
    rm -rf "$dir"
    mkdir -p "$dir/mnesia" "$dir/log"
    local dist=${RABBIT_NODE_DIST_PORT:-$((port + 20000))}
    {
        echo "listeners.tcp.1 = 127.0.0.1:$port"
        echo "log.console = false"
        echo "log.file.level = info"
        # Smaller footprint on a shared CI machine.
        echo "collect_statistics_interval = 30000"
        if [ -n "$certdir" ]; then
            certdir=$(cd "$certdir" && pwd)
            echo "listeners.ssl.1 = 127.0.0.1:$((port + 1))"
            echo "ssl_options.cacertfile = $certdir/ca.pem"
            echo "ssl_options.certfile = $certdir/server.pem"
            echo "ssl_options.keyfile = $certdir/server.key"
            echo "ssl_options.verify = verify_none"
            echo "ssl_options.fail_if_no_peer_cert = false"
        fi
    } >"$dir/rabbitmq.conf"
    echo "[]." >"$dir/enabled_plugins"
    : >"$dir/rabbitmq-env.conf"
    if [ "$(id -u)" = 0 ] && id -u rabbitmq >/dev/null 2>&1; then
        chown -R rabbitmq:rabbitmq "$dir"
        chmod 755 "$base" "$dir" 2>/dev/null || true
        if [ -n "$certdir" ]; then
            chmod a+rx "$certdir"
            chmod a+r "$certdir"/ca.pem "$certdir"/server.pem
            chown rabbitmq "$certdir"/server.key
        fi
    fi
    (
        cd "$dir"
        as_broker_user \
            RABBITMQ_NODENAME="$node" \
            RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 \
            RABBITMQ_NODE_PORT="$port" \
            RABBITMQ_DIST_PORT="$dist" \
            RABBITMQ_MNESIA_BASE="$dir/mnesia" \
            RABBITMQ_LOG_BASE="$dir/log" \
            RABBITMQ_CONFIG_FILE="$dir/rabbitmq.conf" \
            RABBITMQ_ADVANCED_CONFIG_FILE="$dir/advanced.config" \
            RABBITMQ_ENABLED_PLUGINS_FILE="$dir/enabled_plugins" \
            RABBITMQ_CONF_ENV_FILE="$dir/rabbitmq-env.conf" \
            RABBITMQ_PID_FILE="$dir/pid" \
            ERL_EPMD_ADDRESS=127.0.0.1 \
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1} +sbwt none +sbwtdcpu none +sbwtdio none" \
            setsid "$RABBITMQ_LIB/rabbitmq-server" >"$dir/log/stdout.log" 2>&1 </dev/null &
    )
    local limit=${RABBIT_NODE_START_TIMEOUT:-90}
    local deadline=$((SECONDS + limit))
    until port_open "$port" && { [ -z "$certdir" ] || port_open $((port + 1)); }; do
        if [ $SECONDS -ge $deadline ]; then
            echo "node $node did not open port $port within ${limit}s; log: $dir/log" >&2
            tail -n 30 "$dir/log/stdout.log" >&2 || true
            return 1
        fi
        if [ -f "$dir/pid" ] && ! alive; then
            echo "node $node exited during startup; log: $dir/log" >&2
            tail -n 30 "$dir/log/stdout.log" >&2 || true
            return 1
        fi
        sleep 0.2
    done
    # Optional watchdog: stop the node when the process that owns it dies (a test killed
    # before its cleanup ran), so no node outlives its test run.
    if [ -n "${RABBIT_NODE_OWNER_PID:-}" ]; then
        local self
        self=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
        setsid bash -c 'while kill -0 "$1" 2>/dev/null && [ -d "$3" ]; do sleep 2; done; [ -d "$3" ] && "$0" stop "$2" >/dev/null 2>&1' \
            "$self" "$name" "$RABBIT_NODE_OWNER_PID" "$dir" >/dev/null 2>&1 </dev/null &
    fi
    url
}

stop() {
    if alive; then
        local pid
        pid=$(node_pid)
        # SIGTERM is a graceful stop (rabbit_prelaunch_sighandler); no CLI round trip needed.
        kill -TERM "$pid" 2>/dev/null || true
        local deadline=$((SECONDS + 30))
        while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt $deadline ]; do sleep 0.2; done
        kill -9 "$pid" 2>/dev/null || true
    fi
    if [ -z "${RABBIT_NODE_KEEP:-}" ]; then
        rm -rf "$dir"
    fi
    echo "stopped $node"
}

status() {
    if alive; then
        echo "running $node pid $(node_pid)${port:+ $(url)}"
    else
        echo "not running $node"
        return 1
    fi
}

case $cmd in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *) usage ;;
esac
