#!/usr/bin/env bash
# A local multi-node KDN on this machine: one controller and N storage nodes, each its own process.
#   deploy/local-cluster.sh start [N]   start (default N=2); logs and data under ${KDN_CLUSTER_DIR:-./kdn-data/cluster}
#   deploy/local-cluster.sh stop        stop everything started by `start`
# Ports: controller 7070, node i gRPC 7100+i, bulk 7200+i, metrics 9400 (controller) and 9400+i.
set -euo pipefail
cd "$(dirname "$0")/.."
dir="${KDN_CLUSTER_DIR:-./kdn-data/cluster}"
kdn="${KDN_BIN:-.venv/bin/kdn}"
case "${1:-start}" in
  start)
    n="${2:-2}"
    mkdir -p "$dir"
    "$kdn" controller --port 7070 --metrics-port 9400 --data-dir "$dir/controller" >"$dir/controller.out" 2>"$dir/controller.log" &
    echo $! >"$dir/pids"
    sleep 1
    for i in $(seq 1 "$n"); do
      "$kdn" node --node-id "node-$i" --port $((7100 + i)) --bulk-port $((7200 + i)) --metrics-port $((9400 + i)) \
        --controller 127.0.0.1:7070 --data-dir "$dir/node-$i" >"$dir/node-$i.out" 2>"$dir/node-$i.log" &
      echo $! >>"$dir/pids"
    done
    echo "controller 127.0.0.1:7070 with $n node(s); logs in $dir; stop with: $0 stop"
    ;;
  stop)
    if [ -f "$dir/pids" ]; then
      xargs -r kill <"$dir/pids" 2>/dev/null || true
      rm -f "$dir/pids"
    fi
    ;;
  *) echo "usage: $0 start [N] | stop" >&2; exit 2 ;;
esac
