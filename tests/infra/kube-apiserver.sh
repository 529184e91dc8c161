#!/usr/bin/env bash
# Build, start and stop a real kube-apiserver (plus etcd) for cistate's tests.
#
#   tests/infra/kube-apiserver.sh build              # build/cache the binary, print its path
#   tests/infra/kube-apiserver.sh start DIR [PORT]   # start etcd + apiserver, print DIR/kubeconfig
#   tests/infra/kube-apiserver.sh stop DIR           # stop what `start DIR` started
#
# The binary is v1.20.2, built from Debian's `kubernetes` source package, and
# cached outside the repo at ${CISTATE_CACHE:-/var/cache/cistate}/bin/kube-apiserver.
# There is no scheduler, controller-manager or kubelet: objects are stored and
# validated for real, but no pod ever runs (same setup as envtest).
#
# Everything except the final result line goes to stderr (or a log file), so
# callers can do: KUBECONFIG=$(tests/infra/kube-apiserver.sh start "$dir" | tail -n1)
set -euo pipefail

CACHE="${CISTATE_CACHE:-/var/cache/cistate}"
BIN_DIR="$CACHE/bin"
APISERVER="$BIN_DIR/kube-apiserver"
SRC_DIR="$CACHE/src/kubernetes"
K8S_VERSION="v1.20.2"
READY_TIMEOUT="${CISTATE_KUBE_READY_TIMEOUT:-60}"

log() { printf '[kube-apiserver.sh] %s\n' "$*" >&2; }
die() { printf '[kube-apiserver.sh] ERROR: %s\n' "$*" >&2; exit 1; }

usage() {
    cat >&2 <<USAGE
usage: $0 build
       $0 start DIR [PORT]
       $0 stop DIR
USAGE
    exit 2
}

binary_ok() {
    [[ -x "$APISERVER" ]] && "$APISERVER" --version >/dev/null 2>&1
}

# ---------------------------------------------------------------- build --

ensure_deb_src() {
    # Is there already a deb-src entry for bookworm main (one-line or deb822 format)?
    local f
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -f "$f" ]] || continue
        if grep -Eq '^[[:space:]]*deb-src[[:space:]].*[[:space:]]bookworm[[:space:]].*main' "$f"; then
            return 0
        fi
    done
    for f in /etc/apt/sources.list.d/*.sources; do
        [[ -f "$f" ]] || continue
        # crude deb822 check: a stanza listing deb-src and the bookworm suite
        if awk 'BEGIN{RS=""} /Types:[^\n]*deb-src/ && /Suites:[^\n]*bookworm([[:space:]]|$)/ && /Enabled:[[:space:]]*no/ {next} /Types:[^\n]*deb-src/ && /Suites:[^\n]*bookworm([[:space:]]|$)/ {found=1} END{exit !found}' "$f"; then
            return 0
        fi
    done
    log "adding deb-src list for bookworm: /etc/apt/sources.list.d/cistate-bookworm-src.sources"
    cat > /etc/apt/sources.list.d/cistate-bookworm-src.sources <<'SRC'
Types: deb-src
URIs: http://deb.debian.org/debian
Suites: bookworm
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
}

install_build_deps() {
    export DEBIAN_FRONTEND=noninteractive
    log "apt-get update"
    apt-get update -q >&2 || die "apt-get update failed"
    log "apt-get install etcd-server golang-go rsync openssl make"
    apt-get install -y -q etcd-server golang-go rsync openssl make >&2 \
        || die "apt-get install of build dependencies failed"
}

do_build() {
    if binary_ok; then
        log "cached: $APISERVER ($("$APISERVER" --version 2>&1))"
        echo "$APISERVER"
        return 0
    fi
    [[ $EUID -eq 0 ]] || die "build needs root (apt-get); run as root or pre-populate $APISERVER"
    mkdir -p "$BIN_DIR" "$CACHE/src"

    # One build at a time per cache (parallel test runs may all call build).
    exec 9>"$CACHE/.kube-apiserver-build.lock"
    log "waiting for build lock $CACHE/.kube-apiserver-build.lock"
    flock 9
    if binary_ok; then   # someone else built it while we waited
        log "cached (built by a concurrent run): $APISERVER"
        echo "$APISERVER"
        return 0
    fi

    local t0=$SECONDS
    ensure_deb_src
    install_build_deps

    local dl="$CACHE/src/download"
    mkdir -p "$dl"
    if ! compgen -G "$dl/kubernetes_*.orig.tar.*" >/dev/null; then
        log "apt-get source --download-only kubernetes (into $dl)"
        # let apt's sandbox user write there (avoids the "unsandboxed" warning)
        chown _apt "$dl" 2>/dev/null || true
        (cd "$dl" && apt-get source -q --download-only kubernetes >&2) \
            || die "apt-get source --download-only kubernetes failed (is the deb-src list active? did apt-get update run?)"
    fi
    local orig
    orig=$(compgen -G "$dl/kubernetes_*.orig.tar.*" | head -n1) \
        || die "no kubernetes_*.orig.tar.* in $dl"

    if [[ ! -f "$SRC_DIR/.cistate-unpacked" ]]; then
        log "unpacking $orig into $SRC_DIR"
        rm -rf "$SRC_DIR"
        mkdir -p "$SRC_DIR"
        tar -xf "$orig" -C "$SRC_DIR" --strip-components=1 \
            || die "failed to unpack $orig"
        [[ -f "$SRC_DIR/Makefile" && -d "$SRC_DIR/cmd/kube-apiserver" ]] \
            || die "unexpected layout in $orig (no Makefile / cmd/kube-apiserver)"
        touch "$SRC_DIR/.cistate-unpacked"
    fi

    log "building kube-apiserver $K8S_VERSION (5-10 minutes; log: $CACHE/src/build.log)"
    # The orig tarball is a `git archive` (hack/lib/version.sh carries the
    # expanded commit and tag); the KUBE_GIT_* values below are only a
    # fallback for a tarball without them.
    (
        cd "$SRC_DIR"
        export GOPROXY=off CGO_ENABLED=0 GOFLAGS=-mod=vendor
        export GOCACHE="$CACHE/src/go-build-cache" GOPATH="$CACHE/src/gopath"
        export KUBE_GIT_VERSION="$K8S_VERSION" KUBE_GIT_TREE_STATE=clean
        export KUBE_GIT_COMMIT=debian-source KUBE_GIT_MAJOR=1 KUBE_GIT_MINOR=20
        make WHAT=cmd/kube-apiserver
    ) >"$CACHE/src/build.log" 2>&1 || {
        tail -n 40 "$CACHE/src/build.log" >&2
        die "make WHAT=cmd/kube-apiserver failed; full log: $CACHE/src/build.log"
    }

    local built
    built=$(find "$SRC_DIR/_output" -type f -name kube-apiserver -perm -u+x 2>/dev/null | head -n1)
    [[ -n "$built" ]] || die "build finished but no kube-apiserver binary under $SRC_DIR/_output"
    install -m 0755 "$built" "$APISERVER.tmp"
    mv -f "$APISERVER.tmp" "$APISERVER"
    binary_ok || die "$APISERVER was installed but '--version' fails"
    log "built $("$APISERVER" --version 2>&1) in $((SECONDS - t0)) s"
    log "the source tree ($SRC_DIR) and Go cache can be deleted to free ~2 GB; only $APISERVER is needed"
    echo "$APISERVER"
}

# ---------------------------------------------------------------- start --

free_port() {
    # Ask the kernel for a free port on 127.0.0.1 (racy by nature, but bound
    # immediately after; good enough for parallel test runs).
    python3 - <<'PY'
import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()
PY
}

port_free() {
    python3 - "$1" <<'PY'
import socket, sys
s = socket.socket()
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(1)
finally:
    s.close()
PY
}

find_etcd() {
    command -v etcd 2>/dev/null && return 0
    [[ -x /usr/bin/etcd ]] && { echo /usr/bin/etcd; return 0; }
    return 1
}

wait_port() {  # host port timeout_s
    local i
    for ((i = 0; i < $3 * 10; i++)); do
        if (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    return 1
}

# Alive = exists and is not a zombie (an exited child not yet reaped still
# answers kill -0).
pid_alive() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [[ -n "$stat" && "${stat:0:1}" != Z && "${stat:0:1}" != X ]]
}

# Is PID alive and one of the processes this script starts (guards against
# PID reuse after a reboot or a crash)?
ours() {
    [[ "$1" =~ ^[0-9]+$ ]] && pid_alive "$1" || return 1
    local cmd
    cmd=$(tr '\0' ' ' < "/proc/$1/cmdline" 2>/dev/null) || return 1
    [[ "$cmd" == *etcd* || "$cmd" == *kube-apiserver* ]]
}

fail_start() {  # message dir
    local dir=$2
    printf '[kube-apiserver.sh] ERROR: %s\n' "$1" >&2
    local f
    for f in "$dir/etcd.log" "$dir/kube-apiserver.log"; do
        [[ -f "$f" ]] || continue
        printf -- '----- tail of %s -----\n' "$f" >&2
        tail -n 30 "$f" >&2
    done
    do_stop "$dir" >/dev/null 2>&1 || true
    exit 1
}

do_start() {
    local dir=${1:-} port=${2:-}
    [[ -n "$dir" ]] || usage
    binary_ok || die "no working kube-apiserver at $APISERVER; run '$0 build' first"
    local etcd
    etcd=$(find_etcd) || die "etcd not found; install Debian's etcd-server (apt-get install -y etcd-server) or run '$0 build'"
    command -v openssl >/dev/null || die "openssl not found (apt-get install -y openssl)"

    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    if [[ -f "$dir/pids" ]]; then
        local p running=0
        while read -r p; do
            if ours "$p"; then running=1; fi
        done < "$dir/pids"
        ((running == 0)) || die "$dir/pids lists running processes; run '$0 stop $dir' first"
        rm -f "$dir/pids"
    fi
    rm -f "$dir/kubeconfig"

    if [[ -z "$port" ]]; then
        port=$(free_port)
    else
        [[ "$port" =~ ^[0-9]+$ ]] || die "PORT must be a number, got '$port'"
        port_free "$port" || die "port $port on 127.0.0.1 is already in use"
    fi
    local etcd_client etcd_peer
    etcd_client=$(free_port)
    etcd_peer=$(free_port)
    while [[ "$etcd_client" == "$port" ]]; do etcd_client=$(free_port); done
    while [[ "$etcd_peer" == "$port" || "$etcd_peer" == "$etcd_client" ]]; do etcd_peer=$(free_port); done

    # Credentials: random admin token in system:masters, service-account key pair.
    local token
    token=$(openssl rand -hex 24)
    umask 077
    printf '%s,admin,admin,system:masters\n' "$token" > "$dir/tokens.csv"
    if [[ ! -f "$dir/sa.key" || ! -f "$dir/sa.pub" ]]; then
        openssl genrsa -out "$dir/sa.key" 2048 2>/dev/null || die "openssl genrsa failed"
        openssl rsa -in "$dir/sa.key" -pubout -out "$dir/sa.pub" 2>/dev/null || die "openssl rsa -pubout failed"
    fi
    umask 022
    mkdir -p "$dir/etcd-data" "$dir/certs"
    chmod 700 "$dir/etcd-data"

    local t0=$SECONDS
    log "starting etcd (client 127.0.0.1:$etcd_client, peer 127.0.0.1:$etcd_peer, log $dir/etcd.log)"
    # setsid + nohup: the processes outlive this script and its terminal.
    setsid nohup "$etcd" \
        --name cistate \
        --data-dir "$dir/etcd-data" \
        --listen-client-urls "http://127.0.0.1:$etcd_client" \
        --advertise-client-urls "http://127.0.0.1:$etcd_client" \
        --listen-peer-urls "http://127.0.0.1:$etcd_peer" \
        --initial-advertise-peer-urls "http://127.0.0.1:$etcd_peer" \
        --initial-cluster "cistate=http://127.0.0.1:$etcd_peer" \
        --unsafe-no-fsync \
        </dev/null >"$dir/etcd.log" 2>&1 &
    local etcd_pid=$!
    echo "$etcd_pid" > "$dir/pids"
    wait_port 127.0.0.1 "$etcd_client" 20 || fail_start "etcd did not open 127.0.0.1:$etcd_client within 20 s" "$dir"
    pid_alive "$etcd_pid" || fail_start "etcd exited" "$dir"

    log "starting kube-apiserver on https://127.0.0.1:$port (log $dir/kube-apiserver.log)"
    setsid nohup "$APISERVER" \
        --etcd-servers="http://127.0.0.1:$etcd_client" \
        --bind-address=127.0.0.1 \
        --secure-port="$port" \
        --cert-dir="$dir/certs" \
        --token-auth-file="$dir/tokens.csv" \
        --authorization-mode=RBAC \
        --allow-privileged=true \
        --service-account-key-file="$dir/sa.pub" \
        --service-account-signing-key-file="$dir/sa.key" \
        --service-account-issuer=https://kubernetes.default.svc \
        --service-cluster-ip-range=10.96.0.0/16 \
        --advertise-address=127.0.0.1 \
        </dev/null >"$dir/kube-apiserver.log" 2>&1 &
    local api_pid=$!
    echo "$api_pid" >> "$dir/pids"

    local deadline=$((SECONDS + READY_TIMEOUT)) body=""
    while :; do
        pid_alive "$api_pid" || fail_start "kube-apiserver exited before becoming ready" "$dir"
        pid_alive "$etcd_pid" || fail_start "etcd exited while kube-apiserver was starting" "$dir"
        body=$(curl -ks --max-time 2 -H "Authorization: Bearer $token" \
            "https://127.0.0.1:$port/readyz" 2>/dev/null || true)
        [[ "$body" == "ok" ]] && break
        ((SECONDS < deadline)) || fail_start "kube-apiserver not ready after ${READY_TIMEOUT} s (last /readyz: ${body:-no answer})" "$dir"
        sleep 0.3
    done
    log "kube-apiserver ready in $((SECONDS - t0)) s"

    cat > "$dir/kubeconfig" <<KCFG
apiVersion: v1
kind: Config
clusters:
- name: cistate
  cluster:
    server: https://127.0.0.1:$port
    insecure-skip-tls-verify: true
users:
- name: admin
  user:
    token: $token
contexts:
- name: cistate
  context:
    cluster: cistate
    user: admin
    namespace: default
current-context: cistate
KCFG
    chmod 600 "$dir/kubeconfig"
    printf 'https://127.0.0.1:%s\n' "$port" > "$dir/server"
    echo "$dir/kubeconfig"
}

# ----------------------------------------------------------------- stop --

stop_pid() {  # TERM, wait up to 15 s, then KILL
    local p=$1 i
    ours "$p" || return 0
    kill -TERM "$p" 2>/dev/null || true
    for ((i = 0; i < 150; i++)); do
        ours "$p" || return 0
        sleep 0.1
    done
    log "pid $p did not stop within 15 s of SIGTERM; sending SIGKILL"
    kill -KILL "$p" 2>/dev/null || true
}

do_stop() {
    local dir=${1:-}
    [[ -n "$dir" ]] || usage
    if [[ ! -f "$dir/pids" ]]; then
        log "nothing to stop: no $dir/pids"
        return 0
    fi
    local p
    # Stop the apiserver (listed last) before etcd: a kube-apiserver whose
    # etcd is gone can hang in its graceful shutdown.
    for p in $(tac "$dir/pids"); do
        stop_pid "$p"
    done
    rm -f "$dir/pids"
    log "stopped ($dir)"
}

# ----------------------------------------------------------------- main --

main() {
    local cmd=${1:-}
    shift || true
    case "$cmd" in
        build) do_build ;;
        start) do_start "$@" ;;
        stop) do_stop "$@" ;;
        *) usage ;;
    esac
}

# On one line, so that editing this file while it runs cannot break a run.
main "$@"; exit $?
