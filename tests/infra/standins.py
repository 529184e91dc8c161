"""Stand-ins for the parts of a Kubernetes delivery that cannot run on this machine, shared by
the end-to-end tests (tests/e2e/conftest.py) and the quickstart (scripts/quickstart.py).

The kube-apiserver here has no kubelet, scheduler or controller-manager, and there is no
container engine (tests/infra/README.md). So:
- `KubeletStandIn` plays the kubelet and the deployment controller: it reports every new
  Deployment generation as rolled out;
- `serve_image` runs an app's image as its pod would, with `buildah from` + `buildah run`;
- `PodStandIn` plays the kubelet running the pod: it serves the image a Deployment's spec
  names that way, and again whenever the spec names another one. It is the one pod stand-in:
  the pipeline test (tests/e2e/test_pipeline.py) and the quickstart both use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Self

from kubernetes_asyncio.client import ApiClient, AppsV1Api
from kubernetes_asyncio.client.exceptions import ApiException


class StandInError(RuntimeError):
    """A stand-in could not do its part; the message says what failed."""


class _Polling:
    """A stand-in that polls the kube-apiserver in a task of its own while `async with` it:
    `_loop` runs from `__aenter__` until `__aexit__` cancels it (an error it raised is raised
    there)."""

    _task: asyncio.Task[None] | None = None

    async def _loop(self) -> None:
        raise NotImplementedError

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self._loop())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


class KubeletStandIn(_Polling):
    """Plays the kubelet and the deployment controller (neither runs here): every Deployment
    in the namespace whose generation is not yet observed gets a status saying all its
    replicas are updated and available, as a real cluster reports once the pods are ready.
    With `prefix=True`, in every namespace whose name starts with `namespace` (one per branch,
    named by a template). Looks every `interval` seconds; with `delay`, reports a generation
    that many seconds after it first saw it (pods that take a while to become ready), and
    `patched_at` has the time (time.monotonic) of each report."""

    def __init__(self, api: ApiClient, namespace: str, *, prefix: bool = False,
                 interval: float = 0.1, delay: float = 0.0) -> None:
        self.apps = AppsV1Api(api)
        self.namespace = namespace
        self.prefix = prefix
        self.interval = interval
        self.delay = delay
        self.patched: list[tuple[str, int]] = []
        self.patched_at: list[float] = []
        self.namespaces: set[str] = set()  # where it patched a Deployment
        self._seen: dict[tuple[str, str, int], float] = {}  # generation -> first seen

    async def _loop(self) -> None:
        while True:
            if self.prefix:
                found = await self.apps.list_deployment_for_all_namespaces()
            else:
                found = await self.apps.list_namespaced_deployment(self.namespace)
            for deployment in found.items:
                namespace = deployment.metadata.namespace
                if not namespace.startswith(self.namespace):
                    continue
                generation = deployment.metadata.generation
                status = deployment.status
                if status is not None and (status.observed_generation or 0) >= generation:
                    continue
                seen = self._seen.setdefault(
                    (namespace, deployment.metadata.name, generation), time.monotonic())
                if time.monotonic() - seen < self.delay:
                    continue
                replicas = deployment.spec.replicas or 1
                # Recorded before the report is sent: the step that waits sees the status as
                # soon as the apiserver has it and may leave this context (cancelling the
                # loop) before the patch's response comes back here.
                report = (deployment.metadata.name, generation)
                self.patched.append(report)
                self.patched_at.append(time.monotonic())
                self.namespaces.add(namespace)
                try:
                    await self.apps.patch_namespaced_deployment_status(
                        deployment.metadata.name,
                        namespace,
                        {
                            "status": {
                                "observedGeneration": generation,
                                "replicas": replicas,
                                "updatedReplicas": replicas,
                                "readyReplicas": replicas,
                                "availableReplicas": replicas,
                            }
                        },
                    )
                except Exception:
                    self.patched.pop()  # not reported after all
                    self.patched_at.pop()
                    raise
            await asyncio.sleep(self.interval)


def buildah(storage: Path) -> list[str]:
    """buildah with its own image store under `storage`, apart from the machine's default."""
    return ["buildah", "--root", str(storage / "root"), "--runroot", str(storage / "run"),
            "--storage-driver", "vfs"]


@contextlib.contextmanager
def serve_image(image: str, port: int, builder_storage: Path) -> Iterator[int]:
    """Run the app's image as its pod would (no container engine here): `buildah from` +
    `buildah run` of busybox httpd on the host network, serving the image's /www on
    127.0.0.1:`port`. Yields the pid of `buildah run` (the leader of its process group)."""
    base = buildah(builder_storage)
    done = subprocess.run(
        [*base, "from", "--tls-verify=false", image], capture_output=True, text=True, timeout=120
    )
    if done.returncode != 0:
        raise StandInError(f"buildah from {image} failed: {done.stderr.strip()[-2000:]}")
    container = done.stdout.strip().splitlines()[-1]
    server = subprocess.Popen(
        [*base, "run", "--isolation", "chroot", container, "--",
         "httpd", "-f", "-p", f"127.0.0.1:{port}", "-h", "/www"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        yield server.pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        subprocess.run([*base, "rm", container], capture_output=True, timeout=60)


class PodStandIn(_Polling):
    """Stands in for the kubelet running the pod of Deployment `name` in `namespace`: the
    kube-apiserver here has no kubelet (and there is no container engine), so nothing would
    run the image a Deployment names and an Ingress or health check would find no app. This
    reads the image from the Deployment's spec, as a kubelet would once the pod is scheduled,
    and runs it with `serve_image` on 127.0.0.1:`port`; when the spec names another image (a
    new deploy), it stops that one and runs the new one. An image that cannot be run is not
    tried again until the spec names another.

    `report` gets one line per change, and the reason when an image cannot be run; `served`
    lists every image it ran, in order, and `failures` every reason, both kept after the
    `async with` (when `image` is "" again). Looks every `interval` seconds."""

    def __init__(self, api: ApiClient, namespace: str, name: str, port: int, storage: Path,
                 *, interval: float = 0.5, report: Callable[[str], None] = lambda _: None,
                 ) -> None:
        self.apps = AppsV1Api(api)
        self.namespace = namespace
        self.name = name
        self.port = port
        self.storage = storage
        self.interval = interval
        self.report = report
        self.image = ""  # the image being served, "" when none
        self.pid: int | None = None  # its `buildah run`
        self.served: list[str] = []  # every image it ran, in order
        self.failures: list[str] = []  # why an image could not be run, one line each
        self._serving: contextlib.ExitStack | None = None

    async def __aexit__(self, *exc: object) -> None:
        await super().__aexit__(*exc)
        await self._stop()

    async def _loop(self) -> None:
        tried = ""  # the last image asked for: one that cannot run is not tried again
        while True:
            try:
                deployment = await self.apps.read_namespaced_deployment(self.name,
                                                                        self.namespace)
            except ApiException as exc:
                if exc.status != 404:
                    raise
            else:
                wanted = deployment.spec.template.spec.containers[0].image
                if wanted != tried:
                    tried = wanted
                    await self._stop()
                    await self._start(wanted)
            await asyncio.sleep(self.interval)

    async def _start(self, image: str) -> None:
        stack = contextlib.ExitStack()
        # `buildah from` runs in a thread: wait for it even when cancelled meanwhile, so that
        # the server it may start is always known and stopped
        starting = asyncio.ensure_future(
            asyncio.to_thread(stack.enter_context, serve_image(image, self.port, self.storage)))
        try:
            pid = await asyncio.shield(starting)
        except asyncio.CancelledError:
            with contextlib.suppress(StandInError):
                await starting
            await asyncio.to_thread(stack.close)
            raise
        except StandInError as exc:
            self.failures.append(f"cannot run {image}: {exc}")
            self.report(self.failures[-1])
            return
        self._serving, self.image, self.pid = stack, image, pid
        self.served.append(image)
        self.report(f"runs {image} on 127.0.0.1:{self.port} (buildah run, pid {pid})")

    async def _stop(self) -> None:
        if self._serving is not None:
            await asyncio.to_thread(self._serving.close)
            self.report(f"stopped {self.image} (pid {self.pid})")
            self._serving, self.image, self.pid = None, "", None
