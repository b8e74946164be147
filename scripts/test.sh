#!/usr/bin/env bash
# Runs the whole test suite: formatting, lints, and every unit and integration test of the workspace
# (integration tests start real natterd servers on loopback ports).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null; then
    echo "test: cargo is missing: install Rust from https://rustup.rs" >&2
    exit 1
fi
# A C compiler (bundled SQLite, ring) and the font natter-bench's plot test draws labels with.
missing=()
command -v cc >/dev/null || missing+=(build-essential)
[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || missing+=(fonts-dejavu-core)
if ((${#missing[@]})) && command -v apt-get >/dev/null; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi

echo "== cargo deny check licenses bans sources (deny.toml)"
if ! cargo deny --version >/dev/null 2>&1; then
    echo "cargo-deny is missing: installing it (a few minutes, once)" >&2
    cargo install --locked cargo-deny
fi
cargo deny check licenses bans sources

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo test"
cargo test --workspace
echo "== fuzz targets build (run them with scripts/fuzz.sh)"
cargo check --manifest-path fuzz/Cargo.toml --all-targets
