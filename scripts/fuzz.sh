#!/usr/bin/env bash
# Fuzzes natter-proto's decoders of untrusted bytes: runs every target of fuzz/ (or the ones named) for
# SECONDS each, one after the other (default 600: the hardening issue asks for at least 10 minutes per
# target). Not run in CI.
#
# Usage: scripts/fuzz.sh [SECONDS] [TARGET...]        targets: `cargo fuzz list` (run from the repo root)
# Environment: FUZZ_SANITIZER=address|none (default address; falls back to none when the sanitizer does
#   not build), FUZZ_TARGET_DIR (default /var/cache/natter-fuzz-target, apart from the workspace's
#   target directory since the flags differ), FUZZ_JOBS (parallel libFuzzer workers per target, 1).
#
# Stable Rust is enough: RUSTC_BOOTSTRAP=1 lets it take cargo-fuzz's -Zsanitizer flags. cargo-fuzz is
# installed when missing. The committed seeds are fuzz/seeds/<target>/; what the fuzzer learns goes to
# fuzz/corpus/<target>/ (ignored by git). A crash, timeout or out-of-memory input is minimised and copied
# to fuzz/seeds/<target>/, where crates/proto/tests/fuzz_seeds.rs replays it in `cargo test`; fix the
# decoder, keep the seed. The script exits 1 when any target found one.
set -euo pipefail
cd "$(dirname "$0")/.."

SECS=${1:-600}
[ $# -gt 0 ] && shift
case "$SECS" in '' | *[!0-9]*)
    echo "usage: scripts/fuzz.sh [SECONDS] [TARGET...]" >&2
    exit 2
    ;;
esac

export CARGO_TARGET_DIR=${FUZZ_TARGET_DIR:-/var/cache/natter-fuzz-target}
export RUSTC_BOOTSTRAP=1
JOBS=()
[ "${FUZZ_JOBS:-1}" -gt 1 ] && JOBS=(--jobs "$FUZZ_JOBS")

if ! command -v cargo >/dev/null; then
    echo "fuzz: cargo is missing: install Rust from https://rustup.rs" >&2
    exit 1
fi
if ! command -v c++ >/dev/null && command -v apt-get >/dev/null; then
    # libfuzzer-sys compiles libFuzzer's C++ sources.
    apt-get update -qq && apt-get install -y -qq build-essential
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "== installing cargo-fuzz"
    cargo install cargo-fuzz --locked
fi

if [ $# -gt 0 ]; then
    TARGETS=("$@")
else
    mapfile -t TARGETS < <(cargo fuzz list)
fi

SANITIZER=${FUZZ_SANITIZER:-address}
echo "== building the fuzz targets (sanitizer: $SANITIZER)"
if ! cargo fuzz build --sanitizer "$SANITIZER"; then
    [ "$SANITIZER" != none ] || exit 1
    echo "fuzz: the $SANITIZER sanitizer does not build here; fuzzing without a sanitizer" >&2
    SANITIZER=none
    cargo fuzz build --sanitizer none
fi

FOUND=()
for t in "${TARGETS[@]}"; do
    mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t" "fuzz/seeds/$t"
    marker=$(mktemp)
    log="fuzz/artifacts/$t.log"
    echo "== fuzzing $t for ${SECS}s (log: $log)"
    set +e
    cargo fuzz run --sanitizer "$SANITIZER" "${JOBS[@]}" "$t" "fuzz/corpus/$t" "fuzz/seeds/$t" -- \
        -max_total_time="$SECS" -timeout=10 -rss_limit_mb=2048 -max_len=8192 -print_final_stats=1 \
        >"$log" 2>&1
    status=$?
    set -e
    grep -E '^#[0-9]+.*DONE|^Done [0-9]+ runs' "$log" | tail -2 || true
    new=$(find "fuzz/artifacts/$t" -type f -newer "$marker" \
        \( -name 'crash-*' -o -name 'oom-*' -o -name 'timeout-*' -o -name 'leak-*' \) | sort)
    rm -f "$marker"
    if [ "$status" -ne 0 ] && [ -z "$new" ]; then
        echo "fuzz: $t failed without an artifact; see $log" >&2
        FOUND+=("$t")
        continue
    fi
    for artifact in $new; do
        name=$(basename "$artifact")
        echo "!! $t: $name; minimising"
        mark=$(mktemp)
        cargo fuzz tmin --sanitizer "$SANITIZER" "$t" "$artifact" -- -runs=10000 \
            >"fuzz/artifacts/$t-$name.tmin.log" 2>&1 || true
        min=$(find "fuzz/artifacts/$t" -type f -newer "$mark" -name 'minimized-from-*' | head -1)
        rm -f "$mark"
        cp "${min:-$artifact}" "fuzz/seeds/$t/$name"
        echo "!! $t: saved fuzz/seeds/$t/$name; reproduce with" \
            "RUSTC_BOOTSTRAP=1 cargo fuzz run $t fuzz/seeds/$t/$name"
        FOUND+=("$t")
    done
done

if [ ${#FOUND[@]} -gt 0 ]; then
    echo "fuzz: findings in: ${FOUND[*]}" >&2
    exit 1
fi
echo "fuzz: no findings (${#TARGETS[@]} targets, ${SECS}s each)"
