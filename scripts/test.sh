#!/usr/bin/env bash
# The one test command: scripts/test.sh
#
#   1. sets up the test environment (scripts/test-env.sh: packages, dockerd,
#      PostgreSQL, busybox rootfs + docker image, Python venv with the SDK)
#   2. cargo build, cargo test --workspace (Rust suites read STACYVM_TEST_*)
#   3. the Python SDK compatibility suite (tests/sdk, stacyvm==0.1.1 from PyPI)
#      against a real `stacyvm serve`, once with --provider docker and once
#      with --provider native (image imported with `stacyvm image import`).
#   4. the playground browser test (tests/browser: node --test, playwright-core
#      driving Debian's headless Chromium) against a real `stacyvm serve
#      --provider docker`: the GraphiQL page loads with no outside request, a
#      query shows data, subscriptions stream live.
#
# Every stage runs even if an earlier one failed (except when the build
# fails); the exit status is non-zero if anything failed.
#
# Environment knobs:
#   STACYVM_TEST_SKIP_CARGO_TEST=1   skip `cargo test` (SDK suites only)
#   STACYVM_TEST_SKIP_SCHEMATHESIS=1 skip schemathesis (STACYVM_SCHEMATHESIS_EXAMPLES: per operation, default 60)
#   STACYVM_SDK_PROVIDERS="docker native remote ha custom qemu"   which SDK passes to run
#                                    (remote: `serve --no-local-worker` and two
#                                    `stacyvm worker` processes, native provider;
#                                    ha: the same with two replicas on one
#                                    PostgreSQL behind nginx, round robin)
#   STACYVM_TEST_SKIP_BROWSER=1      skip the playground browser test
#   STACYVM_TEST_SKIP_BENCH=1        skip the short `stacyvm bench --quick`
#   STACYVM_SDK_PG_PROVIDERS="native proot"   SDK passes whose server uses
#                                    PostgreSQL (--database-url) instead of SQLite
#   PYTEST_ADDOPTS                   passed through to pytest (e.g. "-k exec -x")
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

STAGE_T0=$SECONDS
section() { STAGE_T0=$SECONDS; printf '\n========== %s ==========\n' "$*"; }

SERVER_PID=""
WORKER_PIDS=()
stop_server() {
    local pid
    for pid in "${WORKER_PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    WORKER_PIDS=()
    if [ -n "$SERVER_PID" ]; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        local i
        for i in $(seq 1 40); do
            kill -0 "$SERVER_PID" 2>/dev/null || break
            sleep 0.25
        done
        kill -KILL "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
        SERVER_PID=""
    fi
}

# In-process test servers end with their test, without a shutdown: the
# native sandboxes they leave (as a crashed server would, for the next
# start to adopt) go after the tests rather than weigh on later stages.
# Only those of this run's data dirs under $1: a keeper's stderr is its
# sandbox's log there; its children (hakoniwa's supervisor, PID 1) go
# with it, then the disks mounted under $1; then the provider tests'
# containers (instance `in-test-...`) that did not exist before the run
# ($2: their ids then). Best effort throughout: it never fails the run.
sweep_native_leftovers() {
    local tmp="$1" before="${2:-}" pid child grandchildren pids=""
    for pid in $(pgrep -f "__native-init" || true); do
        case "$(readlink "/proc/$pid/fd/2" 2>/dev/null || true)" in
            "$tmp"/*)
                pids="$pids $pid"
                for child in $(pgrep -P "$pid" || true); do
                    grandchildren=$(pgrep -P "$child" || true)
                    pids="$pids $child $grandchildren"
                done
                ;;
        esac
    done
    # MicroVMs (daemonized QEMU) whose sockets are under $1.
    for pid in $(pgrep -f "path=$tmp/" || true); do
        pids="$pids $pid"
    done
    if [ -n "${pids//[[:space:]]/}" ]; then
        echo "removing $(echo $pids | wc -w) processes of native sandboxes and microVMs left by in-process tests"
        kill -9 $pids 2>/dev/null || true
    fi
    { awk -v p="$tmp/" 'index($2, p) == 1 {print $2}' /proc/mounts | sort -r |
        xargs -r umount -l; } 2>/dev/null || true
    rm -rf --one-file-system "$tmp" 2>/dev/null || true
    local id
    for id in $(in_test_containers); do
        case " $before " in
            *" $id "*) ;;
            *) docker rm -f "$id" >/dev/null 2>&1 || true ;;
        esac
    done
}

# Ids of the provider tests' containers (instance `in-test-...`).
in_test_containers() {
    command -v docker >/dev/null 2>&1 || return 0
    { docker ps -a --filter label=io.stacyvm.managed=true \
        --format '{{.ID}} {{.Label "io.stacyvm.instance"}}' 2>/dev/null |
        awk '$2 ~ /^in-test-/ {print $1}'; } || true
}

on_exit() {
    local rc=$?
    stop_server
    # Interrupted during cargo test: its leftovers go too.
    if [ -n "${TEST_TMP:-}" ]; then
        sweep_native_leftovers "$TEST_TMP" "${CONTAINERS_BEFORE:-}" || true
    fi
    if declare -F stacyvm_test_env_cleanup >/dev/null; then
        stacyvm_test_env_cleanup
    fi
    exit "$rc"
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

section "test environment"
# shellcheck source=scripts/test-env.sh
source "$ROOT/scripts/test-env.sh"

# Everything the Rust suites need is set up now: a missing setting is a
# failure, never a silent skip.
export STACYVM_TEST_STRICT=1

TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
BIN="$TARGET_DIR/debug/stacyvm"
PY="$STACYVM_TEST_VENV/bin/python"

declare -a RESULTS=()
FAILED=0
record() { # record NAME STATUS (with the time since the stage's section)
    local took=$((SECONDS - STAGE_T0))
    if [ "$2" -eq 0 ]; then
        RESULTS+=("PASS  $1 (${took}s)")
    else
        RESULTS+=("FAIL  $1 (exit $2, ${took}s)")
        FAILED=1
    fi
}

summary() {
    section "summary"
    local r passed=0 failed=0
    for r in "${RESULTS[@]}"; do
        echo "$r"
        case "$r" in
            PASS*) passed=$((passed + 1)) ;;
            *) failed=$((failed + 1)) ;;
        esac
    done
    # One closing line that any reader of the log understands.
    echo "stages: $passed passed, $failed failed; total ${SECONDS}s"
}

section "cargo build"
rc=0
cargo build --workspace --all-targets || rc=$?
# The in-sandbox agent, static, beside the binaries (docker's direct exec
# path; the docker suites fail if it is missing).
[ "$rc" -ne 0 ] || bash "$ROOT/scripts/build-agent.sh" || rc=$?
record "cargo build" "$rc"
if [ "$rc" -ne 0 ]; then
    summary
    exit 1
fi

if [ "${STACYVM_TEST_SKIP_CARGO_TEST:-0}" != 1 ]; then
    section "cargo test --workspace"
    rc=0
    # The in-process test servers' data dirs go under a directory of this
    # run only, so that what they leave can be told from anything else's.
    TEST_TMP=$(mktemp -d /tmp/t.XXXX)
    # Searchable, as /tmp is: native sandboxes run as unprivileged ids.
    chmod 711 "$TEST_TMP"
    CONTAINERS_BEFORE=$(in_test_containers | tr '\n' ' ')
    TMPDIR="$TEST_TMP" cargo test --workspace || rc=$?
    record "cargo test --workspace" "$rc"
    sweep_native_leftovers "$TEST_TMP" "$CONTAINERS_BEFORE" || true
    TEST_TMP=""
fi

section "cargo fmt --check && cargo clippy"
rc=0
cargo fmt --all -- --check \
    && cargo clippy --workspace --all-targets --features stacyvm-agent/bin -- -D warnings || rc=$?
record "fmt + clippy" "$rc"

# wait_health URL LOG: wait for GET URL/api/v1/health while the server lives.
wait_health() {
    "$PY" - "$1" "$SERVER_PID" "$2" <<'EOF'
import os, sys, time, urllib.request
url, pid, log = sys.argv[1] + "/api/v1/health", int(sys.argv[2]), sys.argv[3]
deadline = time.monotonic() + 90
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except OSError:
        sys.exit("server exited before becoming healthy")
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            if r.status == 200:
                sys.exit(0)
    except Exception:
        pass
    time.sleep(0.2)
sys.exit("server not healthy after 90s")
EOF
}

# wait_workers URL N: wait until the control plane lists N workers.
wait_workers() {
    "$PY" - "$1" "$2" <<'EOF'
import json, sys, time, urllib.request
url, want = sys.argv[1] + "/api/v1/workers", int(sys.argv[2])
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            if len(json.load(r)) >= want:
                sys.exit(0)
    except Exception:
        pass
    time.sleep(0.2)
sys.exit(f"fewer than {want} workers registered after 60s")
EOF
}

# run_sdk PROVIDER: fresh data dir + port, start the server, run pytest, stop it.
# PROVIDER `remote`: a control plane without a local worker and two
# `stacyvm worker` processes (native provider), so every sandbox is remote.
run_sdk() {
    local pass=$1 provider=$1 data port log url rc=0
    case "$pass" in remote | ha) provider=native ;; esac
    data=$(mktemp -d "$STACYVM_TEST_TMPDIR/sdk-$provider.XXXXXX")
    # Native sandboxes run as unprivileged host ids that must be able to
    # reach their trees (README, "Isolation notes"): mktemp makes 0700.
    chmod o+x "$STACYVM_TEST_TMPDIR" "$data"
    port=$(stacyvm_free_port)
    log="$data/server.log"
    url="http://127.0.0.1:$port"

    local -a serve=(serve --host 127.0.0.1 --port "$port" --data-dir "$data/data" --provider "$provider")
    if [ "$pass" = remote ] || [ "$pass" = ha ]; then
        printf 'auth:\n  worker_tokens:\n    w1: sdk-token-one\n    w2: sdk-token-two\n' >"$data/control-plane.yaml"
        serve+=(--no-local-worker --config "$data/control-plane.yaml")
    fi
    # PROVIDER `custom`: every sandbox on a custom provider, over HTTP with
    # a key, served by `stacyvm custom-provider --provider native` (the
    # contract's reference server) in a process of its own.
    if [ "$pass" = custom ]; then
        local cp_port cp_key="sdk-custom-$$"
        cp_port=$(stacyvm_free_port)
        "$BIN" image import --data-dir "$data/cp" "$STACYVM_TEST_IMAGE" "$STACYVM_TEST_ROOTFS" || return 1
        STACYVM_CUSTOM_PROVIDER_KEY="$cp_key" "$BIN" --data-dir "$data/cp" custom-provider \
            --provider native --listen "127.0.0.1:$cp_port" >"$data/custom-provider.log" 2>&1 &
        WORKER_PIDS+=($!)
        "$PY" - "http://127.0.0.1:$cp_port/health" "$cp_key" <<'EOF' || { tail -n 30 "$data/custom-provider.log"; return 1; }
import sys, time, urllib.request
url, key = sys.argv[1], sys.argv[2]
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    try:
        req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"})
        with urllib.request.urlopen(req, timeout=2) as r:
            if r.status == 200:
                sys.exit(0)
    except Exception:
        pass
    time.sleep(0.2)
sys.exit("the custom provider did not answer in 60s")
EOF
        printf 'providers:\n  custom:\n    custom:\n      url: http://127.0.0.1:%s\n      api_key: %s\n' \
            "$cp_port" "$cp_key" >"$data/custom.yaml"
        serve+=(--config "$data/custom.yaml")
    fi
    # PROVIDER `qemu`: every sandbox a microVM (QEMU's microvm machine,
    # TCG here) booting the test kernel (scripts/test-env.sh).
    if [ "$pass" = qemu ]; then
        printf 'providers:\n  qemu:\n    kernel: %s\n    boot_timeout: 180s\n' "$STACYVM_TEST_KERNEL" >"$data/qemu.yaml"
        serve+=(--config "$data/qemu.yaml")
    fi
    if [ "$provider" != docker ] && [ "$provider" != custom ] && [ "$pass" = "$provider" ]; then
        echo "importing $STACYVM_TEST_IMAGE from $STACYVM_TEST_ROOTFS into $data/data"
        if ! "$BIN" image import --data-dir "$data/data" "$STACYVM_TEST_IMAGE" "$STACYVM_TEST_ROOTFS"; then
            echo "image import failed"
            return 1
        fi
    fi
    # The docker pass uses the default store (SQLite in the data dir); the
    # other passes run on a fresh PostgreSQL database, so the binary is tested
    # end to end on both stores (STACYVM_SDK_PG_PROVIDERS to change).
    case " ${STACYVM_SDK_PG_PROVIDERS-native proot} " in
        *" $provider "*)
            local db="sdk_${pass}_$$"
            psql -q -v ON_ERROR_STOP=1 "$STACYVM_TEST_POSTGRES_URL" -c "CREATE DATABASE $db" || return 1
            serve+=(--database-url "${STACYVM_TEST_POSTGRES_URL%/*}/$db")
            echo "database: ${STACYVM_TEST_POSTGRES_URL%/*}/$db"
            ;;
    esac

    # The docker pass runs with authentication on: the SDK sends an API key
    # (an admin key, so the suite may act for the owners it names).
    local api_key=""
    case " ${STACYVM_SDK_AUTH_PROVIDERS-docker} " in
        *" $provider "*)
            api_key=$("$BIN" keys create --data-dir "$data/data" --owner sdk-admin --admin) || return 1
            echo "authentication on: API key ${api_key:0:12}..."
            ;;
    esac

    echo "starting: stacyvm ${serve[*]} (log: $log)"
    "$BIN" "${serve[@]}" >"$log" 2>&1 &
    SERVER_PID=$!
    if ! wait_health "$url" "$log"; then
        echo "--- server log (tail) ---"
        tail -n 50 "$log" || true
        stop_server
        return 1
    fi
    echo "server up at $url (pid $SERVER_PID)"
    # PROVIDER `ha`: a second replica on the same database, each worker
    # heartbeating to another replica, and nginx in front alternating
    # between the replicas request by request.
    local -a worker_cp=("$url" "$url")
    if [ "$pass" = ha ]; then
        local port_b url_b serve_b=() arg
        port_b=$(stacyvm_free_port)
        url_b="http://127.0.0.1:$port_b"
        for arg in "${serve[@]}"; do
            case "$arg" in "$port") serve_b+=("$port_b") ;; "$data/data") serve_b+=("$data/data-b") ;; *) serve_b+=("$arg") ;; esac
        done
        echo "starting replica B: stacyvm ${serve_b[*]} (log: $data/server-b.log)"
        "$BIN" "${serve_b[@]}" >"$data/server-b.log" 2>&1 &
        WORKER_PIDS+=($!)
        SERVER_PID=$! wait_health "$url_b" "$data/server-b.log" || { tail -n 50 "$data/server-b.log"; stop_server; return 1; }
        worker_cp=("$url" "$url_b")
        local port_lb
        port_lb=$(stacyvm_free_port)
        mkdir -p "$data/nginx"
        cat >"$data/nginx.conf" <<EOF
daemon off;
worker_processes 1;
pid $data/nginx/nginx.pid;
error_log $data/nginx/error.log warn;
events { worker_connections 256; }
http {
    log_format upstream '\$request \$status \$upstream_addr';
    access_log $data/nginx/access.log upstream;
    client_body_temp_path $data/nginx/body;
    proxy_temp_path $data/nginx/proxy;
    fastcgi_temp_path $data/nginx/fastcgi;
    uwsgi_temp_path $data/nginx/uwsgi;
    scgi_temp_path $data/nginx/scgi;
    client_max_body_size 64m;
    upstream replicas { server 127.0.0.1:$port; server 127.0.0.1:$port_b; }
    server {
        listen 127.0.0.1:$port_lb;
        location / {
            proxy_pass http://replicas;
            proxy_set_header Host \$http_host;
            proxy_http_version 1.1;
            proxy_buffering off;
            proxy_read_timeout 600s;
            proxy_set_header Upgrade \$http_upgrade;
            proxy_set_header Connection "upgrade";
            # A request is never retried on the other replica.
            proxy_next_upstream off;
        }
    }
}
EOF
        nginx -c "$data/nginx.conf" -p "$data/nginx" &
        WORKER_PIDS+=($!)
        url="http://127.0.0.1:$port_lb"
        wait_health "$url" "$data/nginx/error.log" || { cat "$data/nginx/error.log"; stop_server; return 1; }
        echo "nginx at $url alternates between replicas $port and $port_b"
    fi
    if [ "$pass" = remote ] || [ "$pass" = ha ]; then
        local w token cp
        for w in w1 w2; do
            token=sdk-token-one cp=${worker_cp[0]}
            [ "$w" = w2 ] && token=sdk-token-two cp=${worker_cp[1]}
            mkdir -p "$data/$w" && chmod o+x "$data/$w"
            "$BIN" image import --data-dir "$data/$w" "$STACYVM_TEST_IMAGE" "$STACYVM_TEST_ROOTFS" || return 1
            echo "starting: stacyvm worker --id $w (log: $data/$w.log)"
            "$BIN" --data-dir "$data/$w" worker --control-plane "$cp" --listen 127.0.0.1:0 \
                --id "$w" --token "$token" --provider native >"$data/$w.log" 2>&1 &
            WORKER_PIDS+=($!)
        done
        if ! wait_workers "$url" 2; then
            tail -n 30 "$log" "$data"/w*.log || true
            stop_server
            return 1
        fi
        echo "workers w1 and w2 registered"
    fi

    STACYVM_BIN="$BIN" STACYVM_URL="$url" STACYVM_TEST_PROVIDER="$provider" STACYVM_API_KEY="$api_key" \
        "$PY" -m pytest "$ROOT/tests/sdk" -v -p no:cacheprovider --durations=10 || rc=$?
    if { [ "$pass" = remote ] || [ "$pass" = ha ]; } && [ "$rc" -eq 0 ]; then
        # The suite's sandboxes must have been spread over both workers.
        local spread
        spread=$(psql -tA "${STACYVM_TEST_POSTGRES_URL%/*}/sdk_${pass}_$$" \
            -c "SELECT COUNT(DISTINCT worker_id) || ' workers, ' || COUNT(*) || ' sandboxes' FROM sandboxes") || rc=1
        echo "the SDK suite's sandboxes landed on $spread"
        case "$spread" in 2\ workers*) ;; *) echo "expected sandboxes on both workers"; rc=1 ;; esac
    fi
    if [ "$pass" = ha ] && [ "$rc" -eq 0 ]; then
        # ...and its calls on both replicas: each sandbox's last step was
        # taken by one of them, and nginx sent requests to both.
        local replicas upstreams
        replicas=$(psql -tA "${STACYVM_TEST_POSTGRES_URL%/*}/sdk_${pass}_$$" \
            -c "SELECT COUNT(DISTINCT replica_id) FROM sandboxes WHERE replica_id <> ''") || rc=1
        upstreams=$(awk '{print $NF}' "$data/nginx/access.log" | sort -u | wc -l)
        echo "sandbox steps taken by $replicas replicas; nginx used $upstreams upstreams"
        [ "$replicas" = 2 ] && [ "$upstreams" -ge 2 ] || { echo "expected both replicas to serve the suite"; rc=1; }
    fi

    if [ "$rc" -ne 0 ]; then
        echo "--- server log (tail) ---"
        tail -n 80 "$log" || true
        if [ "$pass" = remote ] || [ "$pass" = ha ]; then tail -n 40 "$data"/w*.log || true; fi
        if [ "$pass" = ha ]; then tail -n 60 "$data/server-b.log" || true; fi
    fi
    stop_server
    return "$rc"
}

for provider in ${STACYVM_SDK_PROVIDERS:-docker native remote ha custom qemu}; do
    section "Python SDK suite (stacyvm==0.1.1) -- provider $provider"
    rc=0
    run_sdk "$provider" || rc=$?
    record "SDK suite, provider $provider" "$rc"
done

# run_certify: `stacyvm certify` on this host's providers (docker, native,
# proot, qemu with the test kernel), its table in the log; fails if a
# required check fails. Then firecracker (the build beside the repository),
# whose table is printed too: where KVM runs guests it must be certified; on
# a host that is itself a VM (this kind of machine: its guests do not reach
# init) its binary, KVM and kernel checks must pass and its spawn must fail
# as a boot that did not reach the agent.
run_certify() {
    local data rc=0
    data=$(mktemp -d "$STACYVM_TEST_TMPDIR/certify.XXXXXX")
    chmod o+x "$data"
    "$BIN" image import --data-dir "$data" "$STACYVM_TEST_IMAGE" "$STACYVM_TEST_ROOTFS" >/dev/null || return 1
    for provider in docker native proot qemu; do
        STACYVM_PROVIDERS_QEMU_KERNEL="$STACYVM_TEST_KERNEL" \
            "$BIN" --data-dir "$data" certify --provider "$provider" --image "$STACYVM_TEST_IMAGE" || rc=1
    done
    if [ -z "${STACYVM_TEST_FIRECRACKER:-}" ]; then
        echo "SKIPPED: certify --provider firecracker (no Firecracker binary)"
        return "$rc"
    fi
    printf 'providers:\n  firecracker:\n    binary: %s\n    kernel: %s\n    seccomp: false\n    boot_timeout: 15s\n' \
        "$STACYVM_TEST_FIRECRACKER" "$STACYVM_TEST_KERNEL" >"$data/firecracker.yaml"
    "$BIN" --data-dir "$data" --config "$data/firecracker.yaml" certify --provider firecracker \
        --image "$STACYVM_TEST_IMAGE" && return "$rc"
    "$PY" - "$data/certification.json" <<'EOF' || rc=1
import json, sys
fc = json.load(open(sys.argv[1]))["firecracker"]
checks = {c["check"]: c for c in fc["checks"]}
nested = any(l.startswith("flags") and " hypervisor" in l for l in open("/proc/cpuinfo"))
if not nested:
    sys.exit("firecracker is not certified on a host that is not itself a VM")
for name in ("health", "binary", "kvm", "kernel", "image"):
    if checks[name]["status"] != "pass":
        sys.exit(f"firecracker's {name} check did not pass: {checks[name]['detail']}")
spawn = checks["spawn"]
if spawn["status"] != "fail" or "did not boot to its agent" not in spawn["detail"]:
    sys.exit(f"firecracker's spawn should fail as a boot that did not reach the agent: {spawn}")
print("firecracker on this host (itself a VM): binary, KVM and kernel pass; the guest does not boot, as expected")
EOF
    return "$rc"
}

section "stacyvm certify (runtime certification of this host)"
rc=0
run_certify || rc=$?
record "stacyvm certify" "$rc"

# run_schemathesis: schemathesis (PyPI) against a live server (native
# provider, authentication on, an admin key) reading the server's own
# /api/v1/openapi.json: every operation but the endless SSE stream, with
# generated, boundary and example inputs and the stateful phase following
# the document's links (spawn, then exec and files on what it spawned).
# Fails on any 5xx and on any answer the document does not describe
# (status, content type, headers, body schema). Small caps keep the
# sandboxes it spawns few and short-lived.
run_schemathesis() {
    local data port log url rc=0 api_key
    data=$(mktemp -d "$STACYVM_TEST_TMPDIR/schemathesis.XXXXXX")
    chmod o+x "$STACYVM_TEST_TMPDIR" "$data"
    port=$(stacyvm_free_port)
    log="$data/server.log"
    url="http://127.0.0.1:$port"
    "$BIN" image import --data-dir "$data/data" "$STACYVM_TEST_IMAGE" "$STACYVM_TEST_ROOTFS" || return 1
    api_key=$("$BIN" keys create --data-dir "$data/data" --owner schemathesis --admin) || return 1
    # Every provider of this host healthy, qemu included (its spawns boot
    # microVMs under TCG): an unavailable one would answer 503. Firecracker
    # cannot boot a guest on this host (itself a VM): the admin's policy
    # denies it (403), as an operator without KVM would.
    printf 'defaults:\n  image: %s\n  max_sandboxes: 6\n  ttl: 10m\n  max_ttl: 30m\n  exec_timeout: 10s\n  max_exec_timeout: 20s\npool:\n  max_warm: 0\npolicy:\n  roles:\n    admin:\n      providers:\n        deny: [firecracker]\nproviders:\n  qemu:\n    kernel: %s\n    boot_timeout: 180s\n' \
        "$STACYVM_TEST_IMAGE" "$STACYVM_TEST_KERNEL" >"$data/config.yaml"
    echo "starting: stacyvm serve --port $port (native, authentication on; log: $log)"
    "$BIN" serve --host 127.0.0.1 --port "$port" --data-dir "$data/data" --provider native \
        --config "$data/config.yaml" >"$log" 2>&1 &
    SERVER_PID=$!
    if ! wait_health "$url" "$log"; then
        tail -n 50 "$log" || true
        stop_server
        return 1
    fi
    (cd "$data" && "$STACYVM_TEST_SCHEMATHESIS" run "$url/api/v1/openapi.json" \
        -H "X-API-Key: $api_key" \
        --checks not_a_server_error,status_code_conformance,content_type_conformance,response_headers_conformance,response_schema_conformance \
        --exclude-path /api/v1/events \
        --max-examples "${STACYVM_SCHEMATHESIS_EXAMPLES:-60}" --request-timeout 30 \
        --workers 2 --no-color --generation-database none \
        --report junit --report-junit-path "$TARGET_DIR/schemathesis.xml") || rc=$?
    # Warm pools are off (max_warm 0): a generated template cannot keep
    # sandboxes the listing below does not show.
    # Native sandboxes outlive their server (they are adopted at the next
    # start): what the generated spawns made goes before the server does.
    "$PY" - "$url" "$api_key" <<'EOF' || rc=1
import json, sys, urllib.request
url, key = sys.argv[1] + "/api/v1/sandboxes", sys.argv[2]
def call(method, u):
    req = urllib.request.Request(u, method=method, headers={"X-API-Key": key})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.load(r)
live = call("GET", url)
for sandbox in live:
    try:
        call("DELETE", f"{url}/{sandbox['id']}")
    except Exception as e:
        print(f"cannot destroy {sandbox['id']}: {e}")
left = call("GET", url)
print(f"destroyed the {len(live)} sandboxes schemathesis left; {len(left)} remain")
sys.exit(1 if left else 0)
EOF
    if [ "$rc" -ne 0 ]; then
        echo "--- server log (tail) ---"
        tail -n 80 "$log" || true
    fi
    stop_server
    # A safety net only: the cleanup above failed the stage if it left any.
    sweep_native_leftovers "$data" "$(in_test_containers | tr '\n' ' ')"
    return "$rc"
}

if [ "${STACYVM_TEST_SKIP_SCHEMATHESIS:-0}" != 1 ]; then
    section "schemathesis against /api/v1/openapi.json"
    rc=0
    run_schemathesis || rc=$?
    record "schemathesis" "$rc"
fi

# browser_deps: node_modules for tests/browser (playwright-core), from the
# lockfile; `npm ci` only when package-lock.json changed since the last one.
browser_deps() {
    local dir="$ROOT/tests/browser" stamp="$ROOT/tests/browser/node_modules/.stacyvm-lock"
    if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
        echo "node and npm (Node.js >= 20) are needed for the browser test"
        return 1
    fi
    if [ -f "$stamp" ] && cmp -s "$stamp" "$dir/package-lock.json" \
        && [ -f "$dir/node_modules/playwright-core/package.json" ]; then
        echo "tests/browser/node_modules up to date"
        return 0
    fi
    (cd "$dir" && npm ci --no-audit --no-fund) || return 1
    cp "$dir/package-lock.json" "$stamp"
}

# run_browser: the GraphQL playground in headless Chromium against a real
# server (docker provider): page loads offline, a query, live subscriptions.
run_browser() {
    local data port log url rc=0
    browser_deps || return 1
    data=$(mktemp -d "$STACYVM_TEST_TMPDIR/browser.XXXXXX")
    port=$(stacyvm_free_port)
    log="$data/server.log"
    url="http://127.0.0.1:$port"
    echo "starting: stacyvm serve --port $port (docker; log: $log)"
    "$BIN" serve --host 127.0.0.1 --port "$port" --data-dir "$data/data" --provider docker >"$log" 2>&1 &
    SERVER_PID=$!
    if ! wait_health "$url" "$log"; then
        echo "--- server log (tail) ---"
        tail -n 50 "$log" || true
        stop_server
        return 1
    fi
    echo "server up at $url (pid $SERVER_PID)"
    STACYVM_URL="$url" node --test "$ROOT/tests/browser/playground.test.mjs" \
        "$ROOT/tests/browser/dashboard.test.mjs" "$ROOT/tests/browser/docs.test.mjs" || rc=$?
    if [ "$rc" -ne 0 ]; then
        echo "--- server log (tail) ---"
        tail -n 80 "$log" || true
    else
        echo "screenshots: $TARGET_DIR/playground.png $TARGET_DIR/dashboard.png $TARGET_DIR/docs.png"
    fi
    stop_server
    return "$rc"
}

if [ "${STACYVM_TEST_SKIP_BROWSER:-0}" != 1 ]; then
    section "playground browser test"
    rc=0
    run_browser || rc=$?
    record "playground browser test" "$rc"
fi

# The benchmark, short: figures printed, nothing asserted (a debug build on
# a shared CI machine measures the machine as much as StacyVM). The
# README's table comes from `cargo build --release` and a full run.
if [ "${STACYVM_TEST_SKIP_BENCH:-0}" != 1 ]; then
    section "stacyvm bench --quick"
    rc=0
    "$BIN" bench --quick --image "$STACYVM_TEST_IMAGE" --rootfs "$STACYVM_TEST_ROOTFS" \
        --json "$TARGET_DIR/bench.json" || rc=$?
    record "stacyvm bench --quick" "$rc"
fi

summary
exit "$FAILED"
