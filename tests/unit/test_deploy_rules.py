"""What a deploy may apply, and where: the checks made before anything reaches the cluster."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest

from handlers.base import StepFailed, StepLog, StepRequest
from handlers.cd_settings import for_request
from handlers.deploy import chart_scopes, flatten, refusals
from handlers.kube import Cluster
from handlers.sandbox import Sandbox, SandboxSettings

pytestmark = pytest.mark.unit

NAMESPACED = {
    ("v1", "ConfigMap"): True,
    ("apps/v1", "Deployment"): True,
    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"): False,
    ("v1", "Namespace"): False,
}


def obj(api_version: str, kind: str, name: str, namespace: str | None = None) -> dict[str, Any]:
    metadata: dict[str, Any] = {"name": name}
    if namespace is not None:
        metadata["namespace"] = namespace
    return {"apiVersion": api_version, "kind": kind, "metadata": metadata}


def test_namespaced_objects_in_no_namespace_or_their_own_are_allowed() -> None:
    objects = [obj("v1", "ConfigMap", "a"), obj("v1", "ConfigMap", "b", "dev"),
               obj("apps/v1", "Deployment", "c", "")]
    assert refusals(objects, NAMESPACED, "dev", frozenset()) == []


def test_cluster_scoped_and_foreign_namespace_objects_are_named() -> None:
    objects = [obj("rbac.authorization.k8s.io/v1", "ClusterRoleBinding", "admin"),
               obj("v1", "ConfigMap", "planted", "kube-system"),
               obj("v1", "Namespace", "other")]
    assert refusals(objects, NAMESPACED, "dev", frozenset()) == [
        "ClusterRoleBinding/admin (cluster-scoped)",
        "ConfigMap/planted (in namespace kube-system, not dev)",
        "Namespace/other (cluster-scoped)",
    ]


def test_an_allowed_cluster_kind_passes_and_allows_no_other() -> None:
    objects = [obj("rbac.authorization.k8s.io/v1", "ClusterRoleBinding", "admin"),
               obj("v1", "Namespace", "other")]
    assert refusals(objects, NAMESPACED, "dev", frozenset({"ClusterRoleBinding"})) == [
        "Namespace/other (cluster-scoped)"]


def test_the_items_of_a_list_are_checked_as_themselves() -> None:
    hidden = obj("rbac.authorization.k8s.io/v1", "ClusterRoleBinding", "admin")
    nested = {"apiVersion": "v1", "kind": "List",
              "items": [obj("v1", "ConfigMap", "a"),
                        {"apiVersion": "v1", "kind": "List", "items": [hidden]}]}
    flat = flatten([nested, obj("v1", "ConfigMap", "b")])
    assert [o["metadata"]["name"] for o in flat] == ["a", "admin", "b"]
    assert refusals(flat, NAMESPACED, "dev", frozenset()) == [
        "ClusterRoleBinding/admin (cluster-scoped)"]
    with pytest.raises(StepFailed, match="item without kind/apiVersion"):
        flatten([{"apiVersion": "v1", "kind": "List", "items": [{"metadata": {}}]}])


def test_the_charts_own_crds_give_their_kinds_scope() -> None:
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.example.com"},
        "spec": {"group": "example.com", "scope": "Namespaced", "names": {"kind": "Widget"},
                 "versions": [{"name": "v1"}, {"name": "v2"}]},
    }
    legacy = {
        "apiVersion": "apiextensions.k8s.io/v1beta1",
        "kind": "CustomResourceDefinition",
        "spec": {"group": "example.com", "scope": "Cluster", "names": {"kind": "Gadget"},
                 "version": "v1alpha1"},
    }
    assert chart_scopes([crd, legacy, obj("v1", "ConfigMap", "a")]) == {
        ("example.com/v1", "Widget"): True,
        ("example.com/v2", "Widget"): True,
        ("example.com/v1alpha1", "Gadget"): False,
    }


def request_with(tmp_path: Path, settings: dict[str, object]) -> StepRequest:
    sandbox = Sandbox(settings=SandboxSettings(), attempt=tmp_path / "attempt", identity={})
    return StepRequest(
        run_id="r", repo="https://git.example.com/app.git", ref="refs/heads/main",
        commit="a" * 40, step="deploy", attempt=1, settings=settings, script=None, inputs={},
        workdir=tmp_path, log=StepLog(), sandbox=sandbox,
    )


def test_allowed_cluster_kinds_come_from_the_environment_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CISTATE_DEPLOY_ALLOW_CLUSTER_KINDS",
                       " ClusterRole,CustomResourceDefinition ,")
    assert for_request(request_with(tmp_path, {})).deploy_allow_cluster_kinds == {
        "ClusterRole", "CustomResourceDefinition"}
    for key in ("deploy_allow_cluster_kinds", "deploy-allow-cluster-kinds"):
        with pytest.raises(StepFailed) as info:
            for_request(request_with(tmp_path, {key: "ClusterRoleBinding"}))
        assert "CISTATE_DEPLOY_ALLOW_CLUSTER_KINDS" in info.value.message
        assert info.value.retryable is False


def test_allowed_cluster_kinds_must_be_spelled_as_kinds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CISTATE_DEPLOY_ALLOW_CLUSTER_KINDS", "ClusterRole,cluster-role")
    with pytest.raises(StepFailed, match="'cluster-role' are not Kubernetes kinds"):
        for_request(request_with(tmp_path, {}))


class _UnreachableDiscovery:
    """A dynamic client whose discovery of a kind cannot reach the API server."""

    class resources:  # the attribute of the dynamic client that discovers
        @staticmethod
        async def get(**_: str) -> None:
            raise aiohttp.ClientConnectionError("connection reset")


async def test_without_discovery_kubernetes_own_list_decides_the_scope() -> None:
    log = StepLog()
    cluster = Cluster(_UnreachableDiscovery(), "https://k8s.example:6443", log)  # type: ignore[arg-type]
    assert await cluster.namespaced("rbac.authorization.k8s.io/v1", "ClusterRoleBinding") is False
    assert await cluster.namespaced("v1", "Namespace") is False
    assert await cluster.namespaced("v1", "ConfigMap") is True
    assert "taking its scope from Kubernetes' list" in log.text()
