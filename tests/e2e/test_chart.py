"""cistate's own Helm chart (chart/cistate) on real helm, a real kube-apiserver, and the real
service: it lints, the apiserver accepts every object it renders, it carries no secret, and
the command lines it renders, run as processes, serve and complete a run.

Stand-in (named): no kubelet runs here, so the rendered containers are not started as pods;
their command, arguments and environment are run as local processes instead (with the
Secret's values and a local port), which is what the kubelet would execute in the image.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

import handlers
from cistate.adapters.postgres.store import Store
from cistate.domain.pipeline import parse
from tests.conftest import free_port, wait_until
from tests.e2e.conftest import Kube

pytestmark = pytest.mark.e2e

CHART = Path(__file__).resolve().parents[2] / "chart" / "cistate"
PIPELINE = """\
name: chart-check
steps:
  - {name: fetch, uses: noop}
  - name: check
    uses: script
    run: "test -n \\"$HOME\\""
"""


def render(helm: Path, values: dict[str, Any] | None = None,
           folder: Path | None = None) -> list[dict[str, Any]]:
    """`helm template` of the chart, with these values (as a values file, like a user's)."""
    args: list[str] = []
    if values:
        assert folder is not None
        file = folder / "values.yaml"
        file.write_text(yaml.safe_dump(values))
        args = ["-f", str(file)]
    done = subprocess.run([str(helm), "template", "rel", str(CHART), *args],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return [doc for doc in yaml.safe_load_all(done.stdout) if doc]


def by_kind(objects: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    kinds: dict[str, list[dict[str, Any]]] = {}
    for obj in objects:
        kinds.setdefault(obj["kind"], []).append(obj)
    return kinds


def test_the_chart_lints_and_holds_no_secret(helm_bin: Path) -> None:
    lint = subprocess.run([str(helm_bin), "lint", "--strict", str(CHART)],
                          capture_output=True, text=True, timeout=60)
    assert lint.returncode == 0, lint.stdout + lint.stderr
    objects = render(helm_bin)
    kinds = by_kind(objects)
    assert sorted((k, len(v)) for k, v in kinds.items()) == [
        ("Deployment", 3), ("Job", 1), ("Service", 1)]
    assert "Secret" not in kinds
    text = json.dumps(objects)
    assert "postgresql://" not in text and "amqp://" not in text
    for deployment in kinds["Deployment"]:
        role = deployment["metadata"]["labels"]["app.kubernetes.io/component"]
        env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in env if "valueFrom" in e}
        assert set(refs) == {"CISTATE_DATABASE_URL", "CISTATE_RABBITMQ_URL",
                             "CISTATE_RABBITMQ_URL_OF_ROLE", "CISTATE_BUS_KEY",
                             "CISTATE_API_TOKEN", "CISTATE_WEBHOOK_SECRET"}
        assert refs["CISTATE_BUS_KEY"].get("optional") is not True, (
            "pods of different roles must share one bus key: none may make its own")
        assert refs["CISTATE_API_TOKEN"].get("optional") is True
        # each role its own broker user, else the shared URL
        assert refs["CISTATE_RABBITMQ_URL_OF_ROLE"] == {
            "name": "cistate", "key": f"rabbitmq-url-{role}", "optional": True}, role
        assert refs["CISTATE_RABBITMQ_URL"] == {
            "name": "cistate", "key": "rabbitmq-url", "optional": True}, role
    # the migration needs no broker
    job_env = kinds["Job"][0]["spec"]["template"]["spec"]["containers"][0]["env"]
    assert not {e["name"] for e in job_env} & {"CISTATE_RABBITMQ_URL",
                                                "CISTATE_RABBITMQ_URL_OF_ROLE"}
    for deployment in kinds["Deployment"]:
        role = deployment["metadata"]["labels"]["app.kubernetes.io/component"]
        pod = deployment["spec"]["template"]["spec"]
        container = pod["containers"][0]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["CISTATE_API_READ_AUTH"] == "true", "reads stay closed in the chart"
        if role == "worker":  # the sandbox needs root and namespaces
            assert pod["securityContext"]["runAsUser"] == 0
            assert container["securityContext"]["privileged"] is True
            assert env["CISTATE_SANDBOX"] == "bwrap"
        else:
            assert pod["securityContext"]["runAsUser"] == 10001
            assert container["securityContext"]["allowPrivilegeEscalation"] is False
    service = kinds["Service"][0]
    assert service["spec"]["selector"]["app.kubernetes.io/component"] == "api"


@pytest.fixture
def kubectl(helm_bin: Path, kube: Kube) -> Iterator[list[str]]:
    binary = helm_bin.parent / "kubectl"
    assert binary.exists(), f"tests/infra/helm.sh should have installed {binary}"
    yield [str(binary), "--kubeconfig", str(kube.kubeconfig)]


def test_the_apiserver_accepts_every_object_the_chart_renders(
        helm_bin: Path, kubectl: list[str], tmp_path: Path) -> None:
    namespace = f"cistate-{uuid.uuid4().hex[:8]}"
    subprocess.run([*kubectl, "create", "namespace", namespace], check=True,
                   capture_output=True, timeout=60)
    objects = render(helm_bin, {
        "pipeline": PIPELINE, "worker": {"steps": ["fetch", "check"]},
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}}}, tmp_path)
    assert "ConfigMap" in by_kind(objects)
    manifest = "\n---\n".join(yaml.safe_dump(obj) for obj in objects)
    applied = subprocess.run(
        [*kubectl, "apply", "--server-side", "--field-manager=cistate-test", "-n", namespace,
         "-f", "-"], input=manifest, capture_output=True, text=True, timeout=120)
    assert applied.returncode == 0, applied.stderr
    for obj in objects:
        got = subprocess.run([*kubectl, "get", "-n", namespace, obj["kind"].lower(),
                              obj["metadata"]["name"], "-o", "json"],
                             capture_output=True, text=True, timeout=60)
        assert got.returncode == 0, got.stderr
        stored = json.loads(got.stdout)
        assert stored["metadata"]["labels"]["app.kubernetes.io/name"] == "cistate"


def local_command(container: dict[str, Any], secret: dict[str, str], files: dict[str, Path],
                  port: int, workdir: Path) -> tuple[list[str], dict[str, str]]:
    """What the kubelet would run for this container, as a local process: the Secret's
    values in place of its references, a local port and folders in place of the pod's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CISTATE_")}
    for item in container.get("env", []):
        if "valueFrom" in item:
            ref = item["valueFrom"]["secretKeyRef"]
            if ref["key"] in secret:
                env[item["name"]] = secret[ref["key"]]
            else:
                assert ref.get("optional"), f"{item['name']}: a required key is missing"
            continue
        env[item["name"]] = str(item["value"])
    env["CISTATE_LISTEN"] = f"127.0.0.1:{port}"
    assert env.get("CISTATE_WORKDIR") == "/work"
    env["CISTATE_WORKDIR"] = str(workdir)
    if "CISTATE_PIPELINE" in env:
        env["CISTATE_PIPELINE"] = str(files[env["CISTATE_PIPELINE"]])
    # the image's `cistate` is this environment's
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return [*map(str, container["command"]), *map(str, container.get("args", []))], env


# The Secret of each run: every role's URL from the shared key, or from the role's own key
# with the shared one unusable (a pod that fell back to it could not connect).
SECRETS = {
    "shared-url": lambda amqp: {"rabbitmq-url": amqp},
    "url-per-role": lambda amqp: {
        "rabbitmq-url": "amqp://nobody:wrong@127.0.0.1:1/",
        **{f"rabbitmq-url-{role}": amqp for role in ("api", "orchestrator", "worker")}},
}


def test_a_pod_without_any_broker_url_says_which_keys_are_missing(
        helm_bin: Path, tmp_path: Path) -> None:
    worker = next(d for d in by_kind(render(helm_bin))["Deployment"]
                  if d["metadata"]["labels"]["app.kubernetes.io/component"] == "worker")
    container = worker["spec"]["template"]["spec"]["containers"][0]
    argv, env = local_command(container, {"database-url": "postgresql://x@127.0.0.1:1/x",
                                          "bus-key": "k" * 32}, {}, free_port(), tmp_path)
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "the Secret cistate has neither rabbitmq-url-worker nor rabbitmq-url" in done.stderr


@pytest.mark.parametrize("urls", sorted(SECRETS))
async def test_the_rendered_command_lines_serve_and_complete_a_run(
        helm_bin: Path, database_url: str, amqp_url: str, bus_prefix: str, store: Store,
        tmp_path: Path, urls: str) -> None:
    objects = render(helm_bin, {"pipeline": PIPELINE, "busPrefix": bus_prefix}, tmp_path)
    kinds = by_kind(objects)
    configmap = kinds["ConfigMap"][0]
    pipeline_file = tmp_path / "pipeline.yaml"
    pipeline_file.write_text(configmap["data"]["pipeline.yaml"])
    parse(pipeline_file.read_text(), str(pipeline_file), handlers.names())  # a valid pipeline
    files = {"/etc/cistate/pipeline.yaml": pipeline_file}
    # each role's pod has a workdir of its own: the shared key comes from the Secret
    secret = {"database-url": database_url, **SECRETS[urls](amqp_url),
              "bus-key": uuid.uuid4().hex + uuid.uuid4().hex,
              "api-token": "prometheus:scrape-token-1:read"}  # reads are closed

    # the migration hook first, as helm runs it before installing
    job = kinds["Job"][0]["spec"]["template"]["spec"]["containers"][0]
    argv, env = local_command(job, secret, files, free_port(), tmp_path / "work-migrate")
    migrate = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert migrate.returncode == 0, migrate.stderr

    processes: list[tuple[str, subprocess.Popen[bytes], int]] = []
    try:
        for deployment in kinds["Deployment"]:
            role = deployment["metadata"]["labels"]["app.kubernetes.io/component"]
            container = deployment["spec"]["template"]["spec"]["containers"][0]
            port = free_port()
            argv, env = local_command(container, secret, files, port, tmp_path / f"work-{role}")
            log = (tmp_path / f"{role}.log").open("wb")
            processes.append((role, subprocess.Popen(argv, env=env, stdout=log,
                                                     stderr=subprocess.STDOUT), port))
        async with aiohttp.ClientSession() as http:
            for role, proc, port in processes:
                probe = deployment_probe(kinds, role)
                assert probe == {"path": "/health", "port": "http"}

                async def ready(proc: subprocess.Popen[bytes] = proc, port: int = port) -> bool:
                    assert proc.poll() is None, f"exited {proc.returncode}"
                    with contextlib.suppress(aiohttp.ClientError):
                        async with http.get(f"http://127.0.0.1:{port}/health") as resp:
                            return resp.status == 200
                    return False

                await wait_until(ready, timeout=30, what=f"the {role} pod's readiness probe")
            # each pod serves its own metrics, where the prometheus.io annotations point
            for role, _, port in processes:
                async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
                    assert resp.status == 401, f"{role}: /metrics is a read, closed by default"
                async with http.get(f"http://127.0.0.1:{port}/metrics", headers={
                        "Authorization": "Bearer scrape-token-1"}) as resp:
                    assert resp.status == 200, role
                    assert "cistate_runs" in await resp.text()

        # a producer, with its own settings
        push_env = {**local_command(kinds["Deployment"][0]["spec"]["template"]["spec"]
                                    ["containers"][0], secret, files, free_port(), tmp_path)[1],
                    "CISTATE_RABBITMQ_URL": amqp_url}
        pushed = subprocess.run(
            [str(Path(sys.executable).with_name("cistate")), "push", "--repo",
             "https://git.example.com/team/app.git", "--ref", "refs/heads/main",
             "--commit", "ab" * 20, "--json"],
            env=push_env, capture_output=True, text=True, timeout=60)
        assert pushed.returncode == 0, pushed.stderr
        run_id = uuid.UUID(json.loads(pushed.stdout)["run_id"])

        async def finished() -> str | None:
            run = await store.load(run_id)
            return run.status if run is not None and run.status in (
                "succeeded", "failed", "cancelled") else None

        assert await wait_until(finished, timeout=30, what="the run to finish") == "succeeded"
    finally:
        for _, proc, _ in processes:
            proc.terminate()
        for _, proc, _ in processes:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def deployment_probe(kinds: dict[str, list[dict[str, Any]]], role: str) -> dict[str, Any]:
    for deployment in kinds["Deployment"]:
        if deployment["metadata"]["labels"]["app.kubernetes.io/component"] == role:
            probe: dict[str, Any] = deployment["spec"]["template"]["spec"]["containers"][0][
                "readinessProbe"]["httpGet"]
            return probe
    raise AssertionError(f"no {role} Deployment")
