"""End to end: the delivery handlers (deploy, health, helm-release, gitops, qa-sync) against
real components: a kube-apiserver + etcd started by tests/infra/kube-apiserver.sh, helm from
tests/infra/helm.sh, docker-registry, a git daemon, buildah (to serve the built image), and a
real HTTP chart repository process (tests/infra/chart_repo.py, a stand-in for Artifactory).

Two parts cannot run here and are played by the tests themselves, named as such:
- the kubelet: `KubeletStandIn` patches each Deployment's status the way a kubelet and the
  deployment controller would once its pods are ready;
- Argo CD: `ArgoCDStandIn` serves the slice of its REST API that qa-sync reads.

Handlers are called as the worker calls them: `handlers.load(name)(StepRequest)`.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import tarfile
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from kubernetes_asyncio.client import (
    ApiClient,
    AppsV1Api,
    CoreV1Api,
    NetworkingV1Api,
    RbacAuthorizationV1Api,
    V1Namespace,
    V1ObjectMeta,
)
from kubernetes_asyncio.client.exceptions import ApiException

import handlers
from handlers.base import StepFailed, StepRequest
from handlers.helm import prepare_chart
from tests.e2e.conftest import (
    SAMPLE_APP,
    ChartRepoStandIn,
    Delivery,
    Env,
    GitRepo,
    Kube,
    KubeletStandIn,
    Requests,
    free_port,
    git,
    log_text,
    serve_image,
    service_account_kubeconfig,
)
from tests.tcpproxy import TcpProxy

pytestmark = pytest.mark.e2e

APP = "hello-app"
CHART = "chart/hello-app"


# -------------------------------------------------------------------- helpers --
# The fixtures (kube, helm_bin, kube_api, delivery, gitops_repo, chart_repo) and the stand-ins
# (KubeletStandIn, ChartRepoStandIn, serve_image) live in tests/e2e/conftest.py: the pipeline
# tests share them.


def deploy_inputs(image: str = "127.0.0.1:5000/ns/hello-app:abc1234") -> dict[str, Any]:
    return {
        "setup": {"app_name": APP, "image_url": image, "branch": "main"},
        "build": {"image_url": image, "image_digest": "sha256:" + "0" * 64},
    }


async def run_step(make_request: Requests, repo: GitRepo | str, sha: str, step: str,
                   **kwargs: Any) -> tuple[dict[str, Any], StepRequest]:
    request = make_request(repo, sha, step, **kwargs)
    outputs = await handlers.load(step)(request)
    assert json.loads(json.dumps(outputs)) == outputs, "outputs must be JSON-able"
    return outputs, request


async def fail_step(make_request: Requests, repo: GitRepo | str, sha: str, step: str,
                    **kwargs: Any) -> tuple[StepFailed, StepRequest]:
    request = make_request(repo, sha, step, **kwargs)
    with pytest.raises(StepFailed) as info:
        await handlers.load(step)(request)
    return info.value, request


# --------------------------------------------------------------------- deploy --


async def test_deploy_applies_the_chart_waits_for_the_rollout_and_is_idempotent(
    make_repo: Any, make_request: Requests, delivery: Delivery, kube_api: ApiClient
) -> None:
    repo = make_repo()
    image = f"{delivery.env.push_registry}/{APP}:{repo.initial[:7]}"
    async with KubeletStandIn(kube_api, delivery.namespace) as kubelet:
        first, request = await run_step(
            make_request, repo, repo.initial, "deploy", inputs=deploy_inputs(image)
        )
        second, _ = await run_step(
            make_request, repo, repo.initial, "deploy", inputs=deploy_inputs(image)
        )

    assert first == {
        "namespace": delivery.namespace,
        "objects": [f"Service/{APP}", f"Deployment/{APP}", f"Ingress/{APP}"],
        "service_port": 8080,
    }
    assert second == first
    assert kubelet.patched == [(APP, 1)], "the second apply changed nothing: no new generation"
    deployment = await AppsV1Api(kube_api).read_namespaced_deployment(APP, delivery.namespace)
    container = deployment.spec.template.spec.containers[0]
    assert container.image == image
    assert deployment.metadata.annotations["app.openshift.io/vcs-ref"] == "main"
    assert deployment.metadata.labels["helm.sh/chart"] == f"{APP}-1.0.0-rc{repo.initial[:7]}"
    managers = {entry.manager for entry in deployment.metadata.managed_fields}
    assert "cistate" in managers
    log = log_text(request)
    assert "rolled out" in log and "helm lint" in log


async def test_deploy_fails_clearly_without_a_chart_or_with_two(
    make_repo: Any, make_request: Requests, delivery: Delivery
) -> None:
    repo = make_repo()
    chart = repo.work / CHART
    files = {str(p.relative_to(repo.work)): None for p in chart.rglob("*") if p.is_file()}
    no_chart = repo.commit(files, "no chart")
    failed, _ = await fail_step(make_request, repo, no_chart, "deploy", inputs=deploy_inputs())
    assert "no Helm chart" in failed.message and "chart/" in failed.message
    assert failed.retryable is False

    two = repo.commit(
        {
            "chart/one/Chart.yaml": "apiVersion: v2\nname: one\nversion: 0.1.0\n",
            "chart/two/Chart.yaml": "apiVersion: v2\nname: two\nversion: 0.1.0\n",
        },
        "two charts",
    )
    failed, _ = await fail_step(make_request, repo, two, "deploy", inputs=deploy_inputs())
    assert "2 Helm charts" in failed.message
    assert "chart/one" in failed.message and "chart/two" in failed.message
    assert failed.retryable is False


async def test_deploy_surfaces_helm_lint_errors(
    make_repo: Any, make_request: Requests, delivery: Delivery
) -> None:
    repo = make_repo()
    broken = repo.commit(
        {f"{CHART}/templates/broken.yaml": "kind: ConfigMap\n{{ .Values.x | nosuchfunction }}\n"},
        "broken template",
    )
    failed, _ = await fail_step(make_request, repo, broken, "deploy", inputs=deploy_inputs())
    assert "fails `helm lint`" in failed.message and CHART in failed.message
    assert "nosuchfunction" in failed.message
    assert failed.retryable is False


async def test_deploy_reports_the_apiservers_message_for_a_rejected_object(
    make_repo: Any, make_request: Requests, delivery: Delivery, kube_api: ApiClient
) -> None:
    repo = make_repo()
    bad = repo.commit(
        {
            f"{CHART}/templates/bad.yaml": (
                "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: Not_A_Valid_Name\n"
                "data:\n  a: b\n"
            )
        },
        "invalid object",
    )
    async with KubeletStandIn(kube_api, delivery.namespace):
        failed, _ = await fail_step(make_request, repo, bad, "deploy", inputs=deploy_inputs())
    assert "ConfigMap/Not_A_Valid_Name" in failed.message
    assert delivery.namespace in failed.message
    assert "HTTP 422" in failed.message and "Invalid value" in failed.message
    assert failed.retryable is False


async def test_a_port_without_protocol_fails_once_with_what_to_change_in_the_chart(
    make_repo: Any, make_request: Requests, delivery: Delivery, kube_api: ApiClient
) -> None:
    """Kubernetes 1.20's server-side apply answers HTTP 500 for it: deterministic, so the
    step must not spend its retries on it."""
    repo = make_repo()
    service = repo.work / CHART / "templates" / "service.yaml"
    no_protocol = repo.commit(
        {f"{CHART}/templates/service.yaml":
         "".join(line for line in service.read_text().splitlines(keepends=True)
                 if "protocol:" not in line)},
        "a port without protocol")
    async with KubeletStandIn(kube_api, delivery.namespace):
        failed, _ = await fail_step(make_request, repo, no_protocol, "deploy",
                                    inputs=deploy_inputs())
    assert "HTTP 500" in failed.message and f"Service/{APP}" in failed.message
    assert "add `protocol: TCP`" in failed.message
    assert failed.retryable is False


async def test_deploy_fails_retryably_when_the_apiserver_is_unreachable(
    make_repo: Any, make_request: Requests, delivery: Delivery, kube: Kube, tmp_path: Path
) -> None:
    repo = make_repo()
    config = yaml.safe_load(kube.kubeconfig.read_text())
    dead = f"https://127.0.0.1:{free_port()}"
    for cluster in config["clusters"]:
        cluster["cluster"]["server"] = dead
    unreachable = tmp_path / "kubeconfig-unreachable"
    unreachable.write_text(yaml.safe_dump(config))
    delivery.set(kubeconfig=str(unreachable))
    failed, _ = await fail_step(
        make_request, repo, repo.initial, "deploy", inputs=deploy_inputs()
    )
    assert "unreachable" in failed.message and dead in failed.message
    assert failed.retryable is True


async def test_deploy_times_out_when_the_rollout_never_becomes_ready(
    make_repo: Any, make_request: Requests, delivery: Delivery
) -> None:
    repo = make_repo()
    delivery.set(rollout_timeout="1.5")
    started = time.monotonic()
    failed, _ = await fail_step(
        make_request, repo, repo.initial, "deploy", inputs=deploy_inputs()
    )
    assert time.monotonic() - started < 20
    assert f"Deployment/{APP} in namespace {delivery.namespace} did not roll out" in failed.message
    assert "1.5s" in failed.message


# The rollout is watched (GET ...?watch=1 from the resourceVersion deploy read), not polled:
# with CISTATE_ROLLOUT_INTERVAL at 30 s a poll would look again 30 s after the first look; the
# watch sees the kubelet's status report within a fraction of a second of it. The margins
# below are generous (5 s against 30) so that a loaded machine does not fail them.
SLOW_POLL = "30"


async def test_deploy_sees_the_rollout_when_its_status_changes_not_at_the_next_poll(
    make_repo: Any, make_request: Requests, delivery: Delivery, kube_api: ApiClient
) -> None:
    repo = make_repo()
    delivery.set(rollout_interval=SLOW_POLL)
    async with KubeletStandIn(kube_api, delivery.namespace, delay=1.5) as kubelet:
        _, request = await run_step(make_request, repo, repo.initial, "deploy",
                                    inputs=deploy_inputs())
        returned = time.monotonic()
    assert kubelet.patched == [(APP, 1)]
    assert returned - kubelet.patched_at[0] < 5, "the status change was seen a poll late"
    log = log_text(request)
    assert f"waiting for Deployment/{APP}" in log and f"Deployment/{APP} rolled out" in log
    assert "reading it again" not in log and "may not watch" not in log


async def test_a_dropped_watch_is_resynced_and_the_rollout_still_finishes(
    make_repo: Any, make_request: Requests, delivery: Delivery, kube: Kube,
    kube_api: ApiClient, tmp_path: Path,
) -> None:
    """The connection to the API server is cut (a TCP proxy aborts it) while deploy watches
    the rollout, before the status changes: deploy reads the Deployment again, watches anew
    and sees the change."""
    repo = make_repo()
    server = yaml.safe_load(kube.kubeconfig.read_text())
    target = server["clusters"][0]["cluster"]["server"]
    proxy = await TcpProxy("127.0.0.1", int(target.rsplit(":", 1)[1])).start()
    for cluster in server["clusters"]:
        cluster["cluster"]["server"] = f"https://127.0.0.1:{proxy.port}"
    through_proxy = tmp_path / "kubeconfig-proxy"
    through_proxy.write_text(yaml.safe_dump(server))
    delivery.set(kubeconfig=str(through_proxy), rollout_interval=SLOW_POLL)
    apps = AppsV1Api(kube_api)

    async def cut_while_watching() -> None:
        while True:  # the Deployment is applied: deploy watches it from now on
            try:
                await apps.read_namespaced_deployment(APP, delivery.namespace)
                break
            except ApiException:
                await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)
        await proxy.cut()

    try:
        async with KubeletStandIn(kube_api, delivery.namespace, delay=3.0) as kubelet:
            cutter = asyncio.create_task(cut_while_watching())
            _, request = await run_step(make_request, repo, repo.initial, "deploy",
                                        inputs=deploy_inputs())
            returned = time.monotonic()
            await cutter
    finally:
        await proxy.close()
    assert proxy.cuts == 1
    assert kubelet.patched == [(APP, 1)]
    assert returned - kubelet.patched_at[0] < 5, "the new watch did not see the change"
    log = log_text(request)
    assert re.search(rf"the watch on Deployment/{APP} (broke off|was closed).*; reading it "
                     "again", log), log
    assert f"Deployment/{APP} rolled out" in log


async def test_a_watch_the_server_ends_is_renewed_from_a_fresh_read(
    make_repo: Any, make_request: Requests, delivery: Delivery, kube_api: ApiClient
) -> None:
    repo = make_repo()
    delivery.set(rollout_interval=SLOW_POLL, rollout_watch_seconds="1")
    async with KubeletStandIn(kube_api, delivery.namespace, delay=3.5) as kubelet:
        _, request = await run_step(make_request, repo, repo.initial, "deploy",
                                    inputs=deploy_inputs())
        returned = time.monotonic()
    assert returned - kubelet.patched_at[0] < 5
    log = log_text(request)
    assert log.count(f"the watch on Deployment/{APP} ended after 1s; reading it again") >= 2
    assert f"Deployment/{APP} rolled out" in log


# ------------------------------------------------- what deploy may apply, and where --


def hostile_chart(marker: str) -> dict[str, str]:
    """Templates a chart has no business with in a dev namespace: a binding of the cluster's
    admin role, and an object placed into kube-system."""
    return {
        f"{CHART}/templates/takeover.yaml": f"""\
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRoleBinding
metadata:
  name: owns-the-cluster-{marker}
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: ClusterRole
  name: cluster-admin
subjects:
  - kind: ServiceAccount
    name: default
    namespace: {{{{ .Release.Namespace }}}}
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: planted-{marker}
  namespace: kube-system
data:
  a: b
""",
    }


async def absent(read: Any) -> bool:
    try:
        await read()
    except ApiException as exc:
        if exc.status == 404:
            return True
        raise
    return False


async def test_deploy_refuses_cluster_scoped_and_foreign_namespace_objects_before_applying(
    make_repo: Any, make_request: Requests, delivery: Delivery, kube_api: ApiClient
) -> None:
    repo = make_repo()
    marker = uuid.uuid4().hex[:8]
    sha = repo.commit(hostile_chart(marker), "a chart that reaches beyond its namespace")
    async with KubeletStandIn(kube_api, delivery.namespace):
        failed, request = await fail_step(make_request, repo, sha, "deploy",
                                          inputs=deploy_inputs())

    assert failed.retryable is False
    assert f"ClusterRoleBinding/owns-the-cluster-{marker} (cluster-scoped)" in failed.message
    assert f"ConfigMap/planted-{marker} (in namespace kube-system" in failed.message
    assert "CISTATE_DEPLOY_ALLOW_CLUSTER_KINDS" in failed.message
    assert "nothing was applied" in failed.message
    rbac, core, apps = RbacAuthorizationV1Api(kube_api), CoreV1Api(kube_api), AppsV1Api(kube_api)
    assert await absent(lambda: rbac.read_cluster_role_binding(f"owns-the-cluster-{marker}"))
    assert await absent(lambda: core.read_namespaced_config_map(f"planted-{marker}",
                                                                "kube-system"))
    assert await absent(lambda: core.read_namespaced_config_map(f"planted-{marker}",
                                                                delivery.namespace))
    assert await absent(lambda: apps.read_namespaced_deployment(APP, delivery.namespace))
    assert "applied " not in log_text(request)


async def test_a_cluster_kind_the_worker_allows_is_applied_and_the_own_namespace_is_fine(
    make_repo: Any, make_request: Requests, delivery: Delivery, kube_api: ApiClient
) -> None:
    repo = make_repo()
    marker = uuid.uuid4().hex[:8]
    sha = repo.commit({f"{CHART}/templates/extra.yaml": f"""\
apiVersion: rbac.authorization.k8s.io/v1
kind: ClusterRole
metadata:
  name: reads-nodes-{marker}
rules:
  - apiGroups: [""]
    resources: [nodes]
    verbs: [get]
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: settings
  namespace: {{{{ .Release.Namespace }}}}
data:
  a: b
"""}, "a cluster role and a config map in the release's namespace")
    failed, _ = await fail_step(make_request, repo, sha, "deploy", inputs=deploy_inputs())
    assert f"ClusterRole/reads-nodes-{marker} (cluster-scoped)" in failed.message
    assert "ConfigMap/settings" not in failed.message

    delivery.set(deploy_allow_cluster_kinds="ClusterRoleBinding, ClusterRole")
    async with KubeletStandIn(kube_api, delivery.namespace):
        result, _ = await run_step(make_request, repo, sha, "deploy", inputs=deploy_inputs())
    assert f"ClusterRole/reads-nodes-{marker}" in result["objects"]
    assert "ConfigMap/settings" in result["objects"]
    role = await RbacAuthorizationV1Api(kube_api).read_cluster_role(f"reads-nodes-{marker}")
    assert role.rules[0].resources == ["nodes"]


async def test_a_kind_the_cluster_does_not_serve_fails_before_anything_is_applied(
    make_repo: Any, make_request: Requests, delivery: Delivery, kube_api: ApiClient
) -> None:
    repo = make_repo()
    sha = repo.commit({f"{CHART}/templates/widget.yaml":
                       "apiVersion: example.com/v1\nkind: Widget\nmetadata:\n  name: w\n"},
                      "a custom resource without its definition")
    async with KubeletStandIn(kube_api, delivery.namespace):
        failed, _ = await fail_step(make_request, repo, sha, "deploy", inputs=deploy_inputs())
    assert "does not serve kind Widget of apiVersion example.com/v1" in failed.message
    assert failed.retryable is False
    core, apps = CoreV1Api(kube_api), AppsV1Api(kube_api)
    assert await absent(lambda: core.read_namespaced_service(APP, delivery.namespace))
    assert await absent(lambda: apps.read_namespaced_deployment(APP, delivery.namespace))


# The Role a cluster's admin gives cistate's deploy credentials (README: "Deploy credentials"),
# in each namespace cistate deploys to; {namespace} and the ServiceAccount are filled in.
DEPLOY_ROLE = """\
apiVersion: rbac.authorization.k8s.io/v1
kind: Role
metadata:
  name: cistate-deploy
  namespace: {namespace}
rules:
  # deploy checks that its namespace exists (it may not create or change one)
  - apiGroups: [""]
    resources: [namespaces]
    resourceNames: [{namespace}]
    verbs: [get]
  # what the apps' charts hold: server-side apply creates and patches, deploy and health read
  - apiGroups: [""]
    resources: [services, configmaps, secrets, serviceaccounts, persistentvolumeclaims]
    verbs: [get, create, patch]
  - apiGroups: [apps]
    resources: [deployments, statefulsets]
    verbs: [get, create, patch, {watch}]
  - apiGroups: [networking.k8s.io]
    resources: [ingresses]
    verbs: [get, create, patch]
---
apiVersion: rbac.authorization.k8s.io/v1
kind: RoleBinding
metadata:
  name: cistate-deploy
  namespace: {namespace}
roleRef:
  apiGroup: rbac.authorization.k8s.io
  kind: Role
  name: cistate-deploy
subjects:
  - kind: ServiceAccount
    name: {account}
    namespace: {account_namespace}
"""


async def test_deploy_works_with_namespaced_credentials_and_refuses_cluster_objects_itself(
    make_repo: Any,
    make_request: Requests,
    delivery: Delivery,
    kube: Kube,
    kube_api: ApiClient,
    tmp_path: Path,
) -> None:
    """cistate's deploy credentials as the README says to make them: a ServiceAccount with
    only the Role above in the dev namespace (RBAC is on in the test apiserver)."""
    account_namespace = f"cistate-{uuid.uuid4().hex[:8]}"
    kubeconfig = await service_account_kubeconfig(
        kube, kube_api, account_namespace, "cistate-worker", tmp_path / "kubeconfig-deploy")
    await CoreV1Api(kube_api).create_namespace(
        V1Namespace(metadata=V1ObjectMeta(name=delivery.namespace)))
    rbac = RbacAuthorizationV1Api(kube_api)
    role, binding = yaml.safe_load_all(DEPLOY_ROLE.format(
        namespace=delivery.namespace, account="cistate-worker",
        account_namespace=account_namespace, watch="watch"))
    await rbac.create_namespaced_role(delivery.namespace, role)
    await rbac.create_namespaced_role_binding(delivery.namespace, binding)
    delivery.set(kubeconfig=str(kubeconfig))

    repo = make_repo()
    async with KubeletStandIn(kube_api, delivery.namespace):
        result, request = await run_step(make_request, repo, repo.initial, "deploy",
                                         inputs=deploy_inputs())
        assert result["objects"] == [f"Service/{APP}", f"Deployment/{APP}", f"Ingress/{APP}"]
        assert "may not watch" not in log_text(request)

        marker = uuid.uuid4().hex[:8]
        hostile = repo.commit(hostile_chart(marker), "a chart that reaches beyond")
        failed, _ = await fail_step(make_request, repo, hostile, "deploy",
                                    inputs=deploy_inputs())
    assert f"ClusterRoleBinding/owns-the-cluster-{marker} (cluster-scoped)" in failed.message
    assert "HTTP 403" not in failed.message and "forbidden" not in failed.message
    assert failed.retryable is False

    # a namespaced kind the Role does not list is the API server's to refuse, and it says so
    budget = repo.commit({f"{CHART}/templates/takeover.yaml": None,
                          f"{CHART}/templates/budget.yaml": """\
apiVersion: policy/v1beta1
kind: PodDisruptionBudget
metadata:
  name: budget
spec:
  minAvailable: 1
  selector:
    matchLabels: {app: hello}
"""}, "a kind the deploy Role does not list")
    failed, _ = await fail_step(make_request, repo, budget, "deploy", inputs=deploy_inputs())
    assert "refused applying PodDisruptionBudget/budget" in failed.message
    assert "HTTP 403" in failed.message and "give them a Role" in failed.message
    assert failed.retryable is False


async def test_credentials_that_may_not_watch_look_at_the_rollout_every_interval(
    make_repo: Any,
    make_request: Requests,
    delivery: Delivery,
    kube: Kube,
    kube_api: ApiClient,
    tmp_path: Path,
) -> None:
    """A Role made before deploy watched rollouts (get, create, patch; no watch) still
    deploys: the watch is refused (HTTP 403) and deploy looks every CISTATE_ROLLOUT_INTERVAL,
    saying what to add to the Role."""
    account_namespace = f"cistate-{uuid.uuid4().hex[:8]}"
    kubeconfig = await service_account_kubeconfig(
        kube, kube_api, account_namespace, "cistate-worker", tmp_path / "kubeconfig-deploy")
    await CoreV1Api(kube_api).create_namespace(
        V1Namespace(metadata=V1ObjectMeta(name=delivery.namespace)))
    rbac = RbacAuthorizationV1Api(kube_api)
    role, binding = yaml.safe_load_all(DEPLOY_ROLE.format(
        namespace=delivery.namespace, account="cistate-worker",
        account_namespace=account_namespace, watch=""))
    await rbac.create_namespaced_role(delivery.namespace, role)
    await rbac.create_namespaced_role_binding(delivery.namespace, binding)
    delivery.set(kubeconfig=str(kubeconfig))

    repo = make_repo()
    async with KubeletStandIn(kube_api, delivery.namespace, delay=0.5):
        result, request = await run_step(make_request, repo, repo.initial, "deploy",
                                         inputs=deploy_inputs())
    assert result["objects"] == [f"Service/{APP}", f"Deployment/{APP}", f"Ingress/{APP}"]
    log = log_text(request)
    assert f"may not watch Deployment/{APP} (HTTP 403" in log
    assert "looking every 0.1s instead" in log and "`watch` verb" in log
    assert f"Deployment/{APP} rolled out" in log


# ---------------------------------------------------------------- symbolic links --
# The pushed repo's links are kept as links, and one that leads out of the checkout fails the
# step: followed, a chart file linked to /etc/shadow would be deployed (and published) as its
# content.

LEAK_TEMPLATE = """\
apiVersion: v1
kind: ConfigMap
metadata:
  name: leak
data:
  shadow: {{ .Files.Get "files/shadow" | quote }}
  environ: {{ .Files.Get "files/environ" | quote }}
"""
HOST_LINKS = {f"{CHART}/files/shadow": "/etc/shadow",
              f"{CHART}/files/environ": "/proc/self/environ"}


def shadow_lines() -> list[str]:
    return [line for line in Path("/etc/shadow").read_text().splitlines() if line.strip()]


def assert_names_the_host_links(failed: StepFailed) -> None:
    assert failed.retryable is False
    for link, target in HOST_LINKS.items():
        assert f"{link} (a link to {target!r})" in failed.message
    assert "outside the checkout" in failed.message


async def test_deploy_and_helm_release_refuse_a_chart_linking_to_host_files(
    make_repo: Any,
    make_request: Requests,
    delivery: Delivery,
    kube_api: ApiClient,
    chart_repo: ChartRepoStandIn,
) -> None:
    repo = make_repo()
    sha = repo.commit({f"{CHART}/templates/leak.yaml": LEAK_TEMPLATE}, "links to host files",
                      links=HOST_LINKS)
    async with KubeletStandIn(kube_api, delivery.namespace):
        failed, deploy = await fail_step(make_request, repo, sha, "deploy",
                                         inputs=deploy_inputs())
    assert_names_the_host_links(failed)
    core, apps = CoreV1Api(kube_api), AppsV1Api(kube_api)
    assert await absent(lambda: core.read_namespaced_config_map("leak", delivery.namespace))
    assert await absent(lambda: apps.read_namespaced_deployment(APP, delivery.namespace))

    failed, release = await fail_step(make_request, repo, sha, "helm-release",
                                      inputs=release_inputs())
    assert_names_the_host_links(failed)
    assert not (chart_repo.root / f"{APP}-0.0.1.tgz").exists()
    assert not (chart_repo.root / "index.yaml").exists() or APP not in (
        chart_repo.index().get("entries") or {})
    for request in (deploy, release):
        log = log_text(request)
        assert not [line for line in shadow_lines() if line in log]


async def test_links_that_stay_in_the_checkout_are_followed_where_they_point(
    make_repo: Any, make_request: Requests, delivery: Delivery, kube_api: ApiClient
) -> None:
    """A link kept as a link still reads the repo's file it names once the chart is copied:
    one to a file beside the chart, one within it, one through another link."""
    repo = make_repo()
    sha = repo.commit(
        {"greeting.txt": "hello from the repo\n",
         f"{CHART}/templates/greeting.yaml": """\
apiVersion: v1
kind: ConfigMap
metadata:
  name: greeting
data:
  beside: {{ .Files.Get "files/beside" | quote }}
  within: {{ .Files.Get "files/within" | quote }}
  chained: {{ .Files.Get "files/chained" | quote }}
""",
         f"{CHART}/notes/within.txt": "from within the chart\n"},
        "links inside the checkout",
        links={f"{CHART}/files/beside": "../../../greeting.txt",
               f"{CHART}/files/within": "../notes/within.txt",
               f"{CHART}/files/chained": "beside"},
    )
    async with KubeletStandIn(kube_api, delivery.namespace):
        result, _ = await run_step(make_request, repo, sha, "deploy", inputs=deploy_inputs())
    assert "ConfigMap/greeting" in result["objects"]
    stored = await CoreV1Api(kube_api).read_namespaced_config_map("greeting", delivery.namespace)
    assert stored.data == {"beside": "hello from the repo\n",
                           "within": "from within the chart\n",
                           "chained": "hello from the repo\n"}


# --------------------------------------------------------------------- health --


async def build_app(make_request: Requests, env: Env, repo: GitRepo, sha: str) -> dict[str, Any]:
    """setup + build by their real handlers: the app's image, pushed to the registry."""
    outputs: dict[str, Any] = {}
    outputs["setup"], _ = await run_step(make_request, repo, sha, "setup", inputs=outputs)
    outputs["build"], _ = await run_step(
        make_request,
        repo,
        sha,
        "build",
        settings={"build_args": {"BASE_IMAGE": env.base_image}},
        inputs=outputs,
    )
    return outputs


async def test_health_finds_the_ingress_host_and_gets_200_from_the_served_image(
    make_repo: Any,
    make_request: Requests,
    delivery: Delivery,
    kube_api: ApiClient,
    builder_storage: Path,
) -> None:
    repo = make_repo()
    values = yaml.safe_load((repo.work / CHART / "values.yaml").read_text())
    values["ingress"]["host"] = "localhost"
    sha = repo.commit({f"{CHART}/values.yaml": yaml.safe_dump(values)}, "ingress host")
    outputs = await build_app(make_request, delivery.env, repo, sha)
    async with KubeletStandIn(kube_api, delivery.namespace):
        outputs["deploy"], _ = await run_step(make_request, repo, sha, "deploy", inputs=outputs)
    ingress = await NetworkingV1Api(kube_api).read_namespaced_ingress(APP, delivery.namespace)
    assert ingress.spec.rules[0].host == "localhost"

    port = free_port()
    delivery.set(health_port=str(port), health_attempts="40")
    with serve_image(outputs["build"]["image_url"], port, builder_storage):
        result, request = await run_step(make_request, repo, sha, "health", inputs=outputs)

    assert result["url"] == f"http://localhost:{port}/health"
    assert result["status"] == 200
    assert isinstance(result["latency_ms"], float) and result["latency_ms"] >= 0
    assert 1 <= result["attempts"] <= 40
    assert "200 in" in log_text(request)


async def test_health_fails_after_bounded_retries_when_never_200(
    make_repo: Any, make_request: Requests, delivery: Delivery
) -> None:
    repo = make_repo()
    app = web.Application()

    async def unhealthy(request: web.Request) -> web.Response:
        return web.Response(status=503, text="starting")

    app.router.add_get("/health", unhealthy)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        delivery.set(health_attempts="3")
        started = time.monotonic()
        failed, request = await fail_step(
            make_request, repo, repo.initial, "health",
            settings={"url": f"http://127.0.0.1:{port}"}, inputs=deploy_inputs(),
        )
        assert time.monotonic() - started < 10
    finally:
        await runner.cleanup()
    assert f"http://127.0.0.1:{port}/health did not answer 200 in 3 attempts" in failed.message
    assert "HTTP 503" in failed.message
    assert log_text(request).count("attempt ") == 2

    dead = free_port()
    failed, _ = await fail_step(
        make_request, repo, repo.initial, "health",
        settings={"url": f"http://127.0.0.1:{dead}"}, inputs=deploy_inputs(),
    )
    assert f"127.0.0.1:{dead}/health" in failed.message and failed.retryable is True


async def test_health_asks_again_fast_at_first_and_backs_off(
    make_repo: Any, make_request: Requests, delivery: Delivery
) -> None:
    """With the default backoff an app that is up a moment after its rollout is seen a tenth
    of a second later, not a second later: 0.1 s, doubling."""
    repo = make_repo()
    for key in ("CISTATE_HEALTH_BACKOFF", "CISTATE_HEALTH_BACKOFF_MAX",
                "CISTATE_HEALTH_ATTEMPTS"):
        delivery.env.monkeypatch.delenv(key, raising=False)
    answers = iter([503, 503, 503])
    app = web.Application()

    async def starting_up(request: web.Request) -> web.Response:
        return web.Response(status=next(answers, 200), text="starting")

    app.router.add_get("/health", starting_up)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        result, request = await run_step(
            make_request, repo, repo.initial, "health",
            settings={"url": f"http://127.0.0.1:{port}"}, inputs=deploy_inputs(),
        )
    finally:
        await runner.cleanup()
    assert result["attempts"] == 4
    log = log_text(request)
    for attempt, delay in ((2, "0.10"), (3, "0.20"), (4, "0.40")):
        assert f"attempt {attempt} of 15 in {delay}s" in log, log


class Recorder:
    """An HTTP server that answers each path with a fixed (status, headers, body) and records
    every request it gets."""

    def __init__(self, routes: dict[str, tuple[int, dict[str, str], bytes]]) -> None:
        self.routes = routes
        self.requests: list[str] = []
        self.port = 0
        self._runner: web.AppRunner | None = None

    async def _answer(self, request: web.Request) -> web.Response:
        self.requests.append(request.path_qs)
        status, headers, body = self.routes.get(request.path, (404, {}, b"no such page"))
        return web.Response(status=status, headers=headers, body=body)

    async def __aenter__(self) -> Recorder:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._answer)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        self.port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


class Banner:
    """A raw TCP service that greets every connection with a banner, as RabbitMQ's port
    answers a stranger; it counts the connections it gets."""

    def __init__(self, banner: bytes) -> None:
        self.banner = banner
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def _greet(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        writer.write(self.banner)
        await writer.drain()
        writer.close()

    async def __aenter__(self) -> Banner:
        self.port = free_port()
        self._server = await asyncio.start_server(self._greet, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()


async def test_health_follows_no_redirect_away_from_the_app(
    make_repo: Any, make_request: Requests, delivery: Delivery
) -> None:
    repo = make_repo()
    secret = f"secret-{uuid.uuid4().hex}"
    banner = f"AMQP\x00\x00\x09\x01 banner-{uuid.uuid4().hex}\r\n".encode()
    delivery.set(health_attempts="3")
    async with Recorder({"/secret": (200, {}, secret.encode())}) as target, \
            Banner(banner) as rabbit:
        away = {
            "/to-port": f"http://127.0.0.1:{target.port}/secret",
            "/to-rabbit": f"http://127.0.0.1:{rabbit.port}/",
            "/to-name": f"http://localhost:{target.port}/secret",
        }
        routes = {path: (302, {"Location": where}, b"") for path, where in away.items()}
        async with Recorder(routes) as app:
            for path, where in away.items():
                failed, request = await fail_step(
                    make_request, repo, repo.initial, "health", inputs=deploy_inputs(),
                    settings={"url": f"http://127.0.0.1:{app.port}", "health_path": path})
                assert failed.retryable is False
                assert f"redirects to {where}" in failed.message
                assert f"not the app (http://127.0.0.1:{app.port})" in failed.message
                for leaked in (secret, "banner-"):
                    assert leaked not in failed.message and leaked not in log_text(request)
            # a health path cannot name another host either
            failed, request = await fail_step(
                make_request, repo, repo.initial, "health", inputs=deploy_inputs(),
                settings={"url": f"http://127.0.0.1:{app.port}",
                          "health_path": f"@127.0.0.1:{target.port}/secret"})
            assert secret not in failed.message and secret not in log_text(request)
    assert target.requests == [] and rabbit.connections == 0


async def test_health_follows_redirects_within_the_app_a_bounded_number_of_times(
    make_repo: Any, make_request: Requests, delivery: Delivery
) -> None:
    repo = make_repo()
    delivery.set(health_attempts="2")
    async with Recorder({}) as app:
        app.routes.update({
            "/health": (302, {"Location": "/ready"}, b""),
            "/ready": (307, {"Location": f"http://127.0.0.1:{app.port}/ready/"}, b""),
            "/ready/": (200, {}, b"UP"),
            "/loop": (302, {"Location": "/loop"}, b""),
        })
        result, _ = await run_step(make_request, repo, repo.initial, "health",
                                   inputs=deploy_inputs(),
                                   settings={"url": f"http://127.0.0.1:{app.port}"})
        assert result["status"] == 200
        assert result["url"] == f"http://127.0.0.1:{app.port}/ready/"

        app.requests.clear()
        failed, _ = await fail_step(make_request, repo, repo.initial, "health",
                                    inputs=deploy_inputs(),
                                    settings={"url": f"http://127.0.0.1:{app.port}",
                                              "health_path": "/loop"})
    assert "more than 5 redirects" in failed.message
    assert len(app.requests) == 2 * 6, "each attempt: the request and 5 redirects"


async def test_health_shows_at_most_200_printable_characters_of_a_failing_answer(
    make_repo: Any, make_request: Requests, delivery: Delivery
) -> None:
    repo = make_repo()
    junk = bytes(range(256)) * 40_000  # 10 MB, every byte value
    body = b"internal \x1b[31merror\x00\n\t: " + junk
    delivery.set(health_attempts="2")
    async with Recorder({"/health": (500, {"Content-Type": "application/octet-stream"},
                                     body)}) as app:
        failed, request = await fail_step(make_request, repo, repo.initial, "health",
                                          inputs=deploy_inputs(),
                                          settings={"url": f"http://127.0.0.1:{app.port}"})
    assert "(last: HTTP 500: internal ?[31merror? : " in failed.message
    shown = failed.message.split("(last: HTTP 500: ", 1)[1].rsplit(")", 1)[0]
    assert len(shown) <= 200 and shown.isprintable()
    assert failed.message.isprintable()
    log = log_text(request)
    assert "\x00" not in log and "\x1b" not in log and len(log) < 5_000


async def test_health_tells_no_more_of_a_service_that_is_not_http(
    make_repo: Any, make_request: Requests, delivery: Delivery
) -> None:
    repo = make_repo()
    marker = f"banner-{uuid.uuid4().hex}"
    delivery.set(health_attempts="2")
    async with Banner(f"AMQP\x00\x00\x09\x01 {marker}\r\n".encode()) as rabbit:
        failed, request = await fail_step(make_request, repo, repo.initial, "health",
                                          inputs=deploy_inputs(),
                                          settings={"url": f"http://127.0.0.1:{rabbit.port}"})
    assert "not an HTTP answer" in failed.message
    assert marker not in failed.message and marker not in log_text(request)
    assert "AMQP" not in failed.message


# --------------------------------------------------------------------- gitops --


def with_ingress_host(repo: GitRepo, host: str) -> dict[str, str]:
    values = yaml.safe_load((repo.work / CHART / "values.yaml").read_text())
    values["ingress"]["host"] = host
    return {f"{CHART}/values.yaml": yaml.safe_dump(values)}


def branch_inputs(env: Env, sha: str, branch: str) -> dict[str, Any]:
    image = f"{env.push_registry}/{APP}:{sha[:7]}"
    inputs = deploy_inputs(image)
    inputs["setup"].update(branch=branch, short_sha=sha[:7])
    return inputs


async def test_each_branch_deploys_into_a_namespace_of_its_own_and_health_looks_there(
    make_repo: Any, make_request: Requests, delivery: Delivery, kube_api: ApiClient
) -> None:
    """main and feature/x with `with: namespace: <prefix>-${branch}` (and the same template in
    CISTATE_DEV_NAMESPACE for health): two namespaces, two Deployments, neither replaced."""
    template = f"{delivery.namespace}-${{branch}}"
    delivery.set(dev_namespace=template)
    repo = make_repo()
    in_own_namespace = {f"{CHART}/templates/where.yaml": """\
apiVersion: v1
kind: ConfigMap
metadata:
  name: where
  namespace: {{ .Release.Namespace }}
data:
  branch: {{ .Values.vcsInfo.branch | quote }}
"""}
    main = repo.commit({**with_ingress_host(repo, "main.invalid"), **in_own_namespace},
                       "main's app", branch="main")
    feature = repo.commit(with_ingress_host(repo, "localhost"), "feature x", branch="feature/x")
    main_ns = f"{delivery.namespace}-main"

    apps, core = AppsV1Api(kube_api), CoreV1Api(kube_api)
    async with KubeletStandIn(kube_api, delivery.namespace, prefix=True) as kubelet:
        on_main, _ = await run_step(make_request, repo, main, "deploy",
                                    settings={"namespace": template},
                                    inputs=branch_inputs(delivery.env, main, "main"))
        on_feature, _ = await run_step(make_request, repo, feature, "deploy",
                                       ref="refs/heads/feature/x",
                                       settings={"namespace": template},
                                       inputs=branch_inputs(delivery.env, feature, "feature/x"))

    assert on_main["namespace"] == main_ns
    feature_ns = on_feature["namespace"]
    assert feature_ns != main_ns
    assert re.fullmatch(rf"{delivery.namespace}-feature-x-[0-9a-f]{{8}}", feature_ns)
    assert on_main["objects"] == on_feature["objects"] == [
        "ConfigMap/where", f"Service/{APP}", f"Deployment/{APP}", f"Ingress/{APP}"]
    assert kubelet.patched == [(APP, 1), (APP, 1)]
    assert kubelet.namespaces == {main_ns, feature_ns}

    # both Deployments are there, each with its own branch's image: neither replaced the other
    for namespace, sha, branch in ((main_ns, main, "main"), (feature_ns, feature, "feature/x")):
        deployment = await apps.read_namespaced_deployment(APP, namespace)
        assert deployment.spec.template.spec.containers[0].image.endswith(f":{sha[:7]}")
        assert deployment.metadata.annotations["app.openshift.io/vcs-ref"] == branch
        assert deployment.metadata.generation == 1
        where = await core.read_namespaced_config_map("where", namespace)
        assert where.data == {"branch": branch}, "helm rendered the chart for this namespace"

    # health finds the feature's Ingress in the feature's namespace: by deploy's output, and,
    # without it, by rendering the same template for the run
    delivery.set(health_attempts="2")
    async with Recorder({"/health": (200, {}, b"ok")}) as app:
        delivery.set(health_port=str(app.port))
        for inputs in ({**branch_inputs(delivery.env, feature, "feature/x"),
                        "deploy": on_feature},
                       branch_inputs(delivery.env, feature, "feature/x")):
            result, _ = await run_step(make_request, repo, feature, "health",
                                       ref="refs/heads/feature/x", inputs=inputs)
            assert result["url"] == f"http://localhost:{app.port}/health"
        failed, _ = await fail_step(make_request, repo, main, "health",
                                    inputs={**branch_inputs(delivery.env, main, "main"),
                                            "deploy": on_main})
    assert "main.invalid" in failed.message, "main's health asks main's Ingress"

    # the rendered namespace is the one refusals compare with: main's is another namespace
    planted = repo.commit({f"{CHART}/templates/planted.yaml": f"""\
apiVersion: v1
kind: ConfigMap
metadata:
  name: planted
  namespace: {main_ns}
"""}, "reach into main's namespace", branch="feature/x")
    failed, _ = await fail_step(make_request, repo, planted, "deploy",
                                ref="refs/heads/feature/x", settings={"namespace": template},
                                inputs=branch_inputs(delivery.env, planted, "feature/x"))
    assert f"ConfigMap/planted (in namespace {main_ns}, not {feature_ns})" in failed.message
    assert f"a deploy to namespace {feature_ns} may not apply" in failed.message
    assert await absent(lambda: core.read_namespaced_config_map(
        "planted", main_ns))


def released(version: str = "0.0.1", repo: str = "oci://127.0.0.1:5000/charts") -> dict[str, Any]:
    return {
        "setup": {"app_name": APP, "branch": "main"},
        "helm-release": {"chart_name": APP, "chart_version": version, "chart_repo": repo},
    }


def show(repo: GitRepo, rev: str, path: str = "") -> str:
    return git(repo.bare, "--git-dir", str(repo.bare), "show", f"{rev}:{path}" if path else rev)


async def test_gitops_creates_the_qa_app_chart_and_a_second_run_has_no_changes(
    make_repo: Any, make_request: Requests, gitops_repo: GitRepo
) -> None:
    app = make_repo()
    first, request = await run_step(make_request, app, app.initial, "gitops", inputs=released())
    assert first["changed"] is True
    assert git(gitops_repo.bare, "rev-parse", "qa") == first["commit"]
    assert git(gitops_repo.bare, "log", "-1", "--format=%s", "qa") == f"Updates {APP} to 0.0.1"
    chart = yaml.safe_load(show(gitops_repo, "qa", f"qa/{APP}/Chart.yaml"))
    assert chart["name"] == APP and chart["apiVersion"] == "v2"
    requirements = yaml.safe_load(show(gitops_repo, "qa", f"qa/{APP}/requirements.yaml"))
    assert requirements == {
        "dependencies": [
            {"name": APP, "version": "0.0.1", "repository": "oci://127.0.0.1:5000/charts"}
        ]
    }
    values = yaml.safe_load(show(gitops_repo, "qa", f"qa/{APP}/values.yaml"))
    assert values == {"global": {}, APP: {"replicaCount": 1}}
    assert show(gitops_repo, "qa", "qa/README.md") == "QA environment"

    second, request = await run_step(make_request, app, app.initial, "gitops", inputs=released())
    assert second == {"commit": first["commit"], "changed": False}
    assert "no changes" in log_text(request)

    third, _ = await run_step(
        make_request, app, app.initial, "gitops", inputs=released("0.0.2", "https://charts/x")
    )
    assert third["changed"] is True
    requirements = yaml.safe_load(show(gitops_repo, "qa", f"qa/{APP}/requirements.yaml"))
    assert requirements["dependencies"] == [
        {"name": APP, "version": "0.0.2", "repository": "https://charts/x"}
    ]
    assert git(gitops_repo.bare, "rev-parse", f"{third['commit']}^") == first["commit"]


async def test_gitops_never_moves_qa_backwards_an_older_release_is_skipped(
    make_repo: Any, make_request: Requests, gitops_repo: GitRepo
) -> None:
    """An older run's gitops step after a newer one's (a real git repo): the step ends
    skipped, naming both versions, and QA keeps the newer version."""
    from handlers.base import StepSkipped

    app = make_repo()
    newer, _ = await run_step(make_request, app, app.initial, "gitops", inputs=released("0.0.5"))
    assert newer["changed"] is True
    request = make_request(app, app.initial, "gitops", inputs=released("0.0.3"))
    with pytest.raises(StepSkipped) as info:
        await handlers.load("gitops")(request)
    assert "already holds" in info.value.reason and "0.0.5" in info.value.reason
    assert "0.0.3" in info.value.reason and "not moved backwards" in info.value.reason
    assert info.value.outputs["commit"] == newer["commit"]
    assert git(gitops_repo.bare, "rev-parse", "qa") == newer["commit"]
    requirements = yaml.safe_load(show(gitops_repo, "qa", f"qa/{APP}/requirements.yaml"))
    assert requirements["dependencies"][0]["version"] == "0.0.5"


async def test_gitops_keeps_other_dependencies_of_an_existing_requirements_file(
    make_repo: Any, make_request: Requests, gitops_repo: GitRepo
) -> None:
    app = make_repo()
    other = {"name": "redis", "version": "1.2.3", "repository": "https://charts.example/r"}
    mine = {"name": APP, "version": "0.0.0", "repository": "https://old"}
    gitops_repo.commit(
        {f"qa/{APP}/requirements.yaml": yaml.safe_dump({"dependencies": [other, mine]})},
        "existing app",
        branch="qa",
    )
    result, _ = await run_step(make_request, app, app.initial, "gitops", inputs=released("0.0.7"))
    assert result["changed"] is True
    requirements = yaml.safe_load(show(gitops_repo, "qa", f"qa/{APP}/requirements.yaml"))
    assert requirements["dependencies"] == [
        other,
        {"name": APP, "version": "0.0.7", "repository": "oci://127.0.0.1:5000/charts"},
    ]


async def test_gitops_retries_a_push_rejected_because_qa_moved(
    make_repo: Any,
    make_request: Requests,
    gitops_repo: GitRepo,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Another commit lands on qa between the step's fetch and its push: a real rejected
    push; the step fetches, reapplies its change on top and pushes again."""
    from handlers import gitops

    app = make_repo()
    original = gitops.update_app_dir
    foreign: list[str] = []

    def update_while_someone_pushes(directory: Path, **kwargs: Any) -> None:
        if not foreign:
            foreign.append(
                gitops_repo.commit({"qa/other/values.yaml": "x: 1\n"}, "someone else", branch="qa")
            )
        original(directory, **kwargs)

    monkeypatch.setattr(gitops, "update_app_dir", update_while_someone_pushes)
    result, request = await run_step(make_request, app, app.initial, "gitops", inputs=released())

    assert result["changed"] is True
    assert git(gitops_repo.bare, "rev-parse", "qa") == result["commit"]
    assert git(gitops_repo.bare, "rev-parse", f"{result['commit']}^") == foreign[0]
    assert show(gitops_repo, "qa", "qa/other/values.yaml") == "x: 1"
    assert "push rejected" in log_text(request)


async def test_gitops_fails_clearly_without_the_branch(
    make_repo: Any, make_request: Requests, gitops_repo: GitRepo
) -> None:
    app = make_repo()
    failed, _ = await fail_step(
        make_request, app, app.initial, "gitops",
        settings={"gitops_branch": "staging"}, inputs=released(),
    )
    assert "has no branch 'staging'" in failed.message and failed.retryable is False


async def test_gitops_writes_through_no_link_out_of_its_checkout(
    make_repo: Any, make_request: Requests, gitops_repo: GitRepo, tmp_path: Path
) -> None:
    """The GitOps repo's links could aim cistate's writes at the worker's own files."""
    app = make_repo()
    outside = tmp_path / "worker-files"
    outside.mkdir()
    planted = outside / "requirements.yaml"
    planted.write_text("dependencies: []\n")
    before = git(gitops_repo.bare, "rev-parse", "qa")
    cases = [
        # (the link, where it points, gitops_dir)
        (f"qa/{APP}/requirements.yaml", str(planted), "qa"),  # a file written through it
        (f"qa/{APP}", str(outside), "qa"),  # a folder made through it
        ("staging", "../../../../worker-files", "staging"),  # a parent climbing out
    ]
    for link, target, folder in cases:
        git(gitops_repo.work, "reset", "-q", "--hard", before)
        gitops_repo.commit(message=f"a link at {link}", branch="qa", base=before,
                           links={link: target})
        failed, _ = await fail_step(make_request, app, app.initial, "gitops",
                                    settings={"gitops_dir": folder}, inputs=released())
        assert failed.retryable is False
        assert f"{link} (a link to {target!r})" in failed.message, failed.message
        assert planted.read_text() == "dependencies: []\n"
        assert sorted(p.name for p in outside.iterdir()) == ["requirements.yaml"]


async def test_gitops_commits_the_file_an_inner_link_points_at(
    make_repo: Any, make_request: Requests, gitops_repo: GitRepo
) -> None:
    """A link that stays in the GitOps repo is written through, and what it points at is
    what gets committed (staging the link alone would commit nothing)."""
    app = make_repo()
    gitops_repo.commit({"shared/requirements.yaml": "dependencies: []\n"}, "a shared file",
                       branch="qa", links={f"qa/{APP}/requirements.yaml":
                                           "../../shared/requirements.yaml"})
    result, _ = await run_step(make_request, app, app.initial, "gitops", inputs=released("0.0.9"))
    assert result["changed"] is True
    shared = yaml.safe_load(show(gitops_repo, "qa", "shared/requirements.yaml"))
    assert shared["dependencies"] == [
        {"name": APP, "version": "0.0.9", "repository": "oci://127.0.0.1:5000/charts"}]
    assert git(gitops_repo.bare, "cat-file", "-t", f"qa:qa/{APP}/requirements.yaml") == "blob"


# --------------------------------------------------------------- helm-release --


def release_inputs(version: str = "0.0.1", app: str = APP) -> dict[str, Any]:
    return {
        "setup": {"app_name": app, "branch": "main"},
        "tag-release": {"tag": version},
        "img-release": {
            "release_image_url": f"127.0.0.1:5000/rel/{app}:{version}",
            "release_image_digest": "sha256:" + "1" * 64,
        },
    }


def packaged_values(tgz: Path, chart: str) -> dict[str, Any]:
    with tarfile.open(tgz) as archive:
        member = archive.extractfile(f"{chart}/values.yaml")
        assert member is not None
        loaded: dict[str, Any] = yaml.safe_load(member.read())
        return loaded


def packaged_chart_yaml(tgz: Path, app: str) -> dict[str, Any]:
    with tarfile.open(tgz) as archive:
        member = archive.extractfile(f"{app}/Chart.yaml")
        assert member is not None
        loaded: dict[str, Any] = yaml.safe_load(member.read())
        return loaded


async def test_helm_release_publishes_to_the_http_chart_repo_once_per_content(
    make_repo: Any, make_request: Requests, chart_repo: ChartRepoStandIn
) -> None:
    repo = make_repo()
    first, _ = await run_step(make_request, repo, repo.initial, "helm-release",
                              inputs=release_inputs())
    assert first == {
        "chart_name": APP,
        "chart_version": "0.0.1",
        "chart_url": f"{chart_repo.url}/{APP}-0.0.1.tgz",
        "chart_repo": chart_repo.url,
    }
    tgz = chart_repo.root / f"{APP}-0.0.1.tgz"
    values = packaged_values(tgz, APP)
    assert values["image"] == {**values["image"], "repository": f"127.0.0.1:5000/rel/{APP}",
                               "tag": "0.0.1"}
    assert values["fullnameOverride"] == APP
    [entry] = chart_repo.index()["entries"][APP]
    assert entry["version"] == "0.0.1" and entry["urls"] == [first["chart_url"]]
    # as `helm repo index` lists it: the package's appVersion, not the source chart's 0.1.0
    assert entry["appVersion"] == "0.0.1" == packaged_chart_yaml(tgz, APP)["appVersion"]
    published = tgz.read_bytes()

    again, request = await run_step(make_request, repo, repo.initial, "helm-release",
                                    inputs=release_inputs())
    assert again == first
    assert tgz.read_bytes() == published, "the published package is not replaced"
    assert "already published with this content" in log_text(request)
    assert len(chart_repo.index()["entries"][APP]) == 1

    values_file = repo.work / CHART / "values.yaml"
    changed = repo.commit({f"{CHART}/values.yaml": values_file.read_text() + "extra: 1\n"},
                          "chart change")
    failed, _ = await fail_step(make_request, repo, changed, "helm-release",
                                inputs=release_inputs())
    assert f"chart {APP} version 0.0.1 is already in {chart_repo.url} with other content" in (
        failed.message
    )
    assert failed.retryable is False
    assert tgz.read_bytes() == published


async def test_two_helm_releases_at_once_both_reach_the_index(
    make_repo: Any, make_request: Requests, chart_repo: ChartRepoStandIn
) -> None:
    repo = make_repo()
    apps = [f"app-{i}-{uuid.uuid4().hex[:4]}" for i in range(4)]
    results = await asyncio.gather(
        *(
            run_step(make_request, repo, repo.initial, "helm-release",
                     inputs=release_inputs("1.0.0", app))
            for app in apps
        )
    )
    assert [outputs["chart_name"] for outputs, _ in results] == apps
    entries = chart_repo.index()["entries"]
    assert sorted(entries) == sorted(apps)
    for app in apps:
        assert [e["version"] for e in entries[app]] == ["1.0.0"]
    logs = [log_text(request) for _, request in results]
    assert any("changed while we merged" in log for log in logs), "the merges did not overlap"


async def test_helm_release_fails_retryably_when_the_chart_repo_is_down(
    make_repo: Any, make_request: Requests, delivery: Delivery
) -> None:
    repo = make_repo()
    dead = f"http://127.0.0.1:{free_port()}/charts"
    delivery.set(chart_repo=dead)
    failed, _ = await fail_step(make_request, repo, repo.initial, "helm-release",
                                inputs=release_inputs())
    assert f"the chart repository {dead} is unreachable" in failed.message
    assert failed.retryable is True


async def test_helm_release_pushes_to_an_oci_registry(
    make_repo: Any, make_request: Requests, delivery: Delivery
) -> None:
    repo = make_repo()
    registry = delivery.env.registry
    charts = f"oci://{registry.address}/{delivery.env.namespace}-charts"
    delivery.set(chart_repo=charts, chart_repo_insecure="1")
    first, _ = await run_step(make_request, repo, repo.initial, "helm-release",
                              inputs=release_inputs("0.0.3"))
    assert first["chart_url"] == f"{charts}/{APP}:0.0.3"
    assert registry.tags(f"{delivery.env.namespace}-charts/{APP}") == ["0.0.3"]
    again, request = await run_step(make_request, repo, repo.initial, "helm-release",
                                    inputs=release_inputs("0.0.3"))
    assert again == first
    assert "already published with this content" in log_text(request)


# -------------------------------------------------------------------- qa-sync --


class ArgoCDStandIn:
    """A stand-in for Argo CD's REST API (Argo CD cannot run here): serves
    `GET /api/v1/applications/<name>` from `self.states`, one per request (the last repeats),
    and wants the bearer token it was given."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.states: list[dict[str, Any]] = []
        self.requests = 0
        self.url = ""
        self._runner: web.AppRunner | None = None

    @staticmethod
    def state(revision: str, sync: str, health: str) -> dict[str, Any]:
        return {"status": {"sync": {"status": sync, "revision": revision},
                           "health": {"status": health}}}

    async def _application(self, request: web.Request) -> web.Response:
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return web.json_response({"error": "unauthorized"}, status=401)
        if request.match_info["name"] != APP:
            return web.json_response({"error": "not found"}, status=404)
        state = self.states[min(self.requests, len(self.states) - 1)]
        self.requests += 1
        return web.json_response({"metadata": {"name": APP}, **state})

    async def __aenter__(self) -> ArgoCDStandIn:
        app = web.Application()
        app.router.add_get("/api/v1/applications/{name}", self._application)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port).start()
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


def synced_inputs(commit: str) -> dict[str, Any]:
    return {"setup": {"app_name": APP}, "gitops": {"commit": commit, "changed": True}}


async def test_qa_sync_waits_for_synced_and_healthy_at_the_gitops_commit(
    make_repo: Any, make_request: Requests, delivery: Delivery
) -> None:
    repo = make_repo()
    commit, older = "a" * 40, "b" * 40
    token = uuid.uuid4().hex
    async with ArgoCDStandIn(token) as argo:
        argo.states = [
            argo.state(older, "Synced", "Healthy"),
            argo.state(commit, "OutOfSync", "Healthy"),
            argo.state(commit, "Synced", "Progressing"),
            argo.state(commit, "Synced", "Healthy"),
        ]
        delivery.set(argocd_url=argo.url, argocd_token=token, argocd_interval="0.05")
        result, request = await run_step(make_request, repo, repo.initial, "qa-sync",
                                         inputs=synced_inputs(commit))
    assert result == {"application": APP, "revision": commit, "sync_status": "Synced",
                      "health_status": "Healthy"}
    assert argo.requests == 4
    assert token not in log_text(request)


async def test_qa_sync_fails_on_degraded_and_on_timeout(
    make_repo: Any, make_request: Requests, delivery: Delivery
) -> None:
    repo = make_repo()
    commit = "c" * 40
    token = uuid.uuid4().hex
    async with ArgoCDStandIn(token) as argo:
        delivery.set(argocd_url=argo.url, argocd_token=token, argocd_interval="0.05",
                     argocd_timeout="1")
        argo.states = [argo.state(commit, "Synced", "Progressing"),
                       argo.state(commit, "Synced", "Degraded")]
        failed, _ = await fail_step(make_request, repo, repo.initial, "qa-sync",
                                    inputs=synced_inputs(commit))
        assert f"{APP} is Degraded at GitOps commit {commit[:12]}" in failed.message
        assert failed.retryable is False

        argo.requests = 0
        argo.states = [argo.state("d" * 40, "Synced", "Healthy")]
        failed, _ = await fail_step(make_request, repo, repo.initial, "qa-sync",
                                    inputs=synced_inputs(commit))
        assert "did not become Synced and Healthy" in failed.message
        assert "within 1s" in failed.message and "dddddddddddd" in failed.message


@pytest.mark.parametrize("tag", ["0292003", "1234567", "1e50000", "abc1234"])
def test_an_image_tag_that_looks_like_a_number_reaches_the_manifest_as_written(
        helm_bin: Path, tmp_path: Path, tag: str) -> None:
    # A short commit sha can be all digits (0292003): helm reads YAML 1.2, where unquoted
    # that is the number 292003 and the image would be hello-app:292003.
    chart = prepare_chart(SAMPLE_APP / "chart" / APP, tmp_path, name=APP,
                          version=f"1.0.0-rc{tag}",
                          values={"image.repository": "registry.example.com/hello-app",
                                  "image.tag": tag})
    out = subprocess.run([str(helm_bin), "template", APP, str(chart)], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    images = [c["image"] for doc in yaml.safe_load_all(out.stdout) if doc
              and doc["kind"] == "Deployment"
              for c in doc["spec"]["template"]["spec"]["containers"]]
    assert images == [f"registry.example.com/hello-app:{tag}"]
