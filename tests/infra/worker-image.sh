#!/usr/bin/env bash
# Build cistate's own image (the repo's Containerfile, the one compose.yaml and chart/cistate
# run) for real, with buildah, FROM a Debian bookworm base made on this machine: no public
# registry is reachable here, so `debian:bookworm-slim` is played by a minbase root filesystem
# that debootstrap makes from Debian's packages.
#
#   tests/infra/worker-image.sh base          # the base image (made once per machine); prints its name
#   tests/infra/worker-image.sh build         # buildah bud of Containerfile FROM it; prints the image name
#   tests/infra/worker-image.sh buildah ARG.. # buildah on this script's image store (from, run, rm, ...)
#
# Everything is cached outside the repo, in ${CISTATE_CACHE:-/var/cache/cistate}/worker-image/:
# bookworm-minbase.tar (the root filesystem debootstrap made) and root/ + run/ (buildah's store,
# vfs, with the build's layers: a rebuild reuses every layer before the first changed COPY).
# The Debian mirrors are the host's (its apt sources), or CISTATE_DEBIAN_MIRROR and
# CISTATE_DEBIAN_SECURITY_MIRROR; the CA bundle pip trusts in the build is the host's
# (CISTATE_BUILD_CA_BUNDLE, else PIP_CERT, else Debian's bundle). `base` needs root (debootstrap; installed when missing).
# Progress goes to stderr; the last line of stdout is the result.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/../.." && pwd)
CACHE="${CISTATE_CACHE:-/var/cache/cistate}/worker-image"
SUITE=bookworm
BASE=localhost/cistate-test/bookworm-minbase:latest
IMAGE="${CISTATE_WORKER_IMAGE:-localhost/cistate-test/worker:latest}"
HOST_CA="${CISTATE_BUILD_CA_BUNDLE:-${PIP_CERT:-/etc/ssl/certs/ca-certificates.crt}}"
# overlay where the kernel has it (layers cost what they add); vfs copies every layer whole
DRIVER="${CISTATE_WORKER_IMAGE_DRIVER:-$(grep -qw overlay /proc/filesystems && echo overlay || echo vfs)}"
STORE=(--root "$CACHE/$DRIVER/root" --runroot "$CACHE/$DRIVER/run" --storage-driver "$DRIVER")

log() { printf '[worker-image.sh] %s\n' "$*" >&2; }
die() { printf '[worker-image.sh] ERROR: %s\n' "$*" >&2; exit 1; }

b() { buildah "${STORE[@]}" "$@"; }

# The URIs of the host's first deb source whose suites are (not) *-security.
host_mirror() {
    local want_security="$1"
    cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk -v sec="$want_security" '
        function flush() {
            if (types ~ /(^| )deb( |$)/ && uris != "" && !found) {
                is_sec = (suites ~ /-security/)
                if (is_sec == sec) { print uris; found = 1 }
            }
            types = ""; uris = ""; suites = ""
        }
        /^[[:space:]]*$/ { flush(); next }
        /^Types:/ { sub(/^Types:[[:space:]]*/, ""); types = $0 }
        /^URIs:/ { sub(/^URIs:[[:space:]]*/, ""); split($0, u, " "); uris = u[1] }
        /^Suites:/ { sub(/^Suites:[[:space:]]*/, ""); suites = $0 }
        END { flush() }'
}

make_rootfs() {
    local tarball="$1" mirror security rootfs
    mirror="${CISTATE_DEBIAN_MIRROR:-$(host_mirror 0)}"
    security="${CISTATE_DEBIAN_SECURITY_MIRROR:-$(host_mirror 1)}"
    [[ -n "$mirror" ]] || die "no Debian mirror in the host's apt sources: set CISTATE_DEBIAN_MIRROR"
    [[ $(id -u) -eq 0 ]] || die "debootstrap needs root"
    if ! command -v debootstrap >/dev/null; then
        log "installing debootstrap"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y --no-install-recommends debootstrap >&2 \
            || { apt-get update >&2 && apt-get install -y --no-install-recommends debootstrap >&2; }
    fi
    rootfs=$(mktemp -d "$CACHE/rootfs.XXXXXX")
    # shellcheck disable=SC2064
    trap "rm -rf '$rootfs'" RETURN
    log "debootstrap --variant=minbase $SUITE from $mirror (a minute or two)"
    debootstrap --variant=minbase "$SUITE" "$rootfs" "$mirror" >"$CACHE/debootstrap.log" 2>&1 \
        || { tail -n 20 "$CACHE/debootstrap.log" >&2; die "debootstrap failed (log: $CACHE/debootstrap.log)"; }
    # the sources debian:bookworm-slim has: the release, its updates and its security updates
    rm -f "$rootfs/etc/apt/sources.list"
    {
        printf 'Types: deb\nURIs: %s\nSuites: %s %s-updates\nComponents: main\n' \
            "$mirror" "$SUITE" "$SUITE"
        printf 'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n'
        if [[ -n "$security" ]]; then
            printf '\nTypes: deb\nURIs: %s\nSuites: %s-security\nComponents: main\n' \
                "$security" "$SUITE"
            printf 'Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n'
        fi
    } >"$rootfs/etc/apt/sources.list.d/debian.sources"
    rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/* "$rootfs"/tmp/*
    tar --numeric-owner -C "$rootfs" -cf "$tarball.tmp" .
    mv "$tarball.tmp" "$tarball"
    log "root filesystem: $tarball ($(du -m "$tarball" | cut -f1) MB)"
}

base() {
    mkdir -p "$CACHE"
    exec 9>"$CACHE/.lock"
    flock 9
    if b inspect --type image "$BASE" >/dev/null 2>&1; then
        log "cached: $BASE"
        echo "$BASE"
        return 0
    fi
    local tarball="$CACHE/$SUITE-minbase.tar" ctr mnt
    [[ -f "$tarball" ]] || make_rootfs "$tarball"
    log "importing $tarball as $BASE"
    ctr=$(b from scratch)
    mnt=$(b mount "$ctr")
    tar --numeric-owner -C "$mnt" -xpf "$tarball"
    b umount "$ctr" >/dev/null
    b config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        --cmd bash "$ctr"
    b commit --quiet --rm "$ctr" "$BASE" >/dev/null
    log "made $BASE"
    echo "$BASE"
}

build() {
    local base_image
    base_image=$(base | tail -n1)
    exec 9>"$CACHE/.lock"
    flock 9
    log "buildah bud $ROOT/Containerfile FROM $base_image (log: $CACHE/build.log)"
    # pip in the build trusts what this machine trusts (a TLS-intercepting proxy's CA)
    local ca=(--volume "$HOST_CA:/run/build-ca.crt:ro" --build-arg BUILD_CA_BUNDLE=/run/build-ca.crt)
    [[ -r "$HOST_CA" ]] || ca=()
    if ! b bud --isolation chroot --layers --pull=never --build-arg "BASE_IMAGE=$base_image" \
            "${ca[@]}" -t "$IMAGE" -f "$ROOT/Containerfile" "$ROOT" >"$CACHE/build.log" 2>&1; then
        tail -n 40 "$CACHE/build.log" >&2
        die "buildah bud of the Containerfile failed (log: $CACHE/build.log)"
    fi
    # earlier builds' images lose their name to this one: drop them, keep the layers in use
    b rmi --prune >/dev/null 2>&1 || true
    log "built $IMAGE"
    echo "$IMAGE"
}

case "${1:-}" in
    base) base ;;
    build) build ;;
    buildah) shift; b "$@" ;;
    *) echo "usage: $0 base | build | buildah ARGS..." >&2; exit 2 ;;
esac
