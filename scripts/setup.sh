#!/usr/bin/env bash
# Installs and starts what the test suite needs on a fresh Debian machine with Rust: a C compiler, the
# plot test's font, cargo-deny, PostgreSQL (127.0.0.1:5432), NATS (127.0.0.1:4222) and moto's S3 server
# for the cluster tests. Idempotent: what is there and running is left alone. Sourced by scripts/test.sh
# (it exports NATTER_REQUIRE_CLUSTER=1 and NATTER_TEST_POSTGRES).

export DEBIAN_FRONTEND=noninteractive
missing=()
command -v cc >/dev/null || missing+=(build-essential)
command -v git >/dev/null || missing+=(git)
[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || missing+=(fonts-dejavu-core)
if ((${#missing[@]})); then
    apt-get update -qq
    apt-get install -y -qq "${missing[@]}"
fi

# PostgreSQL and NATS (cluster mode); start them if they are down. The PostgreSQL store suite runs for
# real here: NATTER_REQUIRE_CLUSTER=1 makes it fail (instead of skip) when PostgreSQL is unreachable.
export NATTER_REQUIRE_CLUSTER=1
export NATTER_TEST_POSTGRES="${NATTER_TEST_POSTGRES:-postgres://postgres@127.0.0.1:5432/postgres}"
pg_up() { pg_isready -q -h 127.0.0.1 -p 5432; }
if ! command -v pg_ctlcluster >/dev/null; then
    apt-get update -qq
    apt-get install -y -qq postgresql
fi
if ! pg_up; then
    version="$(ls /etc/postgresql | sort -V | tail -n 1)"
    pg_ctlcluster --skip-systemctl-redirect "$version" main start || true
    for _ in $(seq 1 30); do pg_up && break; sleep 1; done
fi
if ! pg_up; then
    echo "PostgreSQL is not reachable at 127.0.0.1:5432; the cluster tests need it" >&2
    exit 1
fi
# The tests connect as postgres over TCP without a password (local trust, as on the dev machine).
if ! psql "$NATTER_TEST_POSTGRES" -Atqc 'SELECT 1' >/dev/null 2>&1; then
    hba="$(ls /etc/postgresql/*/main/pg_hba.conf | sort -V | tail -n 1)"
    if [ -n "$hba" ] && ! grep -q '^host all all 127.0.0.1/32 trust' "$hba"; then
        sed -i '1i host all all 127.0.0.1/32 trust' "$hba"
        pg_ctlcluster --skip-systemctl-redirect "$(basename "$(dirname "$(dirname "$hba")")")" main reload
    fi
    psql "$NATTER_TEST_POSTGRES" -Atqc 'SELECT 1' >/dev/null || {
        echo "cannot log in to $NATTER_TEST_POSTGRES" >&2
        exit 1
    }
fi
# NATS (the cluster bus): the cluster tests start private nats-server processes on free ports; the
# shared one at 4222 serves manual runs and benchmarks.
if ! command -v nats-server >/dev/null; then
    apt-get update -qq
    apt-get install -y -qq nats-server
fi
if ! (exec 3<>/dev/tcp/127.0.0.1/4222) 2>/dev/null; then
    mkdir -p /var/lib/nats-server
    start-stop-daemon --start --oknodo --background --exec "$(command -v nats-server)" -- \
        -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log || true
fi
# S3 for the shared blob store: moto's server mode (started by the tests on free ports).
if ! command -v moto_server >/dev/null; then
    if ! command -v pip3 >/dev/null && ! command -v pip >/dev/null; then
        apt-get update -qq
        apt-get install -y -qq python3-pip
    fi
    PIP=$(command -v pip3 || command -v pip)
    "$PIP" install -q 'moto[server]' || "$PIP" install -q --break-system-packages 'moto[server]'
    hash -r
fi
command -v moto_server >/dev/null || {
    echo "moto_server is not installed; the cluster tests need it" >&2
    exit 1
}


if ! cargo deny --version >/dev/null 2>&1; then
    echo "cargo-deny is missing: installing it (a few minutes, once)" >&2
    cargo install --locked cargo-deny
fi
