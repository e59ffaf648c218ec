#!/usr/bin/env bash
# Test environment for StacyVM: system packages (including Chromium for the
# playground browser test), a Docker daemon, a private PostgreSQL 15 cluster,
# the busybox test rootfs/image and a Python venv with the reference SDK
# (stacyvm==0.1.1).
#
# Meant for a bare Debian 12 machine, as root. Idempotent: whatever is already
# there (packages, a running dockerd, the image, the venv) is reused.
#
# Sourced (what scripts/test.sh does):
#     source scripts/test-env.sh        # sets up and exports the variables
#     trap stacyvm_test_env_cleanup EXIT
#   The cleanup function stops only what this script started (dockerd, the
#   PostgreSQL cluster) and removes its temporary directory.
#
# Run directly (scripts/test-env.sh): sets everything up, leaves the services
#   running and writes the exports to target/test-env/env.sh; the cleanup
#   command is printed at the end.
#
# Exported for the test suites:
#   STACYVM_TEST_ROOTFS        busybox rootfs tarball (for `stacyvm image import`)
#   STACYVM_TEST_IMAGE         docker image built from it (stacyvm-test:busybox)
#   STACYVM_TEST_POSTGRES_URL  postgres://stacyvm:stacyvm@127.0.0.1:PORT/stacyvm_test
#   STACYVM_TEST_DOCKER=1      a Docker daemon answers
#   STACYVM_TEST_VENV          python venv with stacyvm==0.1.1, pytest, pytest-asyncio
#   STACYVM_TEST_SCHEMATHESIS  the schemathesis command (its own venv)
#   STACYVM_TEST_TMPDIR        per-run scratch directory (removed by cleanup)
#   STACYVM_TEST_RUNSC=1       the Docker daemon runs containers under gVisor on request
#   STACYVM_TEST_KERNEL        a vmlinuz for microVM guests (Debian's cloud kernel,
#                              unpacked with its modules under <state>/kernel)
#   STACYVM_TEST_FIRECRACKER   the Firecracker binary (../shared/tools/firecracker: no
#                              registry ships one); unset when there is none
#
# Knobs (optional, set before sourcing):
#   STACYVM_TEST_POSTGRES_URL  if already set, no cluster is started and it is used as is
#   STACYVM_TEST_STATE_DIR     where the venv and rootfs are kept (default: <repo>/target/test-env)
#   STACYVM_TEST_PYTHON        interpreter for the venv (default: python3)

# ---------------------------------------------------------------------------
# helpers (all prefixed, since this file is sourced into the caller's shell)

_stacyvm_env_log() { printf '[test-env] %s\n' "$*" >&2; }
_stacyvm_env_err() { printf '[test-env] ERROR: %s\n' "$*" >&2; }

# stacyvm_free_port: print a TCP port on 127.0.0.1 that is free right now.
stacyvm_free_port() {
    "${STACYVM_TEST_PYTHON:-python3}" -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()'
}

_stacyvm_pkg_installed() {
    [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]
}

# Install what is missing; no apt at all when everything is present.
_stacyvm_env_packages() {
    local missing=() py="${STACYVM_TEST_PYTHON:-python3}"
    command -v dockerd >/dev/null 2>&1 && command -v docker >/dev/null 2>&1 || missing+=(docker.io)
    compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null || missing+=(postgresql)
    # The rootfs needs the *static* busybox.
    _stacyvm_pkg_installed busybox-static || missing+=(busybox-static)
    command -v proot >/dev/null 2>&1 || missing+=(proot)
    # gVisor, for the docker provider's `runtime: runsc`.
    command -v runsc >/dev/null 2>&1 || missing+=(runsc)
    # `stacyvm bench` loads the API with wrk (a built-in client otherwise).
    command -v wrk >/dev/null 2>&1 || missing+=(wrk)
    # Native sandboxes' capped disks: mkfs.ext4, and mount for loop mounts.
    [ -x /sbin/mkfs.ext4 ] || [ -x /usr/sbin/mkfs.ext4 ] || missing+=(e2fsprogs)
    command -v mount >/dev/null 2>&1 || missing+=(mount)
    # The docker disk-cap test runs a private dockerd on btrfs (quotas).
    command -v mkfs.btrfs >/dev/null 2>&1 || missing+=(btrfs-progs)
    # The seccomp test compiles a static C program.
    compgen -G '/usr/lib/*/libc.a' >/dev/null || missing+=(libc6-dev)
    # Debian's python3 ships venv without ensurepip unless python3-venv is installed.
    "$py" -c 'import venv, ensurepip' >/dev/null 2>&1 || missing+=(python3-venv)
    command -v psql >/dev/null 2>&1 || missing+=(postgresql-client)
    # The HA pass of the SDK suite puts nginx in front of two replicas.
    command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx)
    # `stacyvm shell` is tested in a real terminal that tmux drives.
    command -v tmux >/dev/null 2>&1 || missing+=(tmux)
    # The qemu provider's microVMs (QEMU's microvm machine under TCG).
    local qemu_flags=()
    if ! command -v qemu-system-x86_64 >/dev/null 2>&1; then
        missing+=(qemu-system-x86)
        # A newer qemu-utils (from backports) breaks bookworm's
        # qemu-system-common: take bookworm's alongside.
        if _stacyvm_pkg_installed qemu-utils; then
            missing+=(qemu-utils/bookworm)
            qemu_flags+=(--allow-downgrades)
        fi
    fi
    # The playground browser test (tests/browser) drives Debian's Chromium.
    [ -x /usr/bin/chromium ] || missing+=(chromium)
    _stacyvm_pkg_installed fonts-liberation || missing+=(fonts-liberation)

    if [ "${#missing[@]}" -eq 0 ]; then
        _stacyvm_env_log "system packages: all present"
        return 0
    fi
    if [ "$(id -u)" -ne 0 ]; then
        _stacyvm_env_err "missing packages (${missing[*]}) and not root; install them first"
        return 1
    fi
    _stacyvm_env_log "installing: ${missing[*]}"
    # Keep the packages' maintainer scripts from starting system services
    # (docker.service, postgresql@15-main): we start our own, and only those
    # get stopped by the cleanup.
    local policy=/usr/sbin/policy-rc.d own_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 755 "$policy" && own_policy=1
    fi
    local rc=0
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || rc=$?
    if [ "$rc" -eq 0 ]; then
        apt-get install -y -qq --no-install-recommends "${qemu_flags[@]}" "${missing[@]}" || rc=$?
    fi
    [ "$own_policy" -eq 1 ] && rm -f "$policy"
    if [ "$rc" -ne 0 ]; then
        _stacyvm_env_err "apt-get failed ($rc)"
        return 1
    fi
}

# Start dockerd unless a daemon already answers.
_stacyvm_env_docker() {
    if docker info >/dev/null 2>&1; then
        _stacyvm_env_log "docker: daemon already running"
        return 0
    fi
    local log="$STACYVM_TEST_TMPDIR/dockerd.log"
    _stacyvm_env_log "docker: starting dockerd (log: $log)"
    # gVisor registered as `runsc`, with its own network off: sandboxes
    # have none (network: none), and this runsc refuses to set one up in
    # the namespace Docker gives such containers.
    local -a runtimes=()
    if command -v runsc >/dev/null 2>&1; then
        printf '{"runtimes": {"runsc": {"path": "%s", "runtimeArgs": ["--network=none"]}}}\n' \
            "$(command -v runsc)" >"$STACYVM_TEST_TMPDIR/daemon.json"
        runtimes=(--config-file "$STACYVM_TEST_TMPDIR/daemon.json")
    fi
    dockerd "${runtimes[@]}" >"$log" 2>&1 &
    _STACYVM_ENV_DOCKERD_PID=$!
    local i
    for i in $(seq 1 60); do
        if docker info >/dev/null 2>&1; then
            _stacyvm_env_log "docker: dockerd ready (pid $_STACYVM_ENV_DOCKERD_PID)"
            return 0
        fi
        if ! kill -0 "$_STACYVM_ENV_DOCKERD_PID" 2>/dev/null; then
            break
        fi
        sleep 0.5
    done
    _stacyvm_env_err "dockerd did not come up; last log lines:"
    tail -n 30 "$log" >&2 || true
    return 1
}

# Private PostgreSQL cluster on 127.0.0.1:<free port>, data in the temp dir.
_stacyvm_env_postgres() {
    if [ -n "${STACYVM_TEST_POSTGRES_URL:-}" ]; then
        _stacyvm_env_log "postgres: using preset STACYVM_TEST_POSTGRES_URL"
        return 0
    fi
    local bindir
    bindir=$(ls -d /usr/lib/postgresql/15/bin 2>/dev/null || ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    if [ -z "$bindir" ] || [ ! -x "$bindir/initdb" ]; then
        _stacyvm_env_err "postgres: no initdb under /usr/lib/postgresql"
        return 1
    fi
    local pgdir="$STACYVM_TEST_TMPDIR/postgres" port
    port=$(stacyvm_free_port) || return 1
    mkdir -p "$pgdir" || return 1
    # PostgreSQL refuses to run as root: run it as the postgres user.
    local -a as_pg=()
    if [ "$(id -u)" -eq 0 ]; then
        chown postgres: "$pgdir" || return 1
        as_pg=(runuser -u postgres --)
    fi
    _stacyvm_env_log "postgres: initdb + start on 127.0.0.1:$port"
    "${as_pg[@]}" "$bindir/initdb" -D "$pgdir/data" -U postgres --auth-local=trust \
        --auth-host=scram-sha-256 -E UTF8 --no-locale >"$pgdir/initdb.log" 2>&1 || {
        _stacyvm_env_err "initdb failed:"; tail -n 20 "$pgdir/initdb.log" >&2; return 1; }
    "${as_pg[@]}" "$bindir/pg_ctl" -D "$pgdir/data" -l "$pgdir/postgres.log" -w -t 30 \
        -o "-c listen_addresses=127.0.0.1 -p $port -k $pgdir -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200" \
        start >/dev/null || {
        _stacyvm_env_err "postgres did not start:"; tail -n 20 "$pgdir/postgres.log" >&2; return 1; }
    _STACYVM_ENV_PG_BINDIR=$bindir
    _STACYVM_ENV_PG_DATA="$pgdir/data"
    # CREATEDB so suites can make a database per test.
    "${as_pg[@]}" "$bindir/psql" -q -v ON_ERROR_STOP=1 -h "$pgdir" -p "$port" -U postgres -d postgres \
        -c "CREATE ROLE stacyvm LOGIN CREATEDB PASSWORD 'stacyvm'" \
        -c "CREATE DATABASE stacyvm_test OWNER stacyvm" >/dev/null || {
        _stacyvm_env_err "postgres: creating role/database failed"; return 1; }
    export STACYVM_TEST_POSTGRES_URL="postgres://stacyvm:stacyvm@127.0.0.1:$port/stacyvm_test"
    _stacyvm_env_log "postgres: $STACYVM_TEST_POSTGRES_URL"
}

# Busybox rootfs tarball (deterministic, so its hash identifies it).
_stacyvm_env_rootfs() {
    local out="$STACYVM_TEST_STATE_DIR/busybox-rootfs.tar"
    local stage="$STACYVM_TEST_TMPDIR/rootfs" bb=/bin/busybox
    [ -x "$bb" ] || bb=$(command -v busybox) || { _stacyvm_env_err "busybox not found"; return 1; }
    rm -rf "$stage" && mkdir -p "$stage" || return 1
    (
        set -e
        cd "$stage"
        mkdir -p bin tmp etc root workspace
        cp "$bb" bin/busybox
        chmod 755 bin/busybox bin etc root workspace
        for applet in $("$bb" --list); do
            # `busybox` itself would replace the binary by a symlink to itself.
            [ "$applet" = busybox ] && continue
            ln -sf busybox "bin/$applet"
        done
        chmod 1777 tmp
        printf 'root:x:0:0:root:/root:/bin/sh\n' >etc/passwd
        printf 'root:x:0:\n' >etc/group
        printf 'sandbox\n' >etc/hostname
        chmod 644 etc/passwd etc/group etc/hostname
        tar --sort=name --mtime='@0' --owner=0 --group=0 --numeric-owner \
            -cf "$out.tmp" bin etc root tmp workspace
    ) || { _stacyvm_env_err "building the rootfs failed"; return 1; }
    mv -f "$out.tmp" "$out" || return 1
    rm -rf "$stage"
    export STACYVM_TEST_ROOTFS="$out"
    _stacyvm_env_log "rootfs: $out"
}

# The microVM guest kernel: Debian's linux-image-cloud-amd64, unpacked (not
# installed: the host's /boot stays as it is) into the state dir, its
# modules in kernel/lib/modules/<release> beside kernel/boot.
_stacyvm_env_kernel() {
    local dir="$STACYVM_TEST_STATE_DIR/kernel" found
    found=$(compgen -G "$dir/boot/vmlinuz-*" | sort | tail -n 1)
    if [ -z "$found" ]; then
        local stage="$STACYVM_TEST_TMPDIR/kernel" pkg
        rm -rf "$stage" && mkdir -p "$stage" || return 1
        pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '/Depends: linux-image-/ {print $2; exit}')
        if [ -z "$pkg" ]; then
            apt-get update -qq || return 1
            pkg=$(apt-cache depends linux-image-cloud-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')
        fi
        [ -n "$pkg" ] || { _stacyvm_env_err "no linux-image-cloud-amd64 in apt"; return 1; }
        _stacyvm_env_log "kernel: downloading $pkg"
        (cd "$stage" && apt-get download -qq "$pkg" 2>/dev/null) || { _stacyvm_env_err "apt-get download $pkg failed"; return 1; }
        rm -rf "$dir.tmp" && mkdir -p "$dir.tmp" || return 1
        dpkg -x "$stage"/*.deb "$dir.tmp" || return 1
        rm -rf "$dir" && mv "$dir.tmp" "$dir" && rm -rf "$stage" || return 1
        found=$(compgen -G "$dir/boot/vmlinuz-*" | sort | tail -n 1)
    fi
    [ -n "$found" ] || { _stacyvm_env_err "no vmlinuz in $dir/boot"; return 1; }
    export STACYVM_TEST_KERNEL="$found"
    _stacyvm_env_log "kernel: $found"
}

# Import the rootfs as a docker image, unless the tag already holds this very tarball.
_stacyvm_env_image() {
    local image=stacyvm-test:busybox sum have
    sum=$(sha256sum "$STACYVM_TEST_ROOTFS" | cut -d' ' -f1) || return 1
    have=$(docker image inspect -f '{{index .Config.Labels "org.stacyvm.rootfs-sha256"}}' "$image" 2>/dev/null || true)
    if [ "$have" = "$sum" ]; then
        _stacyvm_env_log "image: $image up to date"
    else
        _stacyvm_env_log "image: importing $image"
        docker import \
            --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
            --change "LABEL org.stacyvm.rootfs-sha256=$sum" \
            "$STACYVM_TEST_ROOTFS" "$image" >/dev/null || { _stacyvm_env_err "docker import failed"; return 1; }
    fi
    export STACYVM_TEST_IMAGE="$image"
}

# _stacyvm_env_pyvenv DIR "REQS" "IMPORTS": a Python venv under the state
# dir with exactly REQS installed (kept while they and IMPORTS still hold).
_stacyvm_env_pyvenv() {
    local venv="$STACYVM_TEST_STATE_DIR/$1" reqs=$2 imports=$3 py="${STACYVM_TEST_PYTHON:-python3}"
    local stamp="$venv/.stacyvm-reqs"
    if [ -x "$venv/bin/python" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$reqs" ] \
        && "$venv/bin/python" -c "import $imports" >/dev/null 2>&1; then
        _stacyvm_env_log "venv: $venv up to date"
    else
        _stacyvm_env_log "venv: creating $venv ($reqs)"
        rm -rf "$venv"
        "$py" -m venv "$venv" || { _stacyvm_env_err "python -m venv failed"; return 1; }
        # shellcheck disable=SC2086
        "$venv/bin/python" -m pip install -q --disable-pip-version-check $reqs \
            || { _stacyvm_env_err "pip install failed"; return 1; }
        printf '%s' "$reqs" >"$stamp"
    fi
}

# Python venvs: the reference SDK with pytest, and schemathesis on its own
# (it needs a newer pytest than the SDK suites pin).
_stacyvm_env_venv() {
    _stacyvm_env_pyvenv venv \
        "stacyvm==0.1.1 pytest==8.3.5 pytest-asyncio==0.25.3 prometheus-client==0.21.1 mcp==2.3.0" \
        "stacyvm, pytest, pytest_asyncio, prometheus_client, mcp" || return 1
    export STACYVM_TEST_VENV="$STACYVM_TEST_STATE_DIR/venv"
    _stacyvm_env_pyvenv schemathesis-venv "schemathesis==4.32.5" "schemathesis" || return 1
    export STACYVM_TEST_SCHEMATHESIS="$STACYVM_TEST_STATE_DIR/schemathesis-venv/bin/schemathesis"
}

# ---------------------------------------------------------------------------
# public entry points

stacyvm_test_env_cleanup() {
    if [ -n "${_STACYVM_ENV_PG_DATA:-}" ]; then
        _stacyvm_env_log "stopping postgres"
        local -a as_pg=()
        [ "$(id -u)" -eq 0 ] && as_pg=(runuser -u postgres --)
        "${as_pg[@]}" "$_STACYVM_ENV_PG_BINDIR/pg_ctl" -D "$_STACYVM_ENV_PG_DATA" -m fast -w -t 30 stop >/dev/null 2>&1 || true
        unset _STACYVM_ENV_PG_DATA
    fi
    if [ -n "${_STACYVM_ENV_DOCKERD_PID:-}" ]; then
        _stacyvm_env_log "stopping dockerd (pid $_STACYVM_ENV_DOCKERD_PID)"
        kill -TERM "$_STACYVM_ENV_DOCKERD_PID" 2>/dev/null || true
        local i
        for i in $(seq 1 40); do
            kill -0 "$_STACYVM_ENV_DOCKERD_PID" 2>/dev/null || break
            sleep 0.5
        done
        kill -KILL "$_STACYVM_ENV_DOCKERD_PID" 2>/dev/null || true
        wait "$_STACYVM_ENV_DOCKERD_PID" 2>/dev/null || true
        unset _STACYVM_ENV_DOCKERD_PID
    fi
    if [ -n "${STACYVM_TEST_TMPDIR:-}" ] && [ -d "$STACYVM_TEST_TMPDIR" ]; then
        rm -rf "$STACYVM_TEST_TMPDIR"
    fi
    unset STACYVM_TEST_TMPDIR
}

# Firecracker: the build beside the repository (no package registry ships
# one), or STACYVM_TEST_FIRECRACKER, or one on PATH. Without one its tests
# say they are skipped (nothing here can install it).
_stacyvm_env_firecracker() {
    local fc
    for fc in "${STACYVM_TEST_FIRECRACKER:-}" "$1/../shared/tools/firecracker/firecracker" \
        /work/shared/tools/firecracker/firecracker "$(command -v firecracker || true)"; do
        if [ -n "$fc" ] && [ -x "$fc" ]; then
            STACYVM_TEST_FIRECRACKER=$(realpath "$fc") || return 1
            export STACYVM_TEST_FIRECRACKER
            _stacyvm_env_log "firecracker: $STACYVM_TEST_FIRECRACKER ($("$STACYVM_TEST_FIRECRACKER" --version | head -n 1))"
            return 0
        fi
    done
    _stacyvm_env_log "firecracker: none found (../shared/tools/firecracker/firecracker): its tests are skipped"
    unset STACYVM_TEST_FIRECRACKER
}

stacyvm_test_env_setup() {
    local root
    root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd) || return 1
    export STACYVM_TEST_STATE_DIR="${STACYVM_TEST_STATE_DIR:-$root/target/test-env}"
    mkdir -p "$STACYVM_TEST_STATE_DIR" || return 1
    if [ -z "${STACYVM_TEST_TMPDIR:-}" ] || [ ! -d "$STACYVM_TEST_TMPDIR" ]; then
        STACYVM_TEST_TMPDIR=$(mktemp -d /tmp/stacyvm-test.XXXXXX) || return 1
        chmod 755 "$STACYVM_TEST_TMPDIR"   # postgres must traverse it
        export STACYVM_TEST_TMPDIR
    fi
    _stacyvm_env_packages || return 1
    _stacyvm_env_docker || return 1
    export STACYVM_TEST_DOCKER=1
    # gVisor where the daemon has it registered (a dockerd started here does).
    if docker info --format '{{json .Runtimes}}' 2>/dev/null | grep -q '"runsc"'; then
        export STACYVM_TEST_RUNSC=1
    fi
    _stacyvm_env_postgres || return 1
    _stacyvm_env_rootfs || return 1
    _stacyvm_env_image || return 1
    _stacyvm_env_kernel || return 1
    _stacyvm_env_firecracker "$root" || return 1
    _stacyvm_env_venv || return 1
    _stacyvm_env_log "ready"
}

# ---------------------------------------------------------------------------

if [ "${BASH_SOURCE[0]}" != "$0" ]; then
    # Sourced: set up; the caller traps stacyvm_test_env_cleanup on EXIT.
    if ! stacyvm_test_env_setup; then
        _stacyvm_env_err "test environment setup failed"
        stacyvm_test_env_cleanup
        return 1
    fi
else
    set -uo pipefail
    if ! stacyvm_test_env_setup; then
        stacyvm_test_env_cleanup
        exit 1
    fi
    envfile="$STACYVM_TEST_STATE_DIR/env.sh"
    {
        for v in STACYVM_TEST_ROOTFS STACYVM_TEST_IMAGE STACYVM_TEST_POSTGRES_URL \
            STACYVM_TEST_DOCKER STACYVM_TEST_VENV STACYVM_TEST_SCHEMATHESIS STACYVM_TEST_TMPDIR \
            STACYVM_TEST_KERNEL STACYVM_TEST_FIRECRACKER STACYVM_TEST_RUNSC; do
            printf 'export %s=%q\n' "$v" "${!v-}"
        done
    } >"$envfile"
    cat "$envfile"
    echo "# written to $envfile; services started by this run stay up."
    [ -n "${_STACYVM_ENV_DOCKERD_PID:-}" ] && echo "# stop dockerd:  kill $_STACYVM_ENV_DOCKERD_PID"
    [ -n "${_STACYVM_ENV_PG_DATA:-}" ] && echo "# stop postgres: runuser -u postgres -- $_STACYVM_ENV_PG_BINDIR/pg_ctl -D $_STACYVM_ENV_PG_DATA -m fast stop"
    exit 0
fi
