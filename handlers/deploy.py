"""`uses: deploy`: render the repo's Helm chart for the built image and apply it to the dev
namespace, then wait for its rollouts.

Like the Cloud-Native Toolkit's `deploy` task: the one chart under `chart/` (`chart_dir`) is
copied, renamed to the app (version `1.0.0-rc<image tag>`), and its values set:
`nameOverride`/`fullnameOverride` = app name, `image.repository` / `image.tag` from build's
image, `vcsInfo.repoUrl` / `vcsInfo.branch`; `ingress.subdomain` / `ingress.tlsSecretName`
when configured. `helm lint` must pass; `helm template` renders it (release = app name).
Every object is server-side applied (field manager `cistate`) to `dev_namespace` (created if
missing), then each Deployment/StatefulSet is waited for (observed generation, updated and
available replicas) up to `rollout_timeout` seconds.

Inputs: setup's `app_name` and `branch`; build's `image_url` (setup's when build gave none).
Idempotent: applying the same objects again changes nothing.

Outputs:
- `namespace`: where the app was deployed
- `objects`: the applied objects as `Kind/name`, in apply order
- `service_port`: the port named `http` of the app's Service (else its first port), or null
"""

from __future__ import annotations

import asyncio
from typing import Any

from handlers import git
from handlers.base import StepFailed, StepRequest
from handlers.cd_settings import DeliverySettings, for_request
from handlers.helm import Helm, find_chart, prepare_chart
from handlers.kube import ROLLOUT_KINDS, Cluster, describe
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
    built = request.inputs.get("build", {}).get("image_url")
    image_url = str(built or request.output_of("setup", "image_url"))
    repository, tag = image_values(image_url)
    branch = str(request.inputs.get("setup", {}).get("branch") or git.branch_of(request.ref))
    namespace = settings.dev_namespace

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
    return await _apply(request, settings, app_name, namespace, apply_order(objects))


async def _apply(
    request: StepRequest,
    settings: DeliverySettings,
    app_name: str,
    namespace: str,
    objects: list[dict[str, Any]],
) -> dict[str, Any]:
    async with Cluster.connect(settings, request.log) as cluster:
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
