#!/bin/sh
# One-shot initialisation of the Redis Cluster of docker-compose.cluster.yml (the service
# `redis-cluster-init`; tested against local redis-servers by tests/tests/deploy.rs).
#
#   REDIS_CLUSTER_NODES     the nodes, "host:port host:port ..." (all of them, masters and
#                           replicas alike: redis-cli picks the masters)
#   REDIS_CLUSTER_REPLICAS  replicas per master (default 1)
#   REDIS_CLUSTER_TIMEOUT   seconds to wait for the nodes, then for the cluster (default 120)
#
# 1. Waits until every node answers PING.
# 2. No node has slots yet: creates the cluster (`redis-cli --cluster create`, by IP: CLUSTER
#    MEET takes addresses, not names). Otherwise the cluster exists (a later `docker compose up`):
#    nothing is created; every node is introduced again by its current IP (CLUSTER MEET of a
#    known node at a new address updates it), which heals a cluster whose containers came back
#    on other addresses.
# 3. Waits until every node reports cluster_state:ok, knows every other node and sees every
#    replica as one, then exits 0.
#    The gateways start only after that (depends_on: service_completed_successfully).
set -eu

nodes=${REDIS_CLUSTER_NODES:?set REDIS_CLUSTER_NODES to "host:port host:port ..."}
# shellcheck disable=SC2086 # one space between nodes, whatever separated them
nodes=$(echo $nodes)
replicas=${REDIS_CLUSTER_REPLICAS:-1}
timeout=${REDIS_CLUSTER_TIMEOUT:-120}

count=0
for node in $nodes; do count=$((count + 1)); done
# Replicas the finished cluster has: count * replicas / (1 + replicas).
want_replicas=$((count * replicas / (1 + replicas)))

cli() {
    node=$1
    shift
    redis-cli -h "${node%:*}" -p "${node##*:}" "$@"
}

# host:port -> ip:port (IPv4; an address is kept as it is).
by_ip() {
    host=${1%:*}
    case $host in
        *[!0-9.]*) ip=$(getent ahostsv4 "$host" | awk '{ print $1; exit }') ;;
        *) ip=$host ;;
    esac
    [ -n "$ip" ] || return 1
    echo "$ip:${1##*:}"
}

info_field() { # node field
    cli "$1" CLUSTER INFO 2>/dev/null | tr -d '\r' | sed -n "s/^$2://p"
}

deadline=$(($(date +%s) + timeout))
wait_until() { # description command...
    what=$1
    shift
    until "$@"; do
        if [ "$(date +%s)" -ge "$deadline" ]; then
            echo "redis-cluster-init: timed out waiting for $what" >&2
            return 1
        fi
        sleep 1
    done
}

all_answer() {
    for node in $nodes; do
        [ "$(cli "$node" PING 2>/dev/null)" = PONG ] || return 1
        by_ip "$node" >/dev/null || return 1
    done
}

whole() {
    for node in $nodes; do
        [ "$(info_field "$node" cluster_state)" = ok ] || return 1
        [ "$(info_field "$node" cluster_known_nodes)" = "$count" ] || return 1
        seen=$(cli "$node" CLUSTER NODES 2>/dev/null | grep -c slave || true)
        [ "$seen" -ge "$want_replicas" ] || return 1
    done
}

wait_until "every node to answer PING ($nodes)" all_answer

existing=""
for node in $nodes; do
    if [ "$(info_field "$node" cluster_slots_assigned)" != 0 ]; then
        existing=$node
        break
    fi
done

if [ -z "$existing" ]; then
    addrs=""
    for node in $nodes; do addrs="$addrs $(by_ip "$node")"; done
    echo "redis-cluster-init: creating the cluster over$addrs with $replicas replica(s) per master"
    # shellcheck disable=SC2086 # one argument per address
    redis-cli --cluster create $addrs --cluster-replicas "$replicas" --cluster-yes
else
    echo "redis-cluster-init: the cluster exists (slots on $existing); introducing every node by its current address"
    for node in $nodes; do
        [ "$node" != "$existing" ] || continue
        addr=$(by_ip "$node")
        cli "$existing" CLUSTER MEET "${addr%:*}" "${addr##*:}" >/dev/null
    done
fi

wait_until "the cluster to be whole (cluster_state:ok, $count nodes known on every node)" whole
echo "redis-cluster-init: cluster ok"
cli "${existing:-${nodes%% *}}" CLUSTER NODES
