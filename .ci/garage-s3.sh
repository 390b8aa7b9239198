#!/usr/bin/env bash
# The S3 suites (tests/suite/s3_storage.rs, s3_service.rs, story.rs) against a real Garage server.
#
# `cargo test` runs them against an in-process s3s-fs; this runs them again against Garage
# (docs/design.md §3), a production S3 server that, like Qiniu, ignores conditional writes and
# has its own error documents and signature checks. It starts a single-node Garage on
# loopback in a temporary directory, creates a bucket and a key, runs the suites through
# the harness's STAGE3_TEST_S3_* variables and stops the server again.
#
# Needs: cargo, python3; `garage` 2.5.0 on PATH or installable with `cargo install` (about
# 9 minutes on 2 cores; skipped when the right version is already there).
# Environment: CARGO_TARGET_DIR is honoured; STAGE3_GARAGE_ROOT is the `cargo install
# --root` (default $CARGO_HOME or ~/.cargo, so CI caches can keep the binary);
# STAGE3_GARAGE_PORT is the S3 port, the RPC port is the next one (default 39000);
# STAGE3_GARAGE_WAIT_SECS bounds each wait for the server (default 60).
# Arguments are passed on to the test harness, e.g. `bash .ci/garage-s3.sh --nocapture`.
# The key's secret is never printed.
set -euo pipefail

cd "$(dirname "$0")/.."

garage_version=2.5.0
s3_port="${STAGE3_GARAGE_PORT:-39000}"
rpc_port=$((s3_port + 1))
wait_secs="${STAGE3_GARAGE_WAIT_SECS:-60}"
install_root="${STAGE3_GARAGE_ROOT:-${CARGO_HOME:-$HOME/.cargo}}"
address=127.0.0.1
region=garage
bucket=stage3-test

say() { echo "garage-s3: $*"; }

work=""
server_pid=""
cleanup() {
    # The server runs in its own process group (setsid): end that group, nothing else.
    if [[ -n "$server_pid" ]] && kill -0 "$server_pid" 2>/dev/null; then
        kill -TERM -- "-$server_pid" 2>/dev/null || true
        for _ in $(seq 100); do
            kill -0 "$server_pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL -- "-$server_pid" 2>/dev/null || true
        wait "$server_pid" 2>/dev/null || true
    fi
    server_pid=""
    if [[ -n "$work" ]]; then
        rm -rf "$work"
    fi
}
trap cleanup EXIT

fail() {
    echo "garage-s3: FAIL: $*" >&2
    if [[ -n "$work" && -f "$work/server.log" ]]; then
        echo "---- garage server log (last 40 lines) ----" >&2
        tail -n 40 "$work/server.log" >&2
    fi
    exit 1
}

# Output of garage commands may hold the key's secret (64 hex digits): hide it.
redact() { sed -E 's/[0-9a-fA-F]{64}/<redacted>/g'; }

# has_garage: whether `garage` on PATH is version 2.5.0 built with SQLite.
has_garage() {
    local version
    version="$(garage --version 2>/dev/null)" || return 1
    [[ "$version" =~ (^|[^0-9.])${garage_version//./\\.}([^0-9.]|$) && "$version" == *sqlite* ]]
}

# --- the binary --------------------------------------------------------------------------

export PATH="$install_root/bin:$PATH"
if has_garage; then
    say "using $(command -v garage) ($(garage --version))"
else
    say "installing garage $garage_version into $install_root (about 9 minutes on 2 cores)"
    started=$SECONDS
    cargo install --locked --root "$install_root" "garage@$garage_version"
    say "garage built in $((SECONDS - started))s"
    has_garage || fail "after cargo install, garage on PATH is not $garage_version with sqlite: $(garage --version 2>&1 || true)"
fi

# --- the server --------------------------------------------------------------------------

port_free() {
    python3 - "$address" "$1" <<'PY'
import socket, sys
s = socket.socket()
try:
    s.bind((sys.argv[1], int(sys.argv[2])))
except OSError:
    sys.exit(1)
finally:
    s.close()
PY
}

port_open() {
    python3 - "$address" "$1" <<'PY'
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1).close()
except OSError:
    sys.exit(1)
PY
}

for port in "$s3_port" "$rpc_port"; do
    port_free "$port" || fail "port $address:$port is in use; set STAGE3_GARAGE_PORT to another base port"
done

work="$(mktemp -d)"
config="$work/garage.toml"
rpc_secret="$(python3 -c 'import secrets; print(secrets.token_hex(32))')"
# Written before any secret goes in, and owner-only: it holds the cluster's RPC secret.
(umask 077 && : >"$config")
cat >"$config" <<EOF
metadata_dir = "$work/meta"
data_dir = "$work/data"
db_engine = "sqlite"
replication_factor = 1

rpc_bind_addr = "$address:$rpc_port"
rpc_public_addr = "$address:$rpc_port"
rpc_secret = "$rpc_secret"

[s3_api]
api_bind_addr = "$address:$s3_port"
s3_region = "$region"
EOF

garage_cli() { garage -c "$config" "$@"; }

say "starting garage server on $address:$s3_port (rpc $rpc_port) in $work"
RUST_LOG="${RUST_LOG:-garage=info}" setsid garage -c "$config" server >"$work/server.log" 2>&1 &
server_pid=$!

deadline=$((SECONDS + wait_secs))
until garage_cli status >/dev/null 2>&1 && port_open "$s3_port"; do
    kill -0 "$server_pid" 2>/dev/null || fail "garage server exited early"
    ((SECONDS < deadline)) || fail "garage did not answer within ${wait_secs}s"
    sleep 1
done

# --- layout, bucket, key -----------------------------------------------------------------

node_id="$(garage_cli node id --quiet 2>/dev/null)" || fail "garage node id failed"
node_id="${node_id%%@*}"
[[ "$node_id" =~ ^[0-9a-f]{64}$ ]] || fail "unexpected node id: $node_id"

garage_cli layout assign -z dc1 -c 1G "$node_id" >/dev/null || fail "garage layout assign failed"
garage_cli layout apply --version 1 >/dev/null || fail "garage layout apply failed"

# The new layout reaches the tables a moment after it is applied: retry, bounded.
deadline=$((SECONDS + wait_secs))
until garage_cli bucket create "$bucket" >"$work/bucket.out" 2>&1; do
    ((SECONDS < deadline)) || fail "garage bucket create failed: $(redact <"$work/bucket.out")"
    sleep 1
done

key_output="$(garage_cli key create stage3-test-key 2>&1)" ||
    fail "garage key create failed: $(redact <<<"$key_output")"
# `Key ID:` and `Secret key:` rows of the key table; ids are GK + 24 hex digits, secrets
# 64 hex digits (garage_model::key_table::Key::new).
key_id="$(sed -nE 's/^Key ID:[[:space:]]+(GK[0-9a-f]{24})[[:space:]]*$/\1/p' <<<"$key_output")"
[[ "$(wc -w <<<"$key_id")" == 1 ]] ||
    fail "no single key id in the output of garage key create: $(redact <<<"$key_output")"
secret_of() { sed -nE 's/^Secret key:[[:space:]]+([0-9a-f]{64})[[:space:]]*$/\1/p'; }
secret_key="$(secret_of <<<"$key_output")"
if [[ -z "$secret_key" ]]; then
    # Versions that redact the secret on creation show it on request.
    key_info="$(garage_cli key info --show-secret "$key_id" 2>&1)" ||
        fail "garage key info failed: $(redact <<<"$key_info")"
    secret_key="$(secret_of <<<"$key_info")"
fi
[[ "$secret_key" =~ ^[0-9a-f]{64}$ ]] || fail "could not read the secret of key $key_id"
unset key_output key_info

garage_cli bucket allow --read --write "$bucket" --key "$key_id" >/dev/null ||
    fail "garage bucket allow failed"
say "bucket $bucket ready for key $key_id"

# --- the suites --------------------------------------------------------------------------

say "cargo test --lib (suite: s3_storage, s3_service, story) against http://$address:$s3_port"
started=$SECONDS
# The story area runs the `stage3` binary, which `cargo test --lib` alone does not build.
cargo build --quiet --bin stage3
STAGE3_TEST_S3_ENDPOINT="http://$address:$s3_port" \
    STAGE3_TEST_S3_BUCKET="$bucket" \
    STAGE3_TEST_S3_ACCESS_KEY="$key_id" \
    STAGE3_TEST_S3_SECRET_KEY="$secret_key" \
    STAGE3_TEST_S3_REGION="$region" \
    STAGE3_TEST_S3_PATH_STYLE=1 \
    cargo test --lib -- suite::s3_storage:: suite::s3_service:: suite::story:: "$@" ||
    fail "the S3 suites failed against Garage"
say "the S3 suites passed against Garage in $((SECONDS - started))s"
