"""Helm for the handlers: find the repo's chart, set its values, lint, template, package, push.

The chart is never edited in the checkout: `prepare_chart` copies it into the step's workdir
under the app's name and writes the values there, the way the Cloud-Native Toolkit's deploy
and helm-package tasks do with yq (`nameOverride`, `fullnameOverride`, `image.repository`,
`image.tag`, `vcsInfo.*`; prefixed with the first dependency's alias or name for an umbrella
chart). The helm CLI runs through `handlers.process`, with its cache, config and data homes
in the workdir so that steps never share helm state. `lint`, `template` and `package` read
the repo's chart, so they run in the step sandbox; `pull` and `push` work on cistate's own
files with the chart registry's credentials, which reach helm in a private registry-config
file, never on its command line, and never in the sandbox.

Symbolic links are the repo's too: copied as links, a link to /etc/shadow would be rendered
(and deployed, and published) as that file. `refuse_links_out` fails the step for any link that
leads out of the checkout, and the other handlers that read or write a checkout (build, gitops)
use it too; links that stay inside are kept, and `prepare_chart` points each one straight at
the file it leads to.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import yaml

from handlers import process
from handlers.base import StepFailed, StepRequest
from handlers.settings import docker_auth, private_docker_config

CHART_FILE = "Chart.yaml"


class _GoYamlDumper(yaml.SafeDumper):
    """PyYAML writes by YAML 1.1, helm and Argo CD read by YAML 1.2: a string such as
    0292003 (a short commit sha, an image tag) or 1e5 is plain text to the first and a
    number to the second. Such strings are written quoted."""


_NUMBER_LIKE = re.compile(
    r"[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)(?:[eE][-+]?[0-9]+)?"
    r"|0[xX][0-9a-fA-F_]+|0[oO][0-7_]+|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN)")


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    if _NUMBER_LIKE.fullmatch(value):
        return dumper.represent_scalar("tag:yaml.org,2002:str", value, style='"')
    return dumper.represent_str(value)


_GoYamlDumper.add_representer(str, _represent_str)


def dump_yaml(data: Any) -> str:
    """YAML for helm, Argo CD and other Go readers (keys in the order given)."""
    return yaml.dump(data, Dumper=_GoYamlDumper, sort_keys=False)


# -------------------------------------------------------------- symbolic links --

# how many offending links a failure names
_LINKS_SHOWN = 10


def links_out(root: Path, top: Path) -> list[tuple[str, str]]:
    """The symbolic links that lead out of the checkout `root`, as (the link's path in the
    checkout, where it says it points): on the way from `root` to `top`, and anywhere under
    `top`. A link leads where the system takes it: relative to its own folder, through further
    links. A link to a folder inside is followed, so what it leads to is checked too."""
    base = root.resolve()
    found: list[tuple[str, str]] = []
    step = root
    for part in top.relative_to(root).parts:
        step = step / part
        if step.is_symlink() and not _leads_inside(step, base):
            found.append((str(step.relative_to(root)), os.readlink(step)))
    if found:
        return found
    walked: list[Path] = []
    pending = [top.resolve()]
    while pending:
        folder = pending.pop()
        if not folder.is_dir() or any(folder.is_relative_to(done) for done in walked):
            continue
        walked.append(folder)
        for link in _links_under(folder):
            final = Path(os.path.realpath(link))
            if not final.is_relative_to(base):
                found.append((str(link.relative_to(base)), os.readlink(link)))
            elif final.is_dir():
                pending.append(final)
    return list(dict.fromkeys(found))  # a link to a folder above may show a link twice


def refuse_links_out(root: Path, top: Path, what: str) -> None:
    """Fail the step, naming them, when links lead out of the checkout (`links_out`)."""
    found = links_out(root, top)
    if not found:
        return
    shown = ", ".join(f"{path} (a link to {target!r})" for path, target in found[:_LINKS_SHOWN])
    more = f" and {len(found) - _LINKS_SHOWN} more" if len(found) > _LINKS_SHOWN else ""
    raise StepFailed(
        f"{what} has symbolic links that lead outside the checkout: {shown}{more}; cistate "
        "uses no file from outside the repo: commit the file itself, or a link that stays "
        "in the repo",
        retryable=False,
    )


def _leads_inside(link: Path, base: Path) -> bool:
    return Path(os.path.realpath(link)).is_relative_to(base)


def _links_under(folder: Path) -> Iterator[Path]:
    """Every symbolic link under `folder`, following none."""
    stack = [folder]
    while stack:
        with os.scandir(stack.pop()) as entries:
            for entry in entries:
                if entry.is_symlink():
                    yield Path(entry.path)
                elif entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))


def _repoint_links(original: Path, copy: Path) -> None:
    """Point each link of `copy` (a copy of `original` with its links kept) straight at the
    file its original leads to: the copy's own file when that is in the chart (a relative link
    that climbs out of the copy would land elsewhere in the workdir), else the checkout's."""
    chart = original.resolve()
    for link in list(_links_under(copy)):
        final = Path(os.path.realpath(original / link.relative_to(copy)))
        if final.is_relative_to(chart):
            points_to = os.path.relpath(copy / final.relative_to(chart), link.parent)
        else:
            points_to = str(final)
        link.unlink()
        link.symlink_to(points_to)


# ------------------------------------------------------------------- the chart --


def find_chart(source: Path, chart_dir: str) -> Path:
    """The one chart under `<source>/<chart_dir>`: that directory itself or one child of it.
    A link that leads out of the checkout `source`, on the way to the chart or in it, fails
    the step."""
    found = _one_chart(source, chart_dir)
    refuse_links_out(source, found, f"the chart {found.relative_to(source)}")
    return found


def _one_chart(source: Path, chart_dir: str) -> Path:
    root = source / chart_dir
    if (root / CHART_FILE).is_file():
        return root
    found = sorted(p.parent for p in root.glob(f"*/{CHART_FILE}")) if root.is_dir() else []
    if not found:
        raise StepFailed(
            f"the repo has no Helm chart: expected {chart_dir}/{CHART_FILE} or "
            f"{chart_dir}/<name>/{CHART_FILE}; add a chart or set `chart_dir:` in `with:`",
            retryable=False,
        )
    if len(found) > 1:
        names = ", ".join(str(p.relative_to(source)) for p in found)
        raise StepFailed(
            f"the repo has {len(found)} Helm charts under {chart_dir}/ ({names}); "
            "deploy needs exactly one: remove the others or set `chart_dir:` in `with:`",
            retryable=False,
        )
    return found[0]


def _load_yaml(path: Path, what: str) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(path.read_text(encoding="utf-8")) if path.is_file() else None
    except yaml.YAMLError as exc:
        raise StepFailed(f"{what} is not valid YAML: {exc}", retryable=False) from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise StepFailed(f"{what} is not a YAML mapping", retryable=False)
    return loaded


def values_prefix(chart: Path) -> str:
    """`<first dependency>.` for an umbrella chart (requirements.yaml or Chart.yaml
    dependencies), else empty: where the app's values live."""
    for name in ("requirements.yaml", CHART_FILE):
        deps = _load_yaml(chart / name, f"{chart.name}/{name}").get("dependencies")
        if isinstance(deps, list) and deps and isinstance(deps[0], dict):
            first = deps[0].get("alias") or deps[0].get("name")
            if first:
                return f"{first}."
    return ""


def set_dotted(values: dict[str, Any], key: str, value: Any) -> None:
    """`set_dotted(v, "image.tag", "1")` like `yq w - image.tag 1`."""
    *parents, last = key.split(".")
    node = values
    for part in parents:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[last] = value


def prepare_chart(
    chart: Path, dest: Path, *, name: str, version: str, values: Mapping[str, Any]
) -> Path:
    """Copy `chart` (from `find_chart`, which refuses links out of the checkout) to
    `<dest>/<name>` with its links kept, named `name` at `version`, with `values` set (dotted
    keys, relative to the app's values: the dependency prefix is added here)."""
    target = dest / name
    if target.exists():
        shutil.rmtree(target)
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copytree(chart, target, symlinks=True)
    _repoint_links(chart, target)
    meta = _load_yaml(target / CHART_FILE, f"{chart.name}/{CHART_FILE}")
    meta["name"] = name
    meta["version"] = version
    _replace(target / CHART_FILE, dump_yaml(meta))
    prefix = values_prefix(target)
    current = _load_yaml(target / "values.yaml", f"{chart.name}/values.yaml")
    for key, value in values.items():
        set_dotted(current, prefix + key, value)
    _replace(target / "values.yaml", dump_yaml(current))
    return target


def _replace(path: Path, text: str) -> None:
    """Write `path` as a file of its own: when it is a link, what it points at stays as it is."""
    path.unlink(missing_ok=True)
    path.write_text(text, encoding="utf-8")


# --------------------------------------------------------------------- the CLI --


class Helm:
    def __init__(self, executable: str, request: StepRequest) -> None:
        found = shutil.which(executable)
        if found is None:
            raise StepFailed(
                f"helm is not installed on this worker ({executable!r} is not an executable "
                "on PATH); install helm or set CISTATE_HELM to its path",
                retryable=False,
            )
        self.executable = found
        self.request = request
        # Two helm homes: the sandboxed runs may write theirs (plugins, repositories), so
        # the runs with credentials use one that no sandboxed process can reach.
        self.chart_env = _helm_homes(request.workdir / "helm-home")
        self.env = _helm_homes(request.sandbox.attempt / "helm-own")

    async def _run_on_chart(self, args: Sequence[str], *, what: str) -> process.Completed:
        """helm on the repo's chart (its templates and files are the repo's): sandboxed."""
        return await process.run_sandboxed(
            [self.executable, *args],
            sandbox=self.request.sandbox,
            cwd=self.request.workdir,
            log=self.request.log,
            env=self.chart_env,
            what=what,
        )

    async def _run(self, args: Sequence[str], *, what: str, retryable: bool = False,
                   check: bool = True) -> process.Completed:
        """helm on cistate's own files (a packaged chart), with cistate's credentials."""
        return await process.run(
            [self.executable, *args],
            cwd=self.request.workdir,
            log=self.request.log,
            env=self.env,
            what=what,
            check=check,
            retryable=retryable,
        )

    async def lint(self, chart: Path, shown: str) -> None:
        try:
            await self._run_on_chart(["lint", str(chart)], what=f"helm lint {shown}")
        except StepFailed as failed:
            raise failed.reworded(
                f"the chart {shown} fails `helm lint`: {_errors(failed.output_tail)}"
            ) from None

    async def template(
        self,
        release: str,
        chart: Path,
        *,
        namespace: str,
        out: Path,
        set_values: Mapping[str, str],
        shown: str,
    ) -> list[dict[str, Any]]:
        """The chart's objects, rendered by `helm template` (tests left out)."""
        await asyncio.to_thread(shutil.rmtree, out, True)
        args = ["template", release, str(chart), "--namespace", namespace, "--skip-tests"]
        args += ["--output-dir", str(out)]
        for key, value in set_values.items():
            args += ["--set-string", f"{key}={value}"]
        try:
            await self._run_on_chart(args, what=f"helm template {shown}")
        except StepFailed as failed:
            raise failed.reworded(
                f"`helm template` of the chart {shown} failed: {_errors(failed.output_tail)}"
            ) from None
        return await asyncio.to_thread(_load_rendered, out, shown)

    async def package(self, chart: Path, *, version: str, app_version: str, dest: Path) -> Path:
        await asyncio.to_thread(dest.mkdir, parents=True, exist_ok=True)
        await self._run_on_chart(
            [
                "package",
                str(chart),
                "--version",
                version,
                "--app-version",
                app_version,
                "--destination",
                str(dest),
            ],
            what=f"helm package {chart.name}",
        )
        tgz = dest / f"{chart.name}-{version}.tgz"
        if not tgz.is_file():
            raise StepFailed(f"helm package did not write {tgz.name}", retryable=False)
        return tgz

    async def pull(
        self,
        ref: str,
        *,
        version: str,
        plain_http: bool,
        dest: Path,
        auths: Mapping[str, tuple[str, str]],
    ) -> Path | None:
        """`helm pull` an OCI chart into `dest`; None when the registry does not have it."""
        await asyncio.to_thread(dest.mkdir, parents=True, exist_ok=True)
        args = ["pull", ref, "--version", version, "--destination", str(dest)]
        if plain_http:
            args.append("--plain-http")
        with _registry_config(auths) as config:
            if config is not None:
                args += ["--registry-config", str(config)]
            done = await self._run(args, what=f"helm pull {ref}", check=False)
        if done.exit_code == 0:
            found = await asyncio.to_thread(lambda: sorted(dest.glob("*.tgz")))
            return found[0] if found else None
        if "not found" in done.tail.lower():
            return None
        raise StepFailed(
            f"cannot read {ref} version {version} from the chart registry: "
            f"{_errors(done.tail)}",
            exit_code=done.exit_code,
            output_tail=done.tail,
            retryable=True,
        )

    async def push(
        self, tgz: Path, repo: str, *, plain_http: bool, auths: Mapping[str, tuple[str, str]]
    ) -> str:
        """`helm push` to `oci://...`; the digest helm reports (empty if it reports none)."""
        with _registry_config(auths) as config:
            args = ["push", str(tgz), repo]
            if plain_http:
                args.append("--plain-http")
            if config is not None:
                args += ["--registry-config", str(config)]
            done = await self._run(args, what=f"helm push to {repo}", retryable=True)
        for line in done.tail.splitlines():
            if line.startswith("Digest:"):
                return line.split(":", 1)[1].strip()
        return ""


def _helm_homes(home: Path) -> dict[str, str]:
    return {
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
    }


def _errors(tail: str) -> str:
    """The lines of helm's output that say what is wrong."""
    lines = [
        line.strip()
        for line in tail.splitlines()
        if "[ERROR]" in line or line.startswith("Error") or "error" in line.lower()
    ]
    return "; ".join(lines[-5:]) or "see the output tail"


def _load_rendered(out: Path, shown: str) -> list[dict[str, Any]]:
    objects: list[dict[str, Any]] = []
    for path in sorted(out.rglob("*.yaml")):
        try:
            docs = list(yaml.safe_load_all(path.read_text(encoding="utf-8")))
        except yaml.YAMLError as exc:
            raise StepFailed(
                f"the chart {shown} renders {path.relative_to(out)} as invalid YAML: {exc}",
                retryable=False,
            ) from None
        for doc in docs:
            if doc is None:
                continue
            if not isinstance(doc, dict) or not doc.get("kind") or not doc.get("apiVersion"):
                raise StepFailed(
                    f"the chart {shown} renders an object without kind/apiVersion in "
                    f"{path.relative_to(out)}",
                    retryable=False,
                )
            objects.append(doc)
    return objects


def _registry_config(auths: Mapping[str, tuple[str, str]]
                     ) -> AbstractContextManager[Path | None]:
    return private_docker_config({host: docker_auth(user, password)
                                  for host, (user, password) in auths.items()})
