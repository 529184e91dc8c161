"""How long cistate's own image (the Containerfile) takes to build for real, from nothing and
cached: tests/infra/worker-image.sh's `base` (debootstrap of a Debian bookworm minbase, made
into a buildah image) and `build` (`buildah bud` of the Containerfile FROM it), then the
same build again with nothing changed, and once more after a change to cistate's sources
(the apt and helm layers are reused; the sources' COPY and pip install run again).

The build inputs are copied to a scratch folder, so the source change never touches the
work tree. By default everything starts from an empty cache of its own (removed afterwards);
`--cache DIR` uses (and keeps) another, e.g. the machine's /var/cache/cistate to time what a
test run there sees. Needs root, buildah, and Debian's and PyPI's package servers.

    .venv/bin/python bench/worker_image.py [--cache DIR] [--keep]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INPUTS = ["Containerfile", "pyproject.toml", "README.md", "cistate", "handlers", "schema",
          "tests/infra/helm.sh", "tests/infra/worker-image.sh"]


def copy_inputs(context: Path) -> None:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in INPUTS:
        source, target = ROOT / name, context / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=ignore)
        else:
            shutil.copy2(source, target)


def timed(context: Path, cache: Path, *args: str) -> tuple[float, str]:
    """Seconds taken by worker-image.sh `args` (from the copied context) and its result."""
    env = {**os.environ, "CISTATE_CACHE": str(cache)}
    started = time.monotonic()
    done = subprocess.run(["bash", str(context / "tests/infra/worker-image.sh"), *args],
                          env=env, capture_output=True, text=True, timeout=3600)
    took = time.monotonic() - started
    if done.returncode != 0:
        sys.exit(f"worker-image.sh {' '.join(args)} failed:\n{done.stderr[-4000:]}")
    lines = done.stdout.strip().splitlines()
    return took, lines[-1] if lines else ""


def image_size(context: Path, cache: Path, image: str) -> str:
    env = {**os.environ, "CISTATE_CACHE": str(cache)}
    done = subprocess.run(["bash", str(context / "tests/infra/worker-image.sh"), "buildah",
                           "images", "--format", "{{.Size}}", image],
                          env=env, capture_output=True, text=True, timeout=120)
    return done.stdout.strip() or "?"


def remove_cache(context: Path, cache: Path) -> None:
    """The scratch cache's images, then anything still mounted below it, then the folder."""
    env = {**os.environ, "CISTATE_CACHE": str(cache)}
    script = str(context / "tests/infra/worker-image.sh")
    for args in (["rm", "-a"], ["rmi", "-a", "-f"]):
        subprocess.run(["bash", script, "buildah", *args], env=env, capture_output=True,
                       timeout=600)
    mounts = [line.split()[1] for line in Path("/proc/mounts").read_text().splitlines()]
    for mount in sorted((m for m in mounts if m.startswith(str(cache))), reverse=True):
        subprocess.run(["umount", mount], capture_output=True, timeout=60)
    shutil.rmtree(cache, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, help="use (and keep) this cache folder")
    parser.add_argument("--keep", action="store_true", help="keep the scratch cache")
    options = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="cistate-worker-image-", dir="/var/tmp"))
    context = scratch / "context"
    cache = options.cache or scratch / "cache"
    copy_inputs(context)
    figures: list[tuple[str, float]] = []
    try:
        took, _ = timed(context, cache, "base")
        figures.append(("base image (debootstrap + import; cached: a lookup)", took))
        took, image = timed(context, cache, "build")
        figures.append(("build (apt, helm, pip install of cistate)", took))
        took, _ = timed(context, cache, "build")
        figures.append(("build again, nothing changed", took))
        with (context / "handlers" / "__init__.py").open("a", encoding="utf-8") as module:
            module.write("# a change to the sources\n")
        took, _ = timed(context, cache, "build")
        figures.append(("build after a change to handlers/", took))
        size = image_size(context, cache, image)
    finally:
        if options.cache is None and not options.keep:
            remove_cache(context, cache)
        shutil.rmtree(context, ignore_errors=True)
        if options.cache is not None or not options.keep:
            shutil.rmtree(scratch, ignore_errors=True)

    print(f"worker image: {image}, {size}; cache {cache}"
          f"{' (fresh, removed)' if options.cache is None and not options.keep else ''}")
    for what, seconds in figures:
        print(f"  {what:<55} {seconds:7.1f} s")
    print(f"  {'from nothing to the image (base + build)':<55} "
          f"{figures[0][1] + figures[1][1]:7.1f} s")


if __name__ == "__main__":
    main()
