#!/usr/bin/env bash
# Benchmarks natterd on this machine (see BENCHMARKS.md): builds natterd and natter-bench in release,
# starts natterd on 127.0.0.1 with a temporary data directory, the file SMS gateway and relaxed
# registration limits, pinned to CPU 0 (the bench to CPU 1) when taskset is there, then runs
#   1. pairs: 100 online pairs, every message encrypted with Olm, receivers decrypt all;
#   2. pairs: the same with pre-encrypted ciphertexts replayed (loads the server alone);
#   3. idle: registers 10,000 accounts, restarts natterd (so its baseline holds no registration garbage),
#      then holds 10,000 logged-in idle connections for RSS per connection;
#   4. group: one message after another to a group of 1,024 members (fan-out);
#   5. ceilings: the machine's own limits (loopback writes and latency, kernel memory per socket, Noise
#      handshake CPU), without natterd;
# prints each summary line and stops natterd. Every run is bounded in time.
#
# Usage: scripts/bench.sh [pairs|idle|group|ceilings|all]      (default all)
# Environment: BENCH_PORT (15222; natterd's media port is the next one), BENCH_PAIRS (100),
#   BENCH_MESSAGES (per pair, 1000), BENCH_GROUP_MEMBERS (1024), BENCH_GROUP_MESSAGES (200),
#   BENCH_RATE (empty: closed loop; else messages/s offered), BENCH_CONNECTIONS (10000),
#   BENCH_JSON=1 for JSON summary lines, BENCH_KEEP=1 to keep the temporary directory.
set -euo pipefail
cd "$(dirname "$0")/.."

WHICH=${1:-all}
case "$WHICH" in pairs | idle | group | ceilings | all) ;; *)
    echo "usage: scripts/bench.sh [pairs|idle|group|ceilings|all]" >&2
    exit 2
    ;;
esac

if ! command -v cargo >/dev/null; then
    echo "bench: cargo is missing: install Rust from https://rustup.rs" >&2
    exit 1
fi

PORT=${BENCH_PORT:-15222}
PAIRS=${BENCH_PAIRS:-100}
MESSAGES=${BENCH_MESSAGES:-1000}
RATE=${BENCH_RATE:-}
CONNECTIONS=${BENCH_CONNECTIONS:-10000}
GROUP_MEMBERS=${BENCH_GROUP_MEMBERS:-1024}
GROUP_MESSAGES=${BENCH_GROUP_MESSAGES:-200}
TARGET=${CARGO_TARGET_DIR:-target}
BIN="$TARGET/release"

echo "== building natterd and natter-bench (release)" >&2
cargo build -q --release -p natter-server -p natter-bench

WORK=$(mktemp -d "${TMPDIR:-/tmp}/natter-bench.XXXXXX")
NATTERD_PID=""
stop_natterd() {
    if [ -n "$NATTERD_PID" ] && kill -0 "$NATTERD_PID" 2>/dev/null; then
        kill -TERM "$NATTERD_PID" 2>/dev/null || true
        for _ in $(seq 1 100); do
            kill -0 "$NATTERD_PID" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$NATTERD_PID" 2>/dev/null || true
        wait "$NATTERD_PID" 2>/dev/null || true
    fi
    NATTERD_PID=""
}
cleanup() {
    stop_natterd
    if [ "${BENCH_KEEP:-0}" = 1 ]; then
        echo "bench: kept $WORK" >&2
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT

SERVER_CPU=()
BENCH_CPU=()
if command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ]; then
    SERVER_CPU=(taskset -c 0)
    BENCH_CPU=(taskset -c 1)
fi

# start_natterd NAME: natterd with the data directory $WORK/NAME (created if new, reused otherwise).
STARTS=0
start_natterd() {
    local dir="$WORK/$1"
    mkdir -p "$dir"
    STARTS=$((STARTS + 1))
    LOG="$dir/natterd.$STARTS.log"
    SMS="$dir/sms.log"
    "${SERVER_CPU[@]}" "$BIN/natterd" --data "$dir/data" --listen "127.0.0.1:$PORT" \
        --http-listen "127.0.0.1:$((PORT + 1))" --sms-gateway "file:$SMS" \
        --codes-per-ip-per-hour 1000000 --verifies-per-ip-per-hour 1000000 \
        --max-connections-per-ip 100000 --handshakes-per-ip-per-s 0 --sends-per-account-per-s 0 \
        >"$LOG" 2>&1 &
    NATTERD_PID=$!
    for _ in $(seq 1 100); do
        if grep -q "natterd listening" "$LOG" 2>/dev/null; then
            return 0
        fi
        if ! kill -0 "$NATTERD_PID" 2>/dev/null; then
            break
        fi
        sleep 0.1
    done
    echo "bench: natterd did not start:" >&2
    cat "$LOG" >&2
    exit 1
}

# check_natterd_log NAME: show warnings and errors natterd logged during the run.
check_natterd_log() {
    if cat "$WORK/$1"/natterd.*.log | grep -E "WARN|ERROR|panicked" >/dev/null 2>&1; then
        echo "bench: natterd logged warnings or errors during $1:" >&2
        cat "$WORK/$1"/natterd.*.log | grep -E "WARN|ERROR|panicked" | sed 's/^[^ ]* //' |
            sort | uniq -c | sort -rn | head -20 >&2
    fi
}

JSON=()
[ "${BENCH_JSON:-0}" = 1 ] && JSON=(--json)
RATE_ARGS=()
[ -n "$RATE" ] && RATE_ARGS=(--rate "$RATE")

bench() {
    # The bench's own --timeout bounds the measured phase; this bounds setup as well.
    timeout --signal=INT --kill-after=30 900 "${BENCH_CPU[@]}" "$BIN/natter-bench" "$@" \
        --server "127.0.0.1:$PORT" --sms-log "$SMS" --server-pid "$NATTERD_PID" "${JSON[@]}"
}

echo "== machine: $(nproc) CPUs, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo)," \
    "natterd on CPU ${SERVER_CPU[2]:-any}, bench on CPU ${BENCH_CPU[2]:-any}" >&2

if [ "$WHICH" = pairs ] || [ "$WHICH" = all ]; then
    start_natterd pairs
    echo "== pairs: $PAIRS pairs x $MESSAGES messages, Olm per message" >&2
    bench pairs --pairs "$PAIRS" --messages "$MESSAGES" "${RATE_ARGS[@]}" --timeout 300
    echo "== pairs: $PAIRS pairs x $MESSAGES messages, pre-encrypted" >&2
    bench pairs --pairs "$PAIRS" --messages "$MESSAGES" "${RATE_ARGS[@]}" --pre-encrypted --timeout 300
    check_natterd_log pairs
    stop_natterd
fi

if [ "$WHICH" = idle ] || [ "$WHICH" = all ]; then
    start_natterd idle
    echo "== register: $CONNECTIONS accounts (one device each: natterd serves one connection per device)" >&2
    bench register --accounts "$CONNECTIONS" --save "$WORK/idle/accounts" --timeout 600
    stop_natterd
    start_natterd idle
    echo "== idle: $CONNECTIONS logged-in connections on a restarted natterd" >&2
    bench idle --connections "$CONNECTIONS" --accounts-file "$WORK/idle/accounts" --timeout 600
    check_natterd_log idle
    stop_natterd
fi

if [ "$WHICH" = group ] || [ "$WHICH" = all ]; then
    start_natterd group
    echo "== group: $GROUP_MEMBERS members, $GROUP_MESSAGES messages one after another" >&2
    bench group --members "$GROUP_MEMBERS" --messages "$GROUP_MESSAGES" "${RATE_ARGS[@]}" --timeout 300
    check_natterd_log group
    stop_natterd
fi

if [ "$WHICH" = ceilings ] || [ "$WHICH" = all ]; then
    echo "== ceilings: loopback, kernel socket memory, Noise handshake (no natterd)" >&2
    timeout --signal=INT --kill-after=30 600 "${BENCH_CPU[@]}" "$BIN/natter-bench" ceilings "${JSON[@]}"
fi
