#!/usr/bin/env bash
# A private 3-node RabbitMQ cluster for failover tests, next to (and independent of) the
# shared node on 5672.
#
#   scripts/cluster.sh start [PREFIX] [BASE_PORT]   # prints the 3 AMQP URLs, comma-separated
#   scripts/cluster.sh stop  [PREFIX]
#   scripts/cluster.sh status [PREFIX] [BASE_PORT]
#
# Nodes PREFIX1@localhost, PREFIX2@localhost, PREFIX3@localhost (default PREFIX "ctnode")
# listen on 127.0.0.1:BASE_PORT, BASE_PORT+1, BASE_PORT+2 (default 5701..5703); nodes 2 and
# 3 join node 1 with `rabbitmqctl -n … join_cluster`. Each node is a scripts/rabbit-node.sh
# node (own data, logs, config; state deleted on stop). Stop one node under load with
#   rabbitmqctl -n PREFIX2@localhost stop_app   (and start_app to bring it back).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
cmd=${1:-}
prefix=${2:-ctnode}
base=${3:-5701}

as_broker_user() {
    if [ "$(id -u)" = 0 ] && id -u rabbitmq >/dev/null 2>&1; then
        runuser -u rabbitmq -- env HOME="$(getent passwd rabbitmq | cut -d: -f6)" "$@"
    else
        "$@"
    fi
}

ctl() {
    local node=$1
    shift
    as_broker_user timeout 60 /usr/lib/rabbitmq/bin/rabbitmqctl -q -n "$node@localhost" "$@"
}

urls() {
    echo "amqp://guest:guest@127.0.0.1:$base/%2f,amqp://guest:guest@127.0.0.1:$((base + 1))/%2f,amqp://guest:guest@127.0.0.1:$((base + 2))/%2f"
}

start() {
    local pids=() i
    local logdir
    logdir=$(mktemp -d)
    for i in 1 2 3; do
        "$here/rabbit-node.sh" start "$prefix$i" $((base + i - 1)) >"$logdir/$i.out" 2>&1 &
        pids+=($!)
    done
    local failed=0
    for i in 0 1 2; do
        wait "${pids[$i]}" || { failed=1; cat "$logdir/$((i + 1)).out" >&2; }
    done
    rm -rf "$logdir"
    if [ $failed = 1 ]; then
        stop
        return 1
    fi
    join() {
        local n=$1 out
        out=$(ctl "$prefix$n" stop_app 2>&1 &&
            ctl "$prefix$n" reset 2>&1 &&
            ctl "$prefix$n" join_cluster "${prefix}1@localhost" 2>&1 &&
            ctl "$prefix$n" start_app 2>&1) || { echo "$out" >&2; return 1; }
    }
    join 2 &
    local j2=$!
    join 3 &
    local j3=$!
    if ! wait $j2 || ! wait $j3; then
        echo "joining the cluster failed" >&2
        stop
        return 1
    fi
    # Every member running (from node 1's view) before anyone declares quorum queues.
    local deadline=$((SECONDS + 60))
    until [ "$(ctl "${prefix}1" eval 'length(rabbit_nodes:all_running()).' 2>/dev/null)" = 3 ]; do
        if [ $SECONDS -ge $deadline ]; then
            echo "cluster did not reach 3 running nodes" >&2
            stop
            return 1
        fi
        sleep 0.5
    done
    urls
}

stop() {
    local i
    for i in 1 2 3; do
        "$here/rabbit-node.sh" stop "$prefix$i" >/dev/null 2>&1 &
    done
    wait
    echo "stopped ${prefix}1..3"
}

status() {
    local i rc=0
    for i in 1 2 3; do
        "$here/rabbit-node.sh" status "$prefix$i" $((base + i - 1)) || rc=1
    done
    [ $rc = 0 ] && ctl "${prefix}1" cluster_status 2>/dev/null | sed -n '/Running Nodes/,/Versions/p'
    return $rc
}

case $cmd in
    start) start ;;
    stop) stop ;;
    status) status ;;
    *)
        echo "usage: $0 start|stop|status [PREFIX] [BASE_PORT]" >&2
        exit 2
        ;;
esac
