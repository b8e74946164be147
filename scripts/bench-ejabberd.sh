#!/usr/bin/env bash
# natterd and ejabberd side by side under the same load (see BENCHMARKS.md). Installs ejabberd (the
# Debian package) when it is missing, configures its own ejabberd node on 127.0.0.1 only (plain c2s,
# SASL PLAIN, no TLS, no shaper, no traffic limits, users registered with ejabberdctl), starts natterd
# with relaxed abuse limits, pins each server to CPU 0 and natter-bench to CPU 1, and runs the `pairs`
# shape in open loop at rising offered rates against both until the p99 latency passes 50 ms: three runs
# per rate, the median of each figure. natterd runs use --pre-encrypted (real Olm ciphertexts replayed,
# so both servers carry the load alone) and make every message durable (SQLite, synchronous=FULL)
# before acknowledging it; ejabberd keeps online chat messages in memory only.
#
# Writes $OUT/table.md (the markdown table with the natterd/ejabberd ratios) and $OUT/runs.txt (every
# summary line), and prints the table.
#
# Environment: BENCH_PAIRS (100), BENCH_RATES ("1000 3000 10000 30000 100000"), BENCH_SECONDS (10 per
# run), BENCH_RUNS (3), BENCH_OUT (bench-results), BENCH_PORT (15222; ejabberd gets +100).
# Needs root (apt-get, and ejabberdctl runs the node as the ejabberd user).
set -euo pipefail
cd "$(dirname "$0")/.."

PAIRS=${BENCH_PAIRS:-100}
RATES=${BENCH_RATES:-"1000 3000 10000 30000 100000"}
SECONDS_PER_RUN=${BENCH_SECONDS:-10}
RUNS=${BENCH_RUNS:-3}
OUT=${BENCH_OUT:-bench-results}
NPORT=${BENCH_PORT:-15222}
EPORT=$((NPORT + 100))
TARGET=${CARGO_TARGET_DIR:-target}
BIN="$TARGET/release"
P99_LIMIT=50

if ! command -v ejabberdctl >/dev/null || [ ! -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ]; then
    echo "== installing ejabberd and the plot's font" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq ejabberd fonts-dejavu-core
fi
echo "== building natterd and natter-bench (release)" >&2
cargo build -q --release -p natter-server -p natter-bench

SERVER_CPU=()
BENCH_CPU=()
if command -v taskset >/dev/null && [ "$(nproc)" -ge 2 ]; then
    SERVER_CPU=(taskset -c 0)
    BENCH_CPU=(taskset -c 1)
fi

WORK=$(mktemp -d "${TMPDIR:-/tmp}/natter-vs-ejabberd.XXXXXX")
chmod 755 "$WORK"
EJB="$WORK/ejabberd"
mkdir -p "$EJB/spool" "$EJB/logs" "$OUT"
EJ=(ejabberdctl --config-dir "$EJB" --spool "$EJB/spool" --logs "$EJB/logs")
NATTERD_PID=""
cleanup() {
    "${EJ[@]}" stop >/dev/null 2>&1 || true
    if [ -n "$NATTERD_PID" ]; then
        kill -TERM "$NATTERD_PID" 2>/dev/null || true
        wait "$NATTERD_PID" 2>/dev/null || true
    fi
    rm -rf "$WORK"
}
trap cleanup EXIT

# --- ejabberd: its own node and configuration, on loopback only.
cat >"$EJB/ejabberd.yml" <<EOF
hosts:
  - localhost
loglevel: warning
certfiles: []
listen:
  -
    port: $EPORT
    ip: "127.0.0.1"
    module: ejabberd_c2s
    max_stanza_size: 262144
    shaper: none
    access: all
    starttls: false
    starttls_required: false
auth_method: internal
auth_password_format: plain
shaper_rules:
  max_user_sessions: 10
  max_user_offline_messages: 1000000
  c2s_shaper: none
  s2s_shaper: none
access_rules:
  c2s:
    allow: all
modules:
  mod_offline:
    access_max_user_messages: max_user_offline_messages
  mod_disco: {}
EOF
printf 'ERL_OPTIONS="-env ERL_CRASH_DUMP_BYTES 0"\nERLANG_NODE=natterbench@localhost\n' >"$EJB/ejabberdctl.cfg"
cp /etc/ejabberd/inetrc "$EJB/inetrc"
chown -R ejabberd:ejabberd "$EJB"
echo "== starting ejabberd on 127.0.0.1:$EPORT" >&2
"${SERVER_CPU[@]}" "${EJ[@]}" start
"${EJ[@]}" started
EJ_PID=$(pgrep -u ejabberd -f "beam.*natterbench@localhost" | head -n 1)
echo "== registering $((2 * PAIRS)) ejabberd users with ejabberdctl" >&2
for ((n = 0; n < 2 * PAIRS; n++)); do
    "${EJ[@]}" register "bench$n" localhost bench >/dev/null &
    if ((n % 8 == 7)); then wait; fi
done
wait

# --- natterd.
mkdir -p "$WORK/natterd"
"${SERVER_CPU[@]}" "$BIN/natterd" --data "$WORK/natterd/data" --listen "127.0.0.1:$NPORT" \
    --http-listen "127.0.0.1:$((NPORT + 1))" --sms-gateway "file:$WORK/natterd/sms.log" \
    --codes-per-ip-per-hour 1000000 --verifies-per-ip-per-hour 1000000 \
    --max-connections-per-ip 100000 --handshakes-per-ip-per-s 0 --sends-per-account-per-s 0 \
    >"$WORK/natterd/log" 2>&1 &
NATTERD_PID=$!
for _ in $(seq 1 100); do
    grep -q "natterd listening" "$WORK/natterd/log" 2>/dev/null && break
    sleep 0.1
done

# field LINE KEY: the value of KEY in a summary line.
field() { grep -o " $2=[^ ]*" <<<"$1" | head -n 1 | cut -d= -f2; }
# median of the arguments.
median() { printf '%s\n' "$@" | sort -g | sed -n "$((($# + 1) / 2))p"; }

# one SERVER RATE: one run; prints its summary line.
one() {
    local server=$1 rate=$2 messages
    messages=$(awk -v r="$rate" -v s="$SECONDS_PER_RUN" -v p="$PAIRS" 'BEGIN { m = int(r * s / p); print (m < 1 ? 1 : m) }')
    if [ "$server" = natterd ]; then
        "${BENCH_CPU[@]}" "$BIN/natter-bench" pairs --pairs "$PAIRS" --messages "$messages" \
            --rate "$rate" --pre-encrypted --server "127.0.0.1:$NPORT" \
            --sms-log "$WORK/natterd/sms.log" --server-pid "$NATTERD_PID" --timeout 120
    else
        "${BENCH_CPU[@]}" "$BIN/natter-bench" pairs --protocol xmpp --pairs "$PAIRS" \
            --messages "$messages" --rate "$rate" --server "127.0.0.1:$EPORT" \
            --server-pid "$EJ_PID" --timeout 120
    fi
}

: >"$OUT/runs.txt"
declare -A RESULT
for server in natterd ejabberd; do
    for rate in $RATES; do
        delivered=() p50=() p99=() percpu=()
        for ((r = 1; r <= RUNS; r++)); do
            echo "== $server, $rate msgs/s offered, run $r" >&2
            if ! line=$(one "$server" "$rate"); then
                echo "bench: $server failed at $rate msgs/s" >&2
                line=""
            fi
            echo "$server $line" >>"$OUT/runs.txt"
            [ -n "$line" ] || continue
            echo "$line" >&2
            delivered+=("$(field "$line" msgs_per_s)")
            p50+=("$(field "$line" p50_ms)")
            p99+=("$(field "$line" p99_ms)")
            percpu+=("$(field "$line" msgs_per_server_cpu_s)")
        done
        if ((${#p99[@]} == 0)); then
            RESULT[$server,$rate]="– – – –"
            break
        fi
        m99=$(median "${p99[@]}")
        RESULT[$server,$rate]="$(median "${delivered[@]}") $(median "${p50[@]}") $m99 $(median "${percpu[@]}")"
        if awk -v p="$m99" -v l="$P99_LIMIT" 'BEGIN { exit !(p > l) }'; then
            echo "== $server: p99 $m99 ms > $P99_LIMIT ms at $rate msgs/s: stopping" >&2
            break
        fi
    done
done

{
    echo "pairs: $PAIRS pairs, ~200-byte messages, open loop, $SECONDS_PER_RUN s per run, median of $RUNS runs;"
    echo "natterd pre-encrypted and durable, ejabberd in memory. Latency from the scheduled send time."
    echo
    echo "| offered msgs/s | natterd delivered/s | p50 ms | p99 ms | msgs/CPU-s | ejabberd delivered/s | p50 ms | p99 ms | msgs/CPU-s | msgs/CPU-s natterd/ejabberd | p99 natterd/ejabberd |"
    echo "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    for rate in $RATES; do
        n=${RESULT[natterd,$rate]:-"– – – –"}
        e=${RESULT[ejabberd,$rate]:-"– – – –"}
        read -r nd n50 n99 ncpu <<<"$n"
        read -r ed e50 e99 ecpu <<<"$e"
        ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (a + 0 > 0 && b + 0 > 0) printf "%.2f", a / b; else printf "–" }'; }
        echo "| $rate | $nd | $n50 | $n99 | $ncpu | $ed | $e50 | $e99 | $ecpu | $(ratio "$ncpu" "$ecpu") | $(ratio "$n99" "$e99") |"
    done
} >"$OUT/table.md"
cat "$OUT/table.md"
"$BIN/natter-bench" plot --runs "$OUT/runs.txt" --out "$OUT/latency.png"
echo "== plot: $OUT/latency.png" >&2
