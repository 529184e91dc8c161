"""Kubernetes for the handlers: connect, server-side apply arbitrary objects, watch rollouts.

kubernetes-asyncio's dynamic client finds each object's resource by discovery, so any kind
the cluster serves can be applied (CRDs included) without a typed API per kind. Objects are
applied with server-side apply (`PATCH` as `application/apply-patch+yaml`, field manager
`cistate`, conflicts forced: cistate owns what it deploys), which is idempotent. Whether a kind
lives in namespaces is the API server's discovery answer (`Cluster.namespaced`), else, when
discovery cannot say, the list of Kubernetes' own cluster-scoped kinds (`CLUSTER_KINDS`).

Access comes from the kubeconfig named by CISTATE_KUBECONFIG (`kubeconfig:`), else from the
pod's service account (in-cluster config). The apiserver's own message reaches every failure.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
from kubernetes_asyncio.client import ApiClient, Configuration
from kubernetes_asyncio.client.exceptions import ApiException
from kubernetes_asyncio.config import ConfigException, load_incluster_config, load_kube_config
from kubernetes_asyncio.dynamic import DynamicClient
from kubernetes_asyncio.dynamic.exceptions import (
    DynamicApiError,
    ResourceNotFoundError,
    ResourceNotUniqueError,
)
from kubernetes_asyncio.watch import Watch

from handlers.base import StepFailed, StepLog
from handlers.cd_settings import DeliverySettings

FIELD_MANAGER = "cistate"
REQUEST_TIMEOUT = 30.0
ROLLOUT_KINDS = frozenset({("apps/v1", "Deployment"), ("apps/v1", "StatefulSet")})
WATCH_SECONDS = 300  # how long one watch on a rollout lasts before it is renewed
# after a watch or a read failed: the next look waits this long, doubling up to the cap
_RESYNC_PAUSE = 0.1
_RESYNC_PAUSE_MAX = 2.0
# server errors and throttling: another attempt may succeed
_TRANSIENT = frozenset({429, 500, 502, 503, 504})
# An HTTP 500 whose message says the object itself is wrong: the same object fails the same
# way every time (Kubernetes 1.20's server-side apply answers 500 for a port without
# `protocol:`), so no retry is spent on it.
_INVALID_OBJECT = ("failed to create typed patch object", "omits key field", "is invalid",
                   "unknown field", "cannot be handled as a", "field not declared in schema")


# Kubernetes' own cluster-scoped kinds (1.20 to 1.31): the answer when discovery cannot give one.
CLUSTER_KINDS = frozenset({
    "APIService", "CertificateSigningRequest", "ClusterRole", "ClusterRoleBinding",
    "ComponentStatus", "CSIDriver", "CSINode", "CustomResourceDefinition", "FlowSchema",
    "IngressClass", "MutatingAdmissionPolicy", "MutatingAdmissionPolicyBinding",
    "MutatingWebhookConfiguration", "Namespace", "Node", "PersistentVolume", "PodSecurityPolicy",
    "PriorityClass", "PriorityLevelConfiguration", "RuntimeClass", "SelfSubjectAccessReview",
    "SelfSubjectReview", "SelfSubjectRulesReview", "StorageClass", "StorageVersion",
    "StorageVersionMigration", "SubjectAccessReview", "TokenReview", "ValidatingAdmissionPolicy",
    "ValidatingAdmissionPolicyBinding", "ValidatingWebhookConfiguration", "VolumeAttachment",
    "VolumeAttributesClass",
})


def describe(obj: dict[str, Any]) -> str:
    """`Deployment/hello-app`: how objects are named in outputs and messages."""
    return f"{obj.get('kind')}/{(obj.get('metadata') or {}).get('name')}"


class Cluster:
    def __init__(self, dynamic: DynamicClient, server: str, log: StepLog) -> None:
        self._dynamic = dynamic
        self.server = server
        self.log = log

    @classmethod
    @asynccontextmanager
    async def connect(cls, settings: DeliverySettings, log: StepLog) -> AsyncIterator[Cluster]:
        configuration = Configuration()
        try:
            if settings.kubeconfig is not None:
                await load_kube_config(
                    config_file=str(settings.kubeconfig),
                    context=settings.kube_context or None,
                    client_configuration=configuration,
                    persist_config=False,
                )
            else:
                load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
        except (ConfigException, OSError, ValueError) as exc:
            source = (
                f"kubeconfig {settings.kubeconfig}"
                if settings.kubeconfig is not None
                else "the in-cluster service account (no CISTATE_KUBECONFIG is set)"
            )
            raise StepFailed(
                f"cannot load cluster access from {source}: {exc}; set CISTATE_KUBECONFIG to "
                "a readable kubeconfig or run the worker in the cluster",
                retryable=False,
            ) from None
        server = str(configuration.host)
        async with ApiClient(configuration) as api:
            try:
                dynamic = await _guard(server, "discovery", lambda: DynamicClient(api))
            except StepFailed:
                raise
            except Exception as exc:  # the discoverer fails on odd answers (401, HTML)
                raise StepFailed(
                    f"the Kubernetes API at {server} did not answer API discovery "
                    f"({type(exc).__name__}: {exc}); check the kubeconfig's server and token",
                    retryable=True,
                ) from None
            yield cls(dynamic, server, log)

    async def _resource(self, api_version: str, kind: str) -> Any:
        try:
            return await _guard(
                self.server,
                f"discovery of {kind}",
                lambda: self._dynamic.resources.get(api_version=api_version, kind=kind),
            )
        except (ResourceNotFoundError, ResourceNotUniqueError):
            raise NotServed(self.server, api_version, kind) from None

    async def namespaced(self, api_version: str, kind: str) -> bool | None:
        """Whether objects of `kind` live in a namespace, by the API server's discovery; None
        when the server does not serve the kind. When discovery fails, Kubernetes' own list
        decides, so that a cluster-scoped object is still refused before anything is applied."""
        try:
            resource = await self._resource(api_version, kind)
        except NotServed:
            return None
        except StepFailed as failed:
            self.log.line(f"API discovery of {kind} failed ({failed.message}); taking its scope "
                          "from Kubernetes' list of cluster-scoped kinds")
            return kind not in CLUSTER_KINDS
        return bool(resource.namespaced)

    async def apply(self, obj: dict[str, Any], namespace: str) -> dict[str, Any]:
        """Server-side apply `obj` (into `namespace` when it is namespaced); the object as
        the apiserver stored it."""
        api_version, kind = str(obj["apiVersion"]), str(obj["kind"])
        resource = await self._resource(api_version, kind)
        body = json.loads(json.dumps(obj))  # a private copy
        metadata = body.setdefault("metadata", {})
        if resource.namespaced:
            metadata["namespace"] = namespace
        where = f" in namespace {namespace}" if resource.namespaced else ""
        return await _call(
            self.server,
            f"applying {describe(body)}{where}",
            lambda: self._dynamic.server_side_apply(
                resource,
                body=body,
                namespace=namespace if resource.namespaced else None,
                field_manager=FIELD_MANAGER,
                force_conflicts=True,
                serialize=False,
                _request_timeout=REQUEST_TIMEOUT,
            ),
        )

    async def get(
        self, api_version: str, kind: str, name: str, namespace: str | None
    ) -> dict[str, Any] | None:
        resource = await self._resource(api_version, kind)
        try:
            return await _call(
                self.server,
                f"reading {kind}/{name}",
                lambda: self._dynamic.get(
                    resource,
                    name=name,
                    namespace=namespace,
                    serialize=False,
                    _request_timeout=REQUEST_TIMEOUT,
                ),
                missing_ok=True,
            )
        except _Missing:
            return None

    async def ensure_namespace(self, namespace: str) -> None:
        existing = await self.get("v1", "Namespace", namespace, None)
        if existing is None:
            await self.apply(
                {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}, ""
            )
            self.log.line(f"created namespace {namespace}")

    async def wait_rollout(
        self,
        obj: dict[str, Any],
        namespace: str,
        *,
        within: float,
        interval: float,
        watch_seconds: int = WATCH_SECONDS,
    ) -> None:
        """Wait until the Deployment/StatefulSet `obj` has rolled out, or fail after `within` s.

        It reads the object once, then watches it from that read's resourceVersion, so a
        status change is seen as soon as the API server has it (no poll interval). A watch
        ends when the server closes it after `watch_seconds`, when it expires (410 Gone) or
        when the connection breaks; then the object is read again (the resync) and watched
        anew from there, so no change falls between two watches. Credentials that may `get`
        the object but not `watch` it make this a poll every `interval` seconds."""
        api_version, kind = str(obj["apiVersion"]), str(obj["kind"])
        name = str(obj["metadata"]["name"])
        resource = await self._resource(api_version, kind)
        rollout = _Rollout(self.log, kind, name, namespace)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        pause = _RESYNC_PAUSE  # before a look after a failure: doubles while failures repeat
        watching = True
        while True:
            try:
                current = await self.get(api_version, kind, name, namespace)
            except StepFailed as failed:
                # a resync after a broken watch meets the same trouble that broke it: look again
                if not failed.retryable or rollout.looks == 0 or loop.time() >= deadline:
                    raise
                self.log.line(f"reading {kind}/{name} again failed ({failed.message}); "
                              f"again in {pause:g}s")
                await asyncio.sleep(min(pause, max(deadline - loop.time(), 0.01)))
                pause = min(pause * 2, _RESYNC_PAUSE_MAX)
                continue
            if current is None:
                raise rollout.disappeared()
            if rollout.done(current):
                return
            if loop.time() >= deadline:
                raise rollout.timed_out(within)
            if not watching:
                await asyncio.sleep(min(interval, max(deadline - loop.time(), 0.01)))
                continue
            version = str((current.get("metadata") or {}).get("resourceVersion") or "")
            seconds = max(1, math.ceil(min(watch_seconds, deadline - loop.time())))
            try:
                async with asyncio.timeout_at(deadline):
                    ended = await self._watch(resource, rollout, version, seconds)
            except TimeoutError:
                if loop.time() < deadline:
                    raise
                continue  # the last look below says how far it got
            if ended is None:
                return
            if ended.forbidden:
                watching = False
                self.log.line(f"may not watch {kind}/{name} ({ended.why}): looking every "
                              f"{interval:g}s instead; give the deploy credentials the "
                              "`watch` verb on it to see the rollout at once")
                continue
            self.log.line(f"the watch on {kind}/{name} {ended.why}; reading it again")
            if ended.failed:
                await asyncio.sleep(min(pause, max(deadline - loop.time(), 0.01)))
                pause = min(pause * 2, _RESYNC_PAUSE_MAX)
            else:
                pause = _RESYNC_PAUSE

    async def _watch(
        self, resource: Any, rollout: _Rollout, version: str, seconds: int
    ) -> _WatchEnded | None:
        """Watch the object of `rollout` from `version` for at most `seconds`: None once it has
        rolled out, else why the watch ended."""
        started = time.monotonic()
        watcher = Watch()
        stream = watcher.stream(
            self._dynamic.get,
            resource,
            namespace=rollout.namespace,
            field_selector=f"metadata.name={rollout.name}",
            resource_version=version or None,
            timeout_seconds=seconds,
            allow_watch_bookmarks=True,
            serialize=False,
            # the server ends the watch after `seconds`; a connection silent for longer is dead
            _request_timeout=aiohttp.ClientTimeout(
                sock_connect=REQUEST_TIMEOUT, sock_read=seconds + REQUEST_TIMEOUT),
        )
        try:
            async with watcher:
                async for event in stream:
                    if event["type"] == "DELETED":
                        raise rollout.disappeared()
                    if event["type"] in ("ADDED", "MODIFIED") and rollout.done(
                            event["raw_object"]):
                        return None
        except ApiException as exc:
            status = int(exc.status or 0)
            why = f"HTTP {status} {exc.reason}"
            if status == 410:
                return _WatchEnded(f"expired ({why})")
            if status in (401, 403, 405):
                return _WatchEnded(why, forbidden=True)
            return _WatchEnded(f"was refused ({why})", failed=True)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return _WatchEnded(f"broke off ({type(exc).__name__}: {exc})".replace(" ()", ""),
                               failed=True)
        lasted = time.monotonic() - started
        if lasted < seconds - 1:  # closed early: a proxy or the server let go of it
            return _WatchEnded(f"was closed after {lasted:.1f}s", failed=True)
        return _WatchEnded(f"ended after {seconds}s")


class _Rollout:
    """What one rollout wait has seen: `done` reads each version of the object, logs each new
    state once and says whether it has rolled out."""

    def __init__(self, log: StepLog, kind: str, name: str, namespace: str) -> None:
        self.log, self.kind, self.name, self.namespace = log, kind, name, namespace
        self.looks = 0
        self.state = ""

    def done(self, current: dict[str, Any]) -> bool:
        self.looks += 1
        done, state = rollout_state(current)
        if done:
            self.log.line(f"{self.kind}/{self.name} rolled out: {state}")
        elif state != self.state:
            self.log.line(f"waiting for {self.kind}/{self.name} in {self.namespace}: {state}")
        self.state = state
        return done

    def disappeared(self) -> StepFailed:
        return StepFailed(
            f"{self.kind}/{self.name} disappeared from namespace {self.namespace} during its "
            "rollout",
            retryable=True,
        )

    def timed_out(self, within: float) -> StepFailed:
        return StepFailed(
            f"{self.kind}/{self.name} in namespace {self.namespace} did not roll out within "
            f"{within:g}s ({self.state}); check its pods' events and logs",
            retryable=True,
        )


@dataclass(frozen=True)
class _WatchEnded:
    """Why a watch ended before the rollout: `failed` when another at once may fail alike
    (the next look waits a little), `forbidden` when the credentials may not watch."""

    why: str
    failed: bool = False
    forbidden: bool = False


def rollout_state(obj: dict[str, Any]) -> tuple[bool, str]:
    """(rolled out?, what it is waiting for), like `kubectl rollout status`."""
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    generation = int((obj.get("metadata") or {}).get("generation") or 0)
    observed = int(status.get("observedGeneration") or 0)
    wanted = int(spec.get("replicas", 1) if spec.get("replicas") is not None else 1)
    updated = int(status.get("updatedReplicas") or 0)
    total = int(status.get("replicas") or 0)
    if obj.get("kind") == "StatefulSet" and status.get("availableReplicas") is None:
        available = int(status.get("readyReplicas") or 0)
    else:
        available = int(status.get("availableReplicas") or 0)
    for condition in status.get("conditions") or []:
        if condition.get("reason") == "ProgressDeadlineExceeded":
            raise StepFailed(
                f"{describe(obj)} exceeded its progress deadline: {condition.get('message')}",
                retryable=False,
            )
    if observed < generation:
        return False, f"generation {generation} not yet observed (observed {observed})"
    if updated < wanted:
        return False, f"{updated} of {wanted} replicas updated"
    if total > updated:
        return False, f"{total - updated} old replicas pending termination"
    if available < wanted:
        return False, f"{available} of {wanted} updated replicas available"
    return True, f"{available} of {wanted} replicas available at generation {generation}"


class _Missing(Exception):
    pass


class NotServed(StepFailed):
    """The API server does not serve a kind (its discovery does not know it)."""

    def __init__(self, server: str, api_version: str, kind: str) -> None:
        super().__init__(
            f"the Kubernetes API at {server} does not serve kind {kind} of apiVersion "
            f"{api_version} (a CRD not installed, or an API version removed from this "
            "cluster); fix the chart",
            retryable=False,
        )


async def _call(
    server: str, what: str, call: Callable[[], Any], *, missing_ok: bool = False
) -> dict[str, Any]:
    """One API request whose raw response is checked here: the dynamic client does not raise
    for error statuses when it does not decode the body itself."""
    response = await _guard(server, what, call, missing_ok=missing_ok)
    try:
        status = int(response.status)
        body = await response.read()
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise StepFailed(
            f"the Kubernetes API at {server} broke off ({what}): {type(exc).__name__}: {exc}",
            retryable=True,
        ) from None
    finally:
        response.release()
    if status == 404 and missing_ok:
        raise _Missing
    if not 200 <= status < 300:
        raise refusal(server, what, status, api_message(body) or "no details")
    decoded: dict[str, Any] = json.loads(body)
    return decoded


async def _guard(
    server: str, what: str, call: Callable[[], Any], *, missing_ok: bool = False
) -> Any:
    """Await `call()`, turning the client's errors into StepFailed that say what and where."""
    try:
        return await call()
    except DynamicApiError as exc:
        if missing_ok and exc.status == 404:
            raise _Missing from None
        raise refusal(server, what, int(exc.status), api_message(exc.body) or str(exc.reason)
                      ) from None
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise StepFailed(
            f"the Kubernetes API at {server} is unreachable ({what}): "
            f"{type(exc).__name__}: {exc}; check that the cluster is up and the kubeconfig "
            "points at it",
            retryable=True,
        ) from None


def refusal(server: str, what: str, status: int, message: str) -> StepFailed:
    """The API's refusal as a step failure: retryable only when another try can change it
    (throttling, an unavailable server), never for a 4xx or an object the server calls
    invalid; with what to change in the chart where that is known."""
    invalid = status == 500 and any(phrase in message for phrase in _INVALID_OBJECT)
    advice = ""
    if 'omits key field "protocol"' in message:
        advice = ("; add `protocol: TCP` (or UDP) to every port of the chart's Services and "
                  "containers: Kubernetes 1.20's server-side apply needs it")
    elif status == 403:
        advice = ("; cistate's cluster credentials may not do this: give them a Role that allows "
                  "it in the namespace (see the README's deploy credentials), or fix the chart")
    elif invalid or 400 <= status < 500:
        advice = "; the object is refused as it is: fix the chart (no retry can change this)"
    return StepFailed(
        f"the Kubernetes API at {server} refused {what}: HTTP {status} {message}{advice}",
        retryable=status in _TRANSIENT and not invalid,
    )


def api_message(body: Any) -> str:
    """The `message` of a Kubernetes Status body, else the body as text."""
    if isinstance(body, bytes):
        body = body.decode("utf-8", errors="replace")
    if not body:
        return ""
    try:
        status = json.loads(body)
    except (TypeError, ValueError):
        return str(body)[:2000]
    if isinstance(status, dict) and status.get("message"):
        return str(status["message"])
    return str(body)[:2000]
