#!/usr/bin/env bash
# Network namespaces for real-process group tests: N member namespaces joined by a bridge
# that lives in a namespace of its own, so nothing touches the host's interfaces.
#
#   scripts/netns-group.sh up PREFIX N     create PREFIX-br (bridge br0) and PREFIX-1..N,
#                                          member i at 10.77.0.i/24 on its eth0
#   scripts/netns-group.sh cut PREFIX I    take member I's link down (a partition)
#   scripts/netns-group.sh heal PREFIX I   bring it back
#   scripts/netns-group.sh down PREFIX N   delete every namespace it made (and their links)
#
# Needs root (ip netns). Run a member inside with: ip netns exec PREFIX-I intergroup node
# --interface 10.77.0.I --ttl 1 ...
set -euo pipefail

cmd=${1:?usage: netns-group.sh up|cut|heal|down PREFIX N|I}
prefix=${2:?prefix}
arg=${3:?count or member index}

case "$cmd" in
up)
    ip netns add "$prefix-br"
    ip -n "$prefix-br" link set lo up
    ip -n "$prefix-br" link add br0 type bridge
    # Flood multicast: there is no IGMP querier on this private segment.
    ip -n "$prefix-br" link set br0 type bridge mcast_snooping 0
    ip -n "$prefix-br" link set br0 up
    for i in $(seq 1 "$arg"); do
        ns="$prefix-$i"
        ip netns add "$ns"
        ip -n "$ns" link set lo up
        ip link add "v$$-$i" netns "$ns" type veth peer name "p$i" netns "$prefix-br"
        ip -n "$ns" link set "v$$-$i" name eth0
        ip -n "$ns" addr add "10.77.0.$i/24" dev eth0
        ip -n "$ns" link set eth0 up
        ip -n "$ns" route add 224.0.0.0/4 dev eth0
        ip -n "$prefix-br" link set "p$i" master br0
        ip -n "$prefix-br" link set "p$i" up
    done
    ;;
cut)
    ip -n "$prefix-br" link set "p$arg" down
    ;;
heal)
    ip -n "$prefix-br" link set "p$arg" up
    ;;
down)
    for i in $(seq 1 "$arg"); do
        ip netns del "$prefix-$i" 2>/dev/null || true
    done
    ip netns del "$prefix-br" 2>/dev/null || true
    ;;
*)
    echo "unknown command $cmd" >&2
    exit 2
    ;;
esac
