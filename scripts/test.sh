#!/usr/bin/env bash
# Runs the whole test suite: formatting, lints, and every unit and integration test of the workspace
# (integration tests start real natterd servers on loopback ports).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null; then
    echo "test: cargo is missing: install Rust from https://rustup.rs" >&2
    exit 1
fi
if ! command -v cc >/dev/null && command -v apt-get >/dev/null; then
    apt-get update -qq && apt-get install -y -qq build-essential
fi

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo test"
cargo test --workspace
echo "== fuzz targets build (run them with scripts/fuzz.sh)"
cargo check --manifest-path fuzz/Cargo.toml --all-targets
