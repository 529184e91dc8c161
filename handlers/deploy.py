"""`uses: deploy`: render the repo's Helm chart for the built image and apply it to the dev
namespace, then wait for its rollouts.

Like the Cloud-Native Toolkit's `deploy` task: the one chart under `chart/` (`chart_dir`) is
copied, renamed to the app (version `1.0.0-rc<image tag>`), and its values set:
`nameOverride`/`fullnameOverride` = app name, `image.repository` / `image.tag` from build's
image, `vcsInfo.repoUrl` / `vcsInfo.branch`; `ingress.subdomain` / `ingress.tlsSecretName`
when configured. `helm lint` must pass; `helm template` renders it (release = app name).
Every object is server-side applied (field manager `cistate`) to the dev namespace (created
if missing), then each Deployment/StatefulSet is waited for (observed generation, updated and
available replicas) up to `rollout_timeout` seconds.

The dev namespace is `dev_namespace` (`with: namespace`, CISTATE_DEV_NAMESPACE; `dev`), a name
or a template of the run's `${branch}`, `${app}` and `${short_sha}`: `dev-${branch}` gives each
branch a namespace of its own, so a feature branch never replaces main's deployment (see
`handlers.cd_settings.render_namespace`: `feature/Login_Page` ->
`dev-feature-login-page-<8 hex digits>`, a valid, unique name of at most 63 characters).

The chart is the pushed repo's, so before anything is applied every object is checked: a
cluster-scoped one (by the API server's discovery) is refused unless its kind is listed in
`deploy_allow_cluster_kinds` (CISTATE_DEPLOY_ALLOW_CLUSTER_KINDS, environment only), and a
namespaced one whose `metadata.namespace` names another namespace (another branch's too) is
refused; the step then fails, naming them, without retries. The items of a `List` are checked
one by one.

Inputs: setup's `app_name` and `branch`; build's `image_url` (setup's when build gave none).
Idempotent: applying the same objects again changes nothing.

Outputs:
- `namespace`: where the app was deployed (the rendered dev namespace; health looks there)
- `objects`: the applied objects as `Kind/name`, in apply order
- `service_port`: the port named `http` of the app's Service (else its first port), or null
"""

from __future__ import annotations

import asyncio
from collections.abc import Collection, Mapping
from typing import Any

from handlers import git
from handlers.base import StepFailed, StepRequest
from handlers.cd_settings import DeliverySettings, for_request
from handlers.helm import Helm, find_chart, prepare_chart
from handlers.kube import ROLLOUT_KINDS, Cluster, NotServed, describe
from handlers.registry import ImageRef

# helm's install order: what others depend on goes first
_ORDER = [
    "Namespace",
    "NetworkPolicy",
    "ResourceQuota",
    "LimitRange",
    "PodSecurityPolicy",
    "PodDisruptionBudget",
    "ServiceAccount",
    "Secret",
    "SecretList",
    "ConfigMap",
    "StorageClass",
    "PersistentVolume",
    "PersistentVolumeClaim",
    "CustomResourceDefinition",
    "ClusterRole",
    "ClusterRoleList",
    "ClusterRoleBinding",
    "ClusterRoleBindingList",
    "Role",
    "RoleList",
    "RoleBinding",
    "RoleBindingList",
    "Service",
    "DaemonSet",
    "Pod",
    "ReplicationController",
    "ReplicaSet",
    "Deployment",
    "HorizontalPodAutoscaler",
    "StatefulSet",
    "Job",
    "CronJob",
    "IngressClass",
    "Ingress",
    "APIService",
]


# how many refused objects a failure names
_SHOWN = 10


def flatten(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The objects with every `List` (v1 List, ConfigMapList, ...) replaced by its items, so
    that each item is checked and applied as itself."""
    flat: list[dict[str, Any]] = []
    for obj in objects:
        items = obj.get("items")
        if str(obj.get("kind", "")).endswith("List") and isinstance(items, list):
            for item in items:
                if not isinstance(item, dict) or not item.get("kind") or not item.get("apiVersion"):
                    raise StepFailed(
                        f"{describe(obj)} of the chart has an item without kind/apiVersion",
                        retryable=False,
                    )
            flat.extend(flatten(items))
        else:
            flat.append(obj)
    return flat


def chart_scopes(objects: list[dict[str, Any]]) -> dict[tuple[str, str], bool]:
    """(apiVersion, kind) -> namespaced, for the kinds the chart's own CustomResourceDefinitions
    define: the API server serves them only once the definition is applied."""
    scopes: dict[tuple[str, str], bool] = {}
    for obj in objects:
        if obj.get("kind") != "CustomResourceDefinition":
            continue
        spec = obj.get("spec") or {}
        kind = str((spec.get("names") or {}).get("kind") or "")
        versions = [str(v.get("name")) for v in spec.get("versions") or [] if isinstance(v, dict)]
        if spec.get("version"):  # apiextensions.k8s.io/v1beta1
            versions.append(str(spec["version"]))
        for version in versions:
            scopes[(f"{spec.get('group')}/{version}", kind)] = spec.get("scope") == "Namespaced"
    return scopes


def refusals(
    objects: list[dict[str, Any]],
    namespaced: Mapping[tuple[str, str], bool],
    namespace: str,
    allowed_cluster_kinds: Collection[str],
) -> list[str]:
    """The objects the dev environment does not allow, each as `Kind/name (why)`: cluster-scoped
    ones of kinds not allowed, and namespaced ones placed into another namespace."""
    refused = []
    for obj in objects:
        kind = str(obj.get("kind"))
        own = (obj.get("metadata") or {}).get("namespace")
        if not namespaced[(str(obj.get("apiVersion")), kind)]:
            if kind not in allowed_cluster_kinds:
                refused.append(f"{describe(obj)} (cluster-scoped)")
        elif own not in (None, "", namespace):
            refused.append(f"{describe(obj)} (in namespace {own}, not {namespace})")
    return refused


def apply_order(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rank = {kind: i for i, kind in enumerate(_ORDER)}
    return sorted(objects, key=lambda o: rank.get(str(o.get("kind")), len(_ORDER)))


def image_values(image_url: str) -> tuple[str, str]:
    """`host/ns/app:tag` -> (`host/ns/app`, `tag`)."""
    ref = ImageRef.parse(image_url)
    if not ref.tag:
        raise StepFailed(f"image {image_url!r} has no tag to deploy", retryable=False)
    return f"{ref.host}/{ref.repository}", ref.tag


def service_port(objects: list[dict[str, Any]], app_name: str) -> int | None:
    services = [o for o in objects if o.get("kind") == "Service"]
    named = [s for s in services if (s.get("metadata") or {}).get("name") == app_name]
    for service in named or services:
        ports = (service.get("spec") or {}).get("ports") or []
        for port in ports:
            if port.get("name") == "http":
                return int(port["port"])
        if ports:
            return int(ports[0]["port"])
    return None


async def run(request: StepRequest) -> dict[str, Any]:
    git.validate_request(request)
    settings = for_request(request)
    app_name = str(request.output_of("setup", "app_name"))
    built = request.outputs_from("build").get("image_url")
    image_url = str(built or request.output_of("setup", "image_url"))
    repository, tag = image_values(image_url)
    branch = str(request.outputs_from("setup").get("branch") or git.branch_of(request.ref))
    namespace = settings.namespace_for(request)

    source = await git.checkout(request)
    chart = find_chart(source, settings.chart_dir)
    shown = str(chart.relative_to(source))
    prepared = prepare_chart(
        chart,
        request.workdir / "chart",
        name=app_name,
        version=f"1.0.0-rc{tag}",
        values={
            "nameOverride": app_name,
            "fullnameOverride": app_name,
            "vcsInfo.repoUrl": git.redact(request.repo),
            "vcsInfo.branch": branch,
            "image.repository": repository,
            "image.tag": tag,
        },
    )
    helm = Helm(settings.helm, request)
    await helm.lint(prepared, shown)
    extra = {}
    if settings.ingress_subdomain:
        extra["ingress.subdomain"] = settings.ingress_subdomain
    if settings.ingress_tls_secret:
        extra["ingress.tlsSecretName"] = settings.ingress_tls_secret
    objects = await helm.template(
        app_name,
        prepared,
        namespace=namespace,
        out=request.workdir / "rendered",
        set_values=extra,
        shown=shown,
    )
    if not objects:
        raise StepFailed(f"the chart {shown} renders no objects", retryable=False)
    return await _apply(request, settings, namespace, app_name, shown,
                        apply_order(flatten(objects)))


async def _apply(
    request: StepRequest,
    settings: DeliverySettings,
    namespace: str,
    app_name: str,
    shown: str,
    objects: list[dict[str, Any]],
) -> dict[str, Any]:
    async with Cluster.connect(settings, request.log) as cluster:
        namespaced = await _scopes(cluster, objects)
        refused = refusals(objects, namespaced, namespace, settings.deploy_allow_cluster_kinds)
        if refused:
            more = f" and {len(refused) - _SHOWN} more" if len(refused) > _SHOWN else ""
            raise StepFailed(
                f"the chart {shown} has objects a deploy to namespace {namespace} may not "
                f"apply: {', '.join(refused[:_SHOWN])}{more}; nothing was applied. A deploy "
                "applies only namespaced objects, into its own namespace: remove these from "
                "the chart (or their metadata.namespace); a cluster-scoped kind the cluster's "
                "admin trusts can be allowed in CISTATE_DEPLOY_ALLOW_CLUSTER_KINDS on the worker",
                retryable=False,
            )
        await cluster.ensure_namespace(namespace)
        applied = []
        for obj in objects:
            stored = await cluster.apply(obj, namespace)
            request.log.line(f"applied {describe(stored)} to namespace {namespace}")
            applied.append(stored)
        rollouts = [
            cluster.wait_rollout(
                obj,
                namespace,
                within=settings.rollout_timeout,
                interval=settings.rollout_interval,
                watch_seconds=settings.rollout_watch_seconds,
            )
            for obj in applied
            if (obj.get("apiVersion"), obj.get("kind")) in ROLLOUT_KINDS
        ]
        await asyncio.gather(*rollouts)
    return {
        "namespace": namespace,
        "objects": [describe(obj) for obj in applied],
        "service_port": service_port(applied, app_name),
    }


async def _scopes(cluster: Cluster, objects: list[dict[str, Any]]
                  ) -> dict[tuple[str, str], bool]:
    """(apiVersion, kind) -> namespaced, for every kind of `objects`; a kind neither the
    cluster nor the chart's own CRDs define fails the step before anything is applied."""
    defined = chart_scopes(objects)
    scopes: dict[tuple[str, str], bool] = {}
    for key in dict.fromkeys((str(o["apiVersion"]), str(o["kind"])) for o in objects):
        served = await cluster.namespaced(*key)
        if served is None:
            if key not in defined:
                raise NotServed(cluster.server, *key)
            served = defined[key]
        scopes[key] = served
    return scopes
