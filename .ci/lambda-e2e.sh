#!/usr/bin/env bash
# End-to-end check of the Lambda function through the real Lambda Runtime API emulator:
# `cargo lambda watch` runs stage3-lambda offline (placeholder provider, filesystem store),
# every sample in events/ is invoked and its answer checked, then the release artefact is
# built the way `sam build` builds it.
#
# Needs: cargo-lambda (`pip install cargo-lambda`) and python3. No network beyond loopback.
# Environment: CARGO_TARGET_DIR is honoured; STAGE3_E2E_PORT (default 9000);
# STAGE3_E2E_WAIT_SECS bounds the wait for the emulator and the first compile (default 1200);
# STAGE3_E2E_SKIP_BUILD=1 skips the release build.
set -euo pipefail

cd "$(dirname "$0")/.."

port="${STAGE3_E2E_PORT:-9000}"
wait_secs="${STAGE3_E2E_WAIT_SECS:-1200}"
address=127.0.0.1

if ! cargo lambda --version >/dev/null 2>&1; then
    echo "lambda-e2e: cargo lambda is not installed (pip install cargo-lambda)" >&2
    exit 1
fi

work="$(mktemp -d)"
watch_pid=""
cleanup() {
    # The watcher runs in its own process group (setsid), with the function as its child:
    # ending the group ends both, and nothing else.
    if [[ -n "$watch_pid" ]] && kill -0 "$watch_pid" 2>/dev/null; then
        kill -TERM -- "-$watch_pid" 2>/dev/null || true
        for _ in $(seq 50); do
            kill -0 "$watch_pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL -- "-$watch_pid" 2>/dev/null || true
    fi
    rm -rf "$work"
}
trap cleanup EXIT

fail() {
    echo "lambda-e2e: FAIL: $*" >&2
    if [[ -f "$work/watch.log" ]]; then
        echo "---- cargo lambda watch log (last 40 lines) ----" >&2
        tail -n 40 "$work/watch.log" >&2
    fi
    exit 1
}

port_open() {
    python3 - "$address" "$port" <<'PY'
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=1).close()
except OSError:
    sys.exit(1)
PY
}

if port_open; then
    fail "port $port is already in use; set STAGE3_E2E_PORT"
fi

images="$work/images"
echo "lambda-e2e: starting cargo lambda watch on $address:$port (output in $images)"
setsid cargo lambda watch \
    --invoke-address "$address" --invoke-port "$port" \
    --ignore-changes \
    --env-var STAGE3_PROVIDER=placeholder \
    --env-var STAGE3_STORAGE=fs \
    --env-var "STAGE3_OUTPUT_DIR=$images" \
    --env-var RUST_LOG=info \
    >"$work/watch.log" 2>&1 &
watch_pid=$!

deadline=$((SECONDS + wait_secs))
until port_open; do
    kill -0 "$watch_pid" 2>/dev/null || fail "cargo lambda watch exited early"
    ((SECONDS < deadline)) || fail "the emulator did not open port $port in ${wait_secs}s"
    sleep 1
done

# invoke FILE: the function's answer on stdout; exit status non-zero when it failed.
invoke() {
    cargo lambda invoke stage3-lambda \
        --invoke-address "$address" --invoke-port "$port" \
        --output-format json --data-file "$1"
}

# The first invocation waits for the function to compile; retry until it answers or the
# bounded wait runs out (the emulator may refuse invocations while the build runs).
echo "lambda-e2e: waiting for the function to compile and answer"
printf '{"scene_id": "warm_up"}' >"$work/invalid.json"
until invoke "$work/invalid.json" >"$work/invalid.out" 2>"$work/invalid.err"; do
    grep -q "invalid_request" "$work/invalid.out" "$work/invalid.err" && break
    kill -0 "$watch_pid" 2>/dev/null || fail "cargo lambda watch exited"
    ((SECONDS < deadline)) || fail "no answer from the function in ${wait_secs}s"
    sleep 2
done

# An invalid request fails with the stable error type, not a generic one.
grep -q "invalid_request" "$work/invalid.out" "$work/invalid.err" ||
    fail "an invalid request did not fail with invalid_request: $(cat "$work/invalid.out" "$work/invalid.err")"
echo "lambda-e2e: ok   invalid request -> invalid_request"

# check KIND EVENT ANSWER: validates one answer with python (no jq here).
check() {
    python3 - "$@" "$images" <<'PY'
import json, os, sys

kind, event_path, answer_path, images = sys.argv[1:5]
event = json.load(open(event_path))
answer = json.load(open(answer_path))

def png(output):
    path = output["image_path"]
    if not os.path.isabs(path):
        path = os.path.join(os.getcwd(), path)
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert "image_url" in output, "image_url missing"
    assert output["width"] > 0 and output["height"] > 0
    for key in ("model", "size", "quality", "prompt"):
        assert key in output["generation_params"], f"generation_params.{key} missing"

def single(request, output):
    assert output["scene_id"] == request["scene_id"], output["scene_id"]
    png(output)

def scenes_of(request):
    return request["scenes"] if isinstance(request, dict) else request

if kind == "single":
    single(event, answer)
elif kind == "batch":
    expected = len(scenes_of(event))
    assert len(answer["results"]) == expected, f"{len(answer['results'])} results, want {expected}"
    assert answer["failures"] == [], answer["failures"]
    for output in answer["results"]:
        png(output)
elif kind == "eventbridge":
    detail = event["detail"]
    if isinstance(detail, dict) and "scenes" not in detail:
        single(detail, answer)
    else:
        assert len(answer["results"]) == len(scenes_of(detail))
elif kind == "sqs":
    # The bad records are those whose body is no stage-2 request: no image_prompt at all.
    bad = [r["messageId"] for r in event["Records"] if "image_prompt" not in r["body"]]
    got = [f["itemIdentifier"] for f in answer["batchItemFailures"]]
    assert got == bad, f"batchItemFailures {got}, want {bad}"
    records = [n for n in os.listdir(images) if n.endswith(".json")]
    assert records, "no result records were persisted"
else:
    sys.exit(f"unknown kind {kind}")
PY
}

for event in events/*.json; do
    name="$(basename "$event" .json)"
    case "$name" in
        single) kind=single ;;
        batch-*) kind=batch ;;
        sqs*) kind=sqs ;;
        eventbridge*) kind=eventbridge ;;
        *) fail "no check for events/$name.json: add one to .ci/lambda-e2e.sh" ;;
    esac
    answer="$work/$name.answer.json"
    invoke "$event" >"$answer" 2>"$work/$name.err" ||
        fail "events/$name.json: the invocation failed: $(cat "$answer" "$work/$name.err")"
    check "$kind" "$event" "$answer" ||
        fail "events/$name.json: unexpected answer: $(cat "$answer")"
    echo "lambda-e2e: ok   events/$name.json"
done

# Every invocation wrote its CloudWatch Embedded Metric Format line to stdout, which the
# emulator passes through to its log as Lambda passes it to CloudWatch Logs.
python3 - "$work/watch.log" <<'PY' || fail "no EMF metric line (namespace Stage3) in the function's output"
import json, sys
found = 0
for line in open(sys.argv[1], errors="replace"):
    start = line.find('{"')
    if start < 0 or '"_aws"' not in line:
        continue
    try:
        doc = json.loads(line[start:])
    except ValueError:
        continue
    if doc["_aws"]["CloudWatchMetrics"][0]["Namespace"] == "Stage3" and "Provider" in doc:
        found += 1
sys.exit(0 if found else 1)
PY
echo "lambda-e2e: ok   EMF metric lines on stdout"

cleanup
watch_pid=""
trap - EXIT

if [[ "${STAGE3_E2E_SKIP_BUILD:-}" == 1 ]]; then
    echo "lambda-e2e: release build skipped (STAGE3_E2E_SKIP_BUILD=1)"
    exit 0
fi

# x86_64 only: the aarch64 standard library cannot be downloaded here. `sam build` runs the
# same `cargo lambda build --release` (with --arm64 for the default architecture). No feature
# flags, as sam gives none: Cargo.toml's [package.metadata.lambda.bin.stage3-lambda.build]
# makes this the `--no-default-features --features lambda` build, without the CLI's crates.
echo "lambda-e2e: cargo lambda build --release"
cargo lambda build --release --bin stage3-lambda --output-format zip
target_dir="${CARGO_TARGET_DIR:-target}"
zip="$target_dir/lambda/stage3-lambda/bootstrap.zip"
[[ -s "$zip" ]] || fail "no $zip after the release build"
python3 - "$zip" <<'PY' || fail "$zip does not hold an executable bootstrap"
import stat, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    info = z.getinfo("bootstrap")
    mode = info.external_attr >> 16
    assert info.file_size > 0 and mode & stat.S_IXUSR, "bootstrap is empty or not executable"
    # Lambda's documented ceiling for the function binary the project aims under.
    print(f"lambda-e2e: bootstrap is {info.file_size:,} bytes")
    assert info.file_size < 20_000_000, f"bootstrap is {info.file_size:,} bytes, over 20 MB"
PY
echo "lambda-e2e: ok   $zip"
echo "lambda-e2e: all checks passed"
