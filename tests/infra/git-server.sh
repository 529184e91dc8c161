#!/usr/bin/env bash
# Start and stop a real git server (git daemon, git:// protocol, push enabled) for tests.
#
#   tests/infra/git-server.sh start DIR    # serve the bare repos under DIR/repos; print git://127.0.0.1:PORT
#   tests/infra/git-server.sh stop DIR
#
# A repo at DIR/repos/NAME.git is then git://127.0.0.1:PORT/NAME.git. Everything except the
# final result line goes to stderr (or DIR/git-daemon.log).
set -euo pipefail

READY_TIMEOUT="${CISTATE_GIT_READY_TIMEOUT:-10}"

log() { printf '[git-server.sh] %s\n' "$*" >&2; }
die() { printf '[git-server.sh] ERROR: %s\n' "$*" >&2; exit 1; }
usage() { printf 'usage: %s start DIR | stop DIR\n' "$0" >&2; exit 2; }

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

pid_alive() { kill -0 "$1" 2>/dev/null; }

port_open() {
    python3 -c 'import socket,sys; socket.create_connection(("127.0.0.1",int(sys.argv[1])),1).close()' "$1" 2>/dev/null
}

start() {
    local dir="${1:-}"
    [[ -n "$dir" ]] || usage
    command -v git >/dev/null || die "git is not installed"
    mkdir -p "$dir/repos"
    dir=$(cd "$dir" && pwd)
    if [[ -f "$dir/git-daemon.pid" ]] && pid_alive "$(cat "$dir/git-daemon.pid")"; then
        die "a git daemon from $dir is still running; run '$0 stop $dir' first"
    fi
    local port pid deadline
    port=$(free_port)
    setsid nohup git daemon --listen=127.0.0.1 --port="$port" --reuseaddr \
        --base-path="$dir/repos" --export-all --enable=receive-pack --informative-errors \
        "$dir/repos" >"$dir/git-daemon.log" 2>&1 </dev/null &
    pid=$!
    echo "$pid" > "$dir/git-daemon.pid"
    deadline=$((SECONDS + READY_TIMEOUT))
    until port_open "$port"; do
        pid_alive "$pid" || { tail -n 20 "$dir/git-daemon.log" >&2; rm -f "$dir/git-daemon.pid"; die "git daemon exited"; }
        ((SECONDS < deadline)) || { kill "$pid"; rm -f "$dir/git-daemon.pid"; die "git daemon did not listen on 127.0.0.1:$port within ${READY_TIMEOUT}s"; }
        sleep 0.05
    done
    log "git daemon pid $pid serving $dir/repos on 127.0.0.1:$port"
    echo "git://127.0.0.1:$port"
}

stop() {
    local dir="${1:-}"
    [[ -n "$dir" ]] || usage
    [[ -f "$dir/git-daemon.pid" ]] || { log "nothing to stop: no $dir/git-daemon.pid"; return 0; }
    local pid
    pid=$(cat "$dir/git-daemon.pid")
    if pid_alive "$pid"; then
        # git daemon forks a child per connection into its process group
        kill -- "-$pid" 2>/dev/null || kill "$pid" 2>/dev/null || true
        for _ in $(seq 1 50); do pid_alive "$pid" || break; sleep 0.1; done
        if pid_alive "$pid"; then kill -9 "$pid" 2>/dev/null || true; fi
    fi
    rm -f "$dir/git-daemon.pid"
    log "stopped git daemon pid $pid"
}

case "${1:-}" in
    start) shift; start "$@" ;;
    stop) shift; stop "$@" ;;
    *) usage ;;
esac
