#!/usr/bin/env bash
# Install, start and stop a real OCI registry (Debian's docker-registry, distribution 2.8)
# for cistate's tests, and build the busybox base image the test apps are built FROM.
#
#   tests/infra/registry.sh install                       # docker-registry, buildah, busybox-static, htpasswd
#   tests/infra/registry.sh start DIR [--htpasswd USER:PASS | --token USER:PASS]  # print 127.0.0.1:PORT
#   tests/infra/registry.sh stop DIR
#   tests/infra/registry.sh base-image REGISTRY           # push REGISTRY/library/busybox:latest
#
# `start` writes its own config in DIR (storage in DIR/data, deletes enabled, a free port on
# 127.0.0.1, plain http). With --htpasswd every request needs basic auth as USER:PASS.
# With --token the registry uses the bearer-token flow: it sends clients to a token service
# (tests/infra/token-server.py, started beside it on another port, key and certificate made
# with openssl in DIR) that grants USER:PASS every scope asked for and anonymous callers none;
# the token service logs each request (user, scopes, status) to DIR/token.log.
# Everything except the final result line goes to stderr (or DIR/registry.log), so callers
# can do: REG=$(tests/infra/registry.sh start "$dir" | tail -n1)
set -euo pipefail

READY_TIMEOUT="${CISTATE_REGISTRY_READY_TIMEOUT:-20}"
# buildah's own storage for the base image build, apart from the host's default store
BUILDAH_ROOT="${CISTATE_BUILDAH_ROOT:-/var/tmp/cistate-buildah}"

log() { printf '[registry.sh] %s\n' "$*" >&2; }
die() { printf '[registry.sh] ERROR: %s\n' "$*" >&2; exit 1; }

usage() {
    cat >&2 <<USAGE
usage: $0 install
       $0 start DIR [--htpasswd USER:PASS | --token USER:PASS]
       $0 stop DIR
       $0 base-image REGISTRY
USAGE
    exit 2
}

# -------------------------------------------------------------- install --

install() {
    local missing=()
    command -v docker-registry >/dev/null || missing+=(docker-registry)
    command -v buildah >/dev/null || missing+=(buildah)
    [[ -x /bin/busybox ]] && /bin/busybox --list 2>/dev/null | grep -qx httpd || missing+=(busybox-static)
    # a static busybox is what goes into the image: a dynamic one would need libc there too
    if [[ -x /bin/busybox ]] && ldd /bin/busybox >/dev/null 2>&1; then missing+=(busybox-static); fi
    command -v htpasswd >/dev/null || missing+=(apache2-utils)
    if ((${#missing[@]} == 0)); then
        log "all installed"
        return 0
    fi
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y --no-install-recommends "${missing[@]}" >&2; then
        log "install failed; updating package lists and trying again"
        apt-get update >&2
        apt-get install -y --no-install-recommends "${missing[@]}" >&2
    fi
    # The package enables and starts its own registry service (with htpasswd) where an init
    # system runs; the tests start their own, so stop that one if it came up.
    if command -v service >/dev/null && service docker-registry status >/dev/null 2>&1; then
        service docker-registry stop >&2 || true
    fi
}

# ---------------------------------------------------------------- start --

free_port() {
    python3 - <<'PY'
import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()
PY
}

pid_alive() { kill -0 "$1" 2>/dev/null; }

# GET /v2/ answers 200 (anonymous) or 401 (auth on) once the registry serves
registry_answers() {
    local code
    code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "http://$1/v2/" || true)
    [[ "$code" == 200 || "$code" == 401 ]]
}

start() {
    local dir="${1:-}"
    [[ -n "$dir" ]] || usage
    shift
    local htpasswd_spec="" token_spec=""
    while (($#)); do
        case "$1" in
            --htpasswd) htpasswd_spec="${2:-}"; [[ "$htpasswd_spec" == *:* ]] || die "--htpasswd wants USER:PASS"; shift 2 ;;
            --token) token_spec="${2:-}"; [[ "$token_spec" == *:* ]] || die "--token wants USER:PASS"; shift 2 ;;
            *) usage ;;
        esac
    done
    [[ -z "$htpasswd_spec" || -z "$token_spec" ]] || die "--htpasswd and --token exclude each other"
    command -v docker-registry >/dev/null || die "docker-registry is not installed; run '$0 install'"
    mkdir -p "$dir/data"
    dir=$(cd "$dir" && pwd)
    if [[ -f "$dir/pid" ]] && pid_alive "$(cat "$dir/pid")"; then
        die "a registry from $dir is still running (pid $(cat "$dir/pid")); run '$0 stop $dir' first"
    fi
    if [[ -f "$dir/token.pid" ]] && pid_alive "$(cat "$dir/token.pid")"; then
        die "a token service from $dir is still running; run '$0 stop $dir' first"
    fi

    local port auth=""
    port=$(free_port)
    if [[ -n "$htpasswd_spec" ]]; then
        command -v htpasswd >/dev/null || die "htpasswd is not installed; run '$0 install'"
        # password on stdin (-i), not argv
        printf '%s' "${htpasswd_spec#*:}" | htpasswd -niB "${htpasswd_spec%%:*}" > "$dir/htpasswd" 2>/dev/null \
            || die "htpasswd could not hash the password"
        auth="auth:
  htpasswd:
    realm: cistate-test
    path: $dir/htpasswd"
    fi
    if [[ -n "$token_spec" ]]; then
        start_token_service "$dir" "$token_spec"
        auth="auth:
  token:
    realm: http://127.0.0.1:$(cat "$dir/token.port")/token
    service: cistate-test-registry
    issuer: cistate-test-issuer
    rootcertbundle: $dir/token.crt"
    fi
    cat > "$dir/config.yml" <<CONFIG
version: 0.1
log:
  level: info
  accesslog:
    disabled: false
storage:
  filesystem:
    rootdirectory: $dir/data
  delete:
    enabled: true
http:
  addr: 127.0.0.1:$port
$auth
CONFIG

    setsid nohup docker-registry serve "$dir/config.yml" >"$dir/registry.log" 2>&1 </dev/null &
    local pid=$!
    echo "$pid" > "$dir/pid"
    local deadline=$((SECONDS + READY_TIMEOUT))
    until registry_answers "127.0.0.1:$port"; do
        if ! pid_alive "$pid"; then
            tail -n 20 "$dir/registry.log" >&2 || true
            rm -f "$dir/pid"
            stop_token_service "$dir"
            die "docker-registry exited before answering on 127.0.0.1:$port (log: $dir/registry.log)"
        fi
        if ((SECONDS >= deadline)); then
            tail -n 20 "$dir/registry.log" >&2 || true
            kill "$pid" 2>/dev/null || true
            rm -f "$dir/pid"
            stop_token_service "$dir"
            die "docker-registry did not answer GET /v2/ on 127.0.0.1:$port within ${READY_TIMEOUT}s"
        fi
        sleep 0.1
    done
    echo "127.0.0.1:$port" > "$dir/address"
    log "registry pid $pid serving 127.0.0.1:$port (data $dir/data, log $dir/registry.log)"
    echo "127.0.0.1:$port"
}

start_token_service() {
    local dir="$1" spec="$2" tport tpid deadline
    command -v openssl >/dev/null || die "openssl is not installed"
    openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj /CN=cistate-test-token \
        -keyout "$dir/token.key" -out "$dir/token.crt" >/dev/null 2>&1 \
        || die "openssl could not make the token signing key"
    (umask 077; printf '%s\n' "$spec" > "$dir/token-users")
    : > "$dir/token.log"
    tport=$(free_port)
    setsid nohup python3 "$(dirname "$0")/token-server.py" --port "$tport" \
        --key "$dir/token.key" --cert "$dir/token.crt" --users "$dir/token-users" \
        --log "$dir/token.log" >"$dir/token-server.log" 2>&1 </dev/null &
    tpid=$!
    echo "$tpid" > "$dir/token.pid"
    echo "$tport" > "$dir/token.port"
    deadline=$((SECONDS + READY_TIMEOUT))
    until curl -s -o /dev/null --max-time 1 "http://127.0.0.1:$tport/token"; do
        pid_alive "$tpid" || { tail -n 20 "$dir/token-server.log" >&2; die "the token service exited"; }
        ((SECONDS < deadline)) || { stop_token_service "$dir"; die "the token service did not answer within ${READY_TIMEOUT}s"; }
        sleep 0.05
    done
    log "token service pid $tpid on 127.0.0.1:$tport (requests logged to $dir/token.log)"
}

stop_token_service() {
    local dir="$1" tpid
    [[ -f "$dir/token.pid" ]] || return 0
    tpid=$(cat "$dir/token.pid")
    kill "$tpid" 2>/dev/null || true
    rm -f "$dir/token.pid"
}

# ----------------------------------------------------------------- stop --

stop() {
    local dir="${1:-}"
    [[ -n "$dir" ]] || usage
    stop_token_service "$dir"
    if [[ ! -f "$dir/pid" ]]; then
        log "nothing to stop: no $dir/pid"
        return 0
    fi
    local pid
    pid=$(cat "$dir/pid")
    if pid_alive "$pid"; then
        kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do
            pid_alive "$pid" || break
            sleep 0.1
        done
        if pid_alive "$pid"; then kill -9 "$pid" 2>/dev/null || true; fi
    fi
    rm -f "$dir/pid"
    log "stopped registry pid $pid"
}

# ----------------------------------------------------------- base-image --

base_image() {
    local registry="${1:-}"
    [[ -n "$registry" ]] || usage
    local ref="$registry/library/busybox:latest"
    local code
    code=$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 \
        -H 'Accept: application/vnd.oci.image.manifest.v1+json, application/vnd.docker.distribution.manifest.v2+json' \
        "http://$registry/v2/library/busybox/manifests/latest" || true)
    if [[ "$code" == 200 ]]; then
        log "$ref is already there"
        echo "$ref"
        return 0
    fi
    command -v buildah >/dev/null || die "buildah is not installed; run '$0 install'"
    [[ -x /bin/busybox ]] || die "/bin/busybox is missing; run '$0 install'"
    local ctx
    ctx=$(mktemp -d)
    trap 'rm -rf "$ctx"' RETURN
    cp /bin/busybox "$ctx/busybox"
    cat > "$ctx/Containerfile" <<'FILE'
FROM scratch
COPY busybox /bin/busybox
RUN ["/bin/busybox", "--install", "-s", "/bin"]
FILE
    local b=(buildah --root "$BUILDAH_ROOT/root" --runroot "$BUILDAH_ROOT/run" --storage-driver vfs)
    "${b[@]}" bud --isolation chroot --layers=false -t cistate-test/busybox:latest \
        -f "$ctx/Containerfile" "$ctx" >&2 || die "buildah could not build the busybox base image"
    "${b[@]}" push --tls-verify=false cistate-test/busybox:latest "docker://$ref" >&2 \
        || die "buildah could not push $ref"
    log "pushed $ref"
    echo "$ref"
}

case "${1:-}" in
    install) install ;;
    start) shift; start "$@" ;;
    stop) shift; stop "$@" ;;
    base-image) shift; base_image "$@" ;;
    *) usage ;;
esac
