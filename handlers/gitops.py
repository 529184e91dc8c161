"""`uses: gitops`: point the QA environment of the GitOps repo at the released chart.

Like the Cloud-Native Toolkit's `gitops` task: clone the GitOps repo (`gitops_repo`, branch
`gitops_branch`, default `qa`); in `<gitops_dir>/<app>/` (default `qa/<app>/`) set the
dependency named after the chart in `requirements.yaml` (`gitops_yaml`) to the new version
and repository, adding it when absent; when the file does not exist, create the Toolkit's
umbrella chart there (`Chart.yaml`, `requirements.yaml`, `values.yaml`). Commit
`Updates <app> to <version>` and push. A push rejected because the branch moved (another run
or a person pushed first) is retried from the branch as it is then, up to `gitops_attempts`
times. When the files already say so, nothing is committed: "no changes" is success.
A symbolic link of the GitOps repo on the way to those files, or among them, that leads out of
its clone fails the step (it would aim the write at the worker's files); one that stays inside
is written through, and the file it leads to is committed.

Inputs: setup's `app_name`; helm-release's `chart_name`, `chart_version`, `chart_repo`.
The GitOps repo URL comes from the worker's environment (CISTATE_GITOPS_REPO) or `with:`;
credentials in it never reach a log or an argv (the URL is written to the clone's config).

Outputs:
- `commit`: the GitOps branch's commit that has the change (the new one, or the existing head)
- `changed`: whether this step made that commit
- skipped (helm-release released nothing): `commit` null, `changed` false, `skipped_reason`

QA never moves backwards: when the app folder already holds a newer version of the chart
(an older run's gitops step after a newer one's), the step ends `skipped`, naming both
versions, and the run does not fail.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import git as gitpython
import yaml

from handlers import git
from handlers.base import StepFailed, StepRequest, StepSkipped
from handlers.cd_settings import DeliverySettings, for_request
from handlers.helm import dump_yaml, refuse_links_out

CLONE_DIR = "gitops"


def held_version(directory: Path, chart: str, yaml_name: str) -> str | None:
    """The version of `chart` the app folder's requirements hold now, if any."""
    try:
        data = yaml.safe_load((directory / yaml_name).read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError):
        return None
    deps = data.get("dependencies") if isinstance(data, dict) else None
    for dep in deps if isinstance(deps, list) else []:
        if isinstance(dep, dict) and dep.get("name") == chart and dep.get("version"):
            return str(dep["version"])
    return None


def moves_backwards(held: str | None, version: str) -> bool:
    """Would writing `version` replace a newer one? Only versions that are both X.Y.Z are
    compared (what helm-release releases); anything else is written as before."""
    if held is None:
        return False
    old, new = git.parse_version(held), git.parse_version(version)
    return old is not None and new is not None and new < old


def update_app_dir(
    directory: Path, *, app: str, chart: str, version: str, repository: str, yaml_name: str
) -> None:
    """Set `chart` to `version` from `repository` in `<directory>/<yaml_name>`, or create the
    umbrella chart. Files whose content would not change are not rewritten."""
    requirements = directory / yaml_name
    if requirements.is_file():
        try:
            data = yaml.safe_load(requirements.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise StepFailed(
                f"{requirements.name} of {directory.name} in the GitOps repo is not valid "
                f"YAML: {exc}",
                retryable=False,
            ) from None
        if not isinstance(data, dict):
            raise StepFailed(f"{requirements} in the GitOps repo is not a mapping", retryable=False)
        before = dump_yaml(data)
        deps = data.setdefault("dependencies", [])
        if not isinstance(deps, list):
            raise StepFailed(
                f"`dependencies` in {requirements.name} of {directory.name} is not a list",
                retryable=False,
            )
        matched = [d for d in deps if isinstance(d, dict) and d.get("name") == chart]
        for dep in matched:
            dep["version"] = version
            dep["repository"] = repository
        if not matched:
            deps.append({"name": chart, "version": version, "repository": repository})
        after = dump_yaml(data)
        if after != before:
            requirements.write_text(after, encoding="utf-8")
        return
    directory.mkdir(parents=True, exist_ok=True)
    files = {
        "Chart.yaml": {
            "apiVersion": "v2",
            "version": "0.1.0",
            "name": app,
            "description": f"Chart to configure ArgoCD with the {app} project and its applications",
        },
        yaml_name: {
            "dependencies": [{"name": chart, "version": version, "repository": repository}]
        },
        "values.yaml": {"global": {}, chart: {"replicaCount": 1}},
    }
    for name, content in files.items():
        path = directory / name
        if not path.exists():
            path.write_text(dump_yaml(content), encoding="utf-8")


async def run(request: StepRequest) -> dict[str, Any]:
    settings = for_request(request)
    released = request.outputs_from("helm-release")
    if "chart_version" in released and not released.get("chart_version"):
        reason = released.get("skipped_reason") or "helm-release released no chart"
        request.log.line(f"not updating the GitOps repo: {reason}")
        return {"commit": None, "changed": False, "skipped_reason": reason}
    app = str(request.output_of("setup", "app_name"))
    chart = str(released.get("chart_name") or app)
    version = str(request.output_of("helm-release", "chart_version"))
    repository = str(request.output_of("helm-release", "chart_repo"))
    if not settings.gitops_repo:
        raise StepFailed(
            "no GitOps repo is configured: set CISTATE_GITOPS_REPO on the worker or "
            "`gitops_repo:` in the step's `with:`",
            retryable=False,
        )
    git.validate_repo_url(settings.gitops_repo)
    git.validate_ref(settings.gitops_branch)
    return await _publish(request, settings, app, chart, version, repository)


async def _publish(
    request: StepRequest,
    settings: DeliverySettings,
    app: str,
    chart: str,
    version: str,
    repository: str,
) -> dict[str, Any]:
    branch = settings.gitops_branch
    where = f"GitOps repo {git.redact(settings.gitops_repo)}"
    path = request.workdir / CLONE_DIR
    await asyncio.to_thread(git.init_repo, path, settings.gitops_repo)
    subdir = Path(settings.gitops_dir) / app
    message = f"Updates {app} to {version}"
    for attempt in range(1, settings.gitops_attempts + 1):
        await _fetch(request, path, branch, where)
        await git.run_git(request, path, "checkout", "-q", "-B", branch, f"origin/{branch}")
        await git.run_git(request, path, "clean", "-q", "-fdx")
        staged = await asyncio.to_thread(_write_targets, path, subdir, settings.gitops_yaml,
                                         where)
        held = await asyncio.to_thread(held_version, path / subdir, chart, settings.gitops_yaml)
        if moves_backwards(held, version):
            # a newer run released first (runs of one branch race): QA keeps the newer one
            head = await git.head_sha(path)
            raise StepSkipped(
                f"{where} {branch} already holds {chart} {held}, newer than {version}: "
                "QA is not moved backwards",
                outputs={"commit": head, "changed": False, "held_version": held,
                         "version": version})
        await asyncio.to_thread(
            update_app_dir,
            path / subdir,
            app=app,
            chart=chart,
            version=version,
            repository=repository,
            yaml_name=settings.gitops_yaml,
        )
        await git.run_git(request, path, "add", "-A", "--", *staged)
        if not await asyncio.to_thread(_staged, path):
            head = await git.head_sha(path)
            request.log.line(f"no changes: {where} {branch} already has {chart} {version}")
            return {"commit": head, "changed": False}
        await git.run_git(
            request,
            path,
            "-c",
            f"user.name={settings.git_user_name}",
            "-c",
            f"user.email={settings.git_user_email}",
            "commit",
            "-q",
            "-m",
            message,
        )
        head = await git.head_sha(path)
        done = await git.run_git(
            request, path, "push", "--porcelain", "origin", f"HEAD:refs/heads/{branch}", check=False
        )
        if done.exit_code == 0:
            request.log.line(f"pushed {head} ({message}) to {where} {branch}")
            return {"commit": head, "changed": True}
        if "[rejected]" not in done.tail and "[remote rejected]" not in done.tail:
            raise StepFailed(
                f"cannot push to {where} (git exited with code {done.exit_code}); check the "
                "URL and that the worker may push there",
                exit_code=done.exit_code,
                output_tail=done.tail,
                retryable=True,
            )
        request.log.line(
            f"{where} {branch} moved while we committed (push rejected, attempt {attempt} of "
            f"{settings.gitops_attempts}); pulling and applying the change again"
        )
    raise StepFailed(
        f"could not push {message!r} to {where} {branch}: it moved under us "
        f"{settings.gitops_attempts} times in a row",
        retryable=True,
    )


def _write_targets(clone: Path, subdir: Path, yaml_name: str, where: str) -> list[str]:
    """What to stage after `update_app_dir` writes `<clone>/<subdir>`: the folder and the files
    its links (if any) lead to, as paths without links (git stages no path through one). A link
    on the way there, or in the folder, that leads out of the clone fails the step: it would
    aim the write at the worker's own files."""
    refuse_links_out(clone, clone / subdir, where)
    base = clone.resolve()
    folder = clone / subdir
    paths = [folder, *(folder / name for name in ("Chart.yaml", yaml_name, "values.yaml"))]
    return sorted({str(Path(os.path.realpath(p)).relative_to(base)) for p in paths
                   if p == folder or p.is_symlink()})


def _staged(path: Path) -> bool:
    with gitpython.Repo(path) as repo:  # closed: its git processes end with it
        return bool(repo.index.diff("HEAD"))


async def _fetch(request: StepRequest, path: Path, branch: str, where: str) -> None:
    refspec = f"+refs/heads/{branch}:refs/remotes/origin/{branch}"
    done = await git.run_git(request, path, "fetch", "--no-tags", "origin", refspec, check=False)
    if done.exit_code == 0:
        return
    if "couldn't find remote ref" in done.tail.lower():
        raise StepFailed(
            f"{where} has no branch {branch!r}; create it or set CISTATE_GITOPS_BRANCH",
            exit_code=done.exit_code,
            output_tail=done.tail,
            retryable=False,
        )
    raise StepFailed(
        f"cannot fetch {branch} from {where} (git exited with code {done.exit_code}); check "
        "that it is up and the worker may read it",
        exit_code=done.exit_code,
        output_tail=done.tail,
        retryable=True,
    )
