#!/usr/bin/env bash
# Media transfer figures: uploads and downloads a generated file (1 GiB by default) through a release
# natterd on 127.0.0.1 and reports throughput next to a plain `cp` of the same file, and the peak RSS of
# the sending client, the receiving client and natterd.
# Usage: scripts/bench-media.sh [MiB]        (BENCH_PORT=15322)
set -euo pipefail
cd "$(dirname "$0")/.."
MIB=${1:-1024}
PORT=${BENCH_PORT:-15322}
TARGET=${CARGO_TARGET_DIR:-target}
BIN="$TARGET/release"
cargo build -q --release -p natter-server -p natter-cli

WORK=$(mktemp -d "${TMPDIR:-/tmp}/natter-media.XXXXXX")
SERVER=""
cleanup() {
    [ -n "$SERVER" ] && kill "$SERVER" 2>/dev/null && wait "$SERVER" 2>/dev/null
    rm -rf "$WORK"
}
trap cleanup EXIT

"$BIN/natterd" --data "$WORK/srv" --listen "127.0.0.1:$PORT" --http-listen "127.0.0.1:$((PORT + 1))" \
    --sms-gateway "file:$WORK/sms.log" --media-quota-mib 65536 >"$WORK/natterd.log" 2>&1 &
SERVER=$!
for _ in $(seq 100); do (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null && break; sleep 0.1; done
N() { "$BIN/natter" --server "127.0.0.1:$PORT" "$@"; }
code() { grep "^$1 " "$WORK/sms.log" | tail -n 1 | cut -d' ' -f2; }
N --home "$WORK/alice" register +15550000001 >/dev/null
N --home "$WORK/alice" verify "$(code +15550000001)" >/dev/null
N --home "$WORK/bob" register +15550000002 >/dev/null
N --home "$WORK/bob" verify "$(code +15550000002)" >/dev/null

head -c "$((MIB * 1024 * 1024))" /dev/urandom >"$WORK/file.bin"
sync
secs() { awk -v s="$1" -v e="$2" 'BEGIN { printf "%.3f", (e - s) / 1e9 }'; }
mbps() { awk -v m="$MIB" -v t="$1" 'BEGIN { printf "%.1f", m / t }'; }

t0=$(date +%s%N); cp "$WORK/file.bin" "$WORK/copy.bin"; sync; t1=$(date +%s%N)
CP=$(secs "$t0" "$t1")
rm -f "$WORK/copy.bin"

t0=$(date +%s%N)
/usr/bin/time -f "%M" -o "$WORK/up.rss" "$BIN/natter" --home "$WORK/alice" --json send-file +15550000002 "$WORK/file.bin" >"$WORK/sent.json"
t1=$(date +%s%N)
UP=$(secs "$t0" "$t1")
ID=$(sed -n 's/.*"id":"\([0-9a-f]*\)".*/\1/p' "$WORK/sent.json" | head -n 1)
N --home "$WORK/bob" recv --json >/dev/null
mkdir -p "$WORK/down"
t0=$(date +%s%N)
/usr/bin/time -f "%M" -o "$WORK/down.rss" "$BIN/natter" --home "$WORK/bob" download "$ID" --to "$WORK/down" >/dev/null
t1=$(date +%s%N)
DOWN=$(secs "$t0" "$t1")
cmp -s "$WORK/file.bin" "$WORK/down/file.bin" && SAME=yes || SAME=NO
SRV_HWM=$(awk '/VmHWM/ {print $2}' "/proc/$SERVER/status")

echo "media: file_mib=$MIB cp_s=$CP upload_s=$UP download_s=$DOWN" \
    "cp_mib_s=$(mbps "$CP") upload_mib_s=$(mbps "$UP") download_mib_s=$(mbps "$DOWN")" \
    "upload_vs_cp=$(awk -v u="$UP" -v c="$CP" 'BEGIN { printf "%.1f", u / c }')" \
    "download_vs_cp=$(awk -v d="$DOWN" -v c="$CP" 'BEGIN { printf "%.1f", d / c }')" \
    "sender_peak_rss_mib=$(( $(cat "$WORK/up.rss") / 1024 ))" \
    "receiver_peak_rss_mib=$(( $(cat "$WORK/down.rss") / 1024 ))" \
    "natterd_peak_rss_mib=$(( SRV_HWM / 1024 ))" identical=$SAME
