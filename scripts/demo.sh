#!/usr/bin/env bash
# Runs Natter: builds natterd and natter, starts natterd on the embedded SQLite store, registers two
# accounts (the codes come from natterd's file SMS gateway) and has them exchange messages.
# Usage: scripts/demo.sh            (PORT=5222 and DEMO_DIR=./demo-data by default)
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null; then
    echo "demo: cargo is missing: install Rust from https://rustup.rs" >&2
    exit 1
fi
if ! command -v cc >/dev/null && command -v apt-get >/dev/null; then
    apt-get update -qq && apt-get install -y -qq build-essential
fi

PORT=${PORT:-5222}
DEMO_DIR=${DEMO_DIR:-./demo-data}
TARGET=${CARGO_TARGET_DIR:-target}

echo "== building natterd and natter"
cargo build -q -p natter-server -p natter-cli
BIN="$TARGET/debug"

rm -rf "$DEMO_DIR"
mkdir -p "$DEMO_DIR"
SMS="$DEMO_DIR/srv/sms.log"

echo "== starting natterd on 127.0.0.1:$PORT (data in $DEMO_DIR/srv)"
"$BIN/natterd" --data "$DEMO_DIR/srv" --listen "127.0.0.1:$PORT" --sms-gateway "file:$SMS" \
    >"$DEMO_DIR/natterd.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 100); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then break; fi
    if ! kill -0 $SERVER 2>/dev/null; then
        echo "natterd did not start:" >&2
        cat "$DEMO_DIR/natterd.log" >&2
        exit 1
    fi
    sleep 0.1
done

natter() { local who=$1; shift; echo "\$ natter --home $DEMO_DIR/$who $*" >&2; "$BIN/natter" --home "$DEMO_DIR/$who" "$@"; }
code_for() { grep "^$1 " "$SMS" | tail -n 1 | cut -d' ' -f2; }

ALICE=+15550000001
BOB=+15550000002
echo "== registering Alice ($ALICE) and Bob ($BOB)"
natter alice --server "127.0.0.1:$PORT" register $ALICE
natter alice verify "$(code_for $ALICE)"
natter bob --server "127.0.0.1:$PORT" register $BOB
natter bob verify "$(code_for $BOB)"

echo "== Alice writes to Bob, who is offline; Bob picks it up"
natter alice send $BOB "hello bob"
natter alice send $BOB "dinner at 8?"
natter bob recv --wait 1 --json

echo "== Bob answers"
natter bob send $ALICE "hi alice, 8 is perfect"
natter alice recv --wait 1

echo "== the conversation on Alice's phone (✓ sent, ✓✓ delivered, read)"
natter alice history $BOB

echo "== natterd's disk holds only ciphertext:"
if grep -rqa "dinner at 8" "$DEMO_DIR/srv"; then
    echo "   FOUND plaintext on the server's disk" >&2
    exit 1
else
    echo "   no trace of \"dinner at 8\" under $DEMO_DIR/srv"
fi
echo
echo "Done. To chat yourself, keep a server running:"
echo "  $BIN/natterd --data $DEMO_DIR/srv --listen 127.0.0.1:$PORT --sms-gateway file:$SMS"
echo "  $BIN/natter --home $DEMO_DIR/bob chat $ALICE"
