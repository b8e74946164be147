#!/usr/bin/env bash
# Benchmarks cluster mode on this machine (see BENCHMARKS.md): natterd on PostgreSQL and a NATS bus,
# one node vs two nodes, with natter-bench's pairs scenario. With two nodes every pair's sender and
# receiver are connected to different nodes, so every message crosses the bus.
#   1. closed loop (BENCH_PAIRS pairs x BENCH_MESSAGES, pre-encrypted): messages/s and latency;
#   2. open loop at BENCH_LOW_RATE messages/s: latency with the server far from saturation, so that the
#      difference between one and two nodes is the cost of the bus hop (publish, NATS, wake-up, the
#      receiving node's queue read).
# Needs PostgreSQL (NATTER_TEST_POSTGRES, default postgres://postgres@127.0.0.1:5432/postgres; a fresh
# database is created and dropped) and nats-server (a private one is started on BENCH_NATS_PORT).
#
# Usage: scripts/bench-cluster.sh
# Environment: BENCH_PAIRS (50), BENCH_MESSAGES (per pair, 400), BENCH_LOW_RATE (200),
#   BENCH_PORT (15301: nodes on PORT and PORT+1), BENCH_NATS_PORT (14222), BENCH_KEEP=1 to keep files.
set -euo pipefail
cd "$(dirname "$0")/.."

PAIRS=${BENCH_PAIRS:-50}
MESSAGES=${BENCH_MESSAGES:-400}
LOW_RATE=${BENCH_LOW_RATE:-200}
PORT=${BENCH_PORT:-15301}
NATS_PORT=${BENCH_NATS_PORT:-14222}
PG_ADMIN=${NATTER_TEST_POSTGRES:-postgres://postgres@127.0.0.1:5432/postgres}
TARGET=${CARGO_TARGET_DIR:-target}
BIN="$TARGET/release"

for tool in cargo psql nats-server; do
    command -v "$tool" >/dev/null || {
        echo "bench-cluster: $tool is missing" >&2
        exit 1
    }
done

echo "== building natterd and natter-bench (release)" >&2
cargo build -q --release -p natter-server -p natter-bench

WORK=$(mktemp -d "${TMPDIR:-/tmp}/natter-bench-cluster.XXXXXX")
DB="natter_bench_$(od -An -N4 -tx4 /dev/urandom | tr -d ' ')"
PG_URL="${PG_ADMIN%/*}/$DB"
PIDS=()
stop_all() {
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    PIDS=()
}
cleanup() {
    stop_all
    if [ -n "${NATS_PID:-}" ]; then
        kill "$NATS_PID" 2>/dev/null || true
        wait "$NATS_PID" 2>/dev/null || true
    fi
    psql "$PG_ADMIN" -qc "DROP DATABASE IF EXISTS $DB" >/dev/null 2>&1 || true
    if [ "${BENCH_KEEP:-0}" = 1 ]; then
        echo "bench-cluster: kept $WORK" >&2
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT

nats-server -a 127.0.0.1 -p "$NATS_PORT" >"$WORK/nats.log" 2>&1 &
NATS_PID=$!

SERVER_CPU=()
BENCH_CPU=()
if command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ]; then
    SERVER_CPU=(taskset -c 0)
    BENCH_CPU=(taskset -c 1)
fi

# start_node RUN ID PORT: natterd node ID of run RUN (its own data directory, shared key directory).
start_node() {
    local dir="$WORK/$1/$2"
    mkdir -p "$dir"
    "${SERVER_CPU[@]}" "$BIN/natterd" --data "$dir/data" --listen "127.0.0.1:$3" \
        --http-listen 127.0.0.1:0 --sms-gateway "file:$WORK/$1/sms.log" \
        --store "$PG_URL" --bus "nats://127.0.0.1:$NATS_PORT" --node-id "$2" --key-dir "$WORK/$1/keys" \
        --codes-per-ip-per-hour 1000000 --verifies-per-ip-per-hour 1000000 \
        --max-connections-per-ip 100000 --handshakes-per-ip-per-s 0 --sends-per-account-per-s 0 \
        >"$dir/natterd.log" 2>&1 &
    PIDS+=($!)
    for _ in $(seq 1 100); do
        grep -q "natterd listening" "$dir/natterd.log" 2>/dev/null && return 0
        sleep 0.1
    done
    echo "bench-cluster: node $2 did not start:" >&2
    cat "$dir/natterd.log" >&2
    exit 1
}

bench() {
    local run=$1 servers=$2
    shift 2
    timeout --signal=INT --kill-after=30 900 "${BENCH_CPU[@]}" "$BIN/natter-bench" pairs "$@" \
        --server "$servers" --sms-log "$WORK/$run/sms.log"
}

# run NAME NODES: a fresh database, NODES nodes, the two measurements.
run() {
    local name=$1 nodes=$2 servers="127.0.0.1:$PORT"
    psql "$PG_ADMIN" -qc "DROP DATABASE IF EXISTS $DB" >/dev/null
    psql "$PG_ADMIN" -qc "CREATE DATABASE $DB" >/dev/null
    "$BIN/natterd" migrate --store "$PG_URL" >/dev/null
    start_node "$name" a "$PORT"
    if [ "$nodes" = 2 ]; then
        start_node "$name" b "$((PORT + 1))"
        servers="127.0.0.1:$PORT,127.0.0.1:$((PORT + 1))"
    fi
    echo "== $name: $PAIRS pairs x $MESSAGES messages, closed loop, pre-encrypted" >&2
    line=$(bench "$name" "$servers" --pairs "$PAIRS" --messages "$MESSAGES" --pre-encrypted --timeout 300)
    echo "$name closed $line"
    echo "== $name: $PAIRS pairs at $LOW_RATE messages/s, open loop" >&2
    line=$(bench "$name" "$servers" --pairs "$PAIRS" --messages "$MESSAGES" --pre-encrypted --rate "$LOW_RATE" --timeout 300)
    echo "$name open $line"
    if grep -hE "ERROR|panicked" "$WORK/$name"/*/natterd.log >/dev/null 2>&1; then
        echo "bench-cluster: errors logged during $name:" >&2
        grep -hE "ERROR|panicked" "$WORK/$name"/*/natterd.log | sort | uniq -c | head >&2
    fi
    stop_all
}

echo "== machine: $(nproc) CPUs; nodes on CPU ${SERVER_CPU[2]:-any}, bench on CPU ${BENCH_CPU[2]:-any}," \
    "PostgreSQL and NATS unpinned" >&2
run one-node 1
run two-nodes 2
