#!/usr/bin/env bash
# Prepare this machine for cistate's step sandbox (see README "Trust model"):
# - bubblewrap (bwrap), which runs every step process of the pushed repo in namespaces of its own;
# - uidmap (newuidmap/newgidmap) and a range of subordinate ids for the worker's user in
#   /etc/subuid and /etc/subgid, onto which the image builder's user namespace is mapped.
# Safe to run twice. Nothing is done with CISTATE_SANDBOX=none.
set -euo pipefail

log() { printf 'sandbox: %s\n' "$*" >&2; }

if [[ "${CISTATE_SANDBOX:-bwrap}" == none ]]; then
    log "CISTATE_SANDBOX=none: nothing to prepare (steps will run unsandboxed)"
    exit 0
fi

missing=()
command -v bwrap >/dev/null || missing+=(bubblewrap)
command -v newuidmap >/dev/null || missing+=(uidmap)
command -v setpriv >/dev/null || missing+=(util-linux)
if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
        log "missing ${missing[*]}: install them (as root: apt-get install ${missing[*]})"
        exit 1
    fi
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    if ! apt-get install -y --no-install-recommends "${missing[@]}" >&2; then
        apt-get update >&2
        apt-get install -y --no-install-recommends "${missing[@]}" >&2
    fi
fi

user=$(id -un)
for file in /etc/subuid /etc/subgid; do
    if ! grep -qE "^(${user}|$(id -u)):[0-9]+:[0-9]+$" "$file" 2>/dev/null; then
        if [[ $(id -u) -ne 0 ]]; then
            log "$file has no range for $user: ask root to add '${user}:100000:65536'"
            exit 1
        fi
        log "adding ${user}:100000:65536 to $file (the image builder's user namespace)"
        echo "${user}:100000:65536" >>"$file"
    fi
done

# The sandbox must really start here: a kernel without namespaces fails now, not at a step.
if ! env -i PATH=/usr/bin:/bin bwrap --ro-bind / / --dev /dev --proc /proc --unshare-pid \
        --unshare-ipc --unshare-uts --die-with-parent -- setpriv --reuid=65534 --regid=65534 \
        --clear-groups -- true 2>/tmp/cistate-sandbox-check.$$; then
    log "bubblewrap cannot start a sandbox on this machine: $(cat /tmp/cistate-sandbox-check.$$)"
    rm -f /tmp/cistate-sandbox-check.$$
    exit 1
fi
rm -f /tmp/cistate-sandbox-check.$$
log "bubblewrap $(bwrap --version | awk '{print $2}') ready"
