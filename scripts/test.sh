#!/usr/bin/env bash
# Runs the whole test suite: formatting, lints, and every unit and integration test of the workspace
# (integration tests start real natterd servers on loopback ports; the cluster tests also PostgreSQL,
# NATS and S3, which scripts/setup.sh installs and starts).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v cargo >/dev/null; then
    echo "test: cargo is missing: install Rust from https://rustup.rs" >&2
    exit 1
fi
# Everything the suite needs (C compiler, font, cargo-deny, PostgreSQL, NATS, moto): installed and
# started when missing. The cluster tests then fail, rather than skip, if a service is unreachable.
# shellcheck source=scripts/setup.sh
source scripts/setup.sh

echo "== cargo deny check licenses bans sources (deny.toml)"
cargo deny check licenses bans sources

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo test"
cargo test --workspace
echo "== fuzz targets build (run them with scripts/fuzz.sh)"
cargo check --manifest-path fuzz/Cargo.toml --all-targets
