"""In-process serving stack for API tests: the real Controller over a cluster without Ray.

`LocalCluster` implements the controller's `ClusterBackend` with `InstanceActor` objects living
in this process (the same class Ray hosts in production: it converts the checkpoint and runs a
real engine on its own thread); `LocalHandle` is the `InstanceHandle` interface over one of
them. Nothing here imitates the controller, the router or the engine: only the Ray hop is
skipped. A cluster with `cpus=0` has no room, so instances stay pending forever (for queueing
and timeout tests that need no engine).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from ember.api.app import create_app
from ember.api.config import ApiConfig
from ember.cluster.instance import InstanceActor, InstanceReady
from ember.controller.controller import Controller
from ember.controller.types import DeploymentSpec, NodeInfo, StreamDelta

NODE_ID = "local0000000000000000"


class LocalHandle:
    """The InstanceHandle interface over an in-process InstanceActor."""

    def __init__(self, actor: InstanceActor, instance_id: str, deployment: str) -> None:
        self._actor = actor
        self.instance_id = instance_id
        self.deployment = deployment
        self.node_id: str | None = None
        self.in_flight = 0
        self.lost = False
        self.started: asyncio.Event = asyncio.Event()

    async def generate(
        self, request_id: str, prompt: str | list[int], params: Any
    ) -> AsyncIterator[StreamDelta]:
        self.in_flight += 1
        try:
            async for item in self._actor.generate(request_id, prompt, params):
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    break
        finally:
            self.in_flight -= 1

    async def abort(self, request_id: str) -> None:
        await self._actor.abort(request_id)

    async def stats(self) -> dict[str, Any]:
        return await self._actor.stats()


class LocalCluster:
    """A one-node ClusterBackend whose instances live in this process."""

    def __init__(self, cache_root: str | Path, cpus: float = 8.0) -> None:
        self._cache_root = str(cache_root)
        self._cpus = cpus
        self.handles: dict[str, LocalHandle] = {}
        self.launched = itertools.count()
        self.stopped: list[str] = []

    def nodes(self) -> list[NodeInfo]:
        return [NodeInfo(NODE_ID, "127.0.0.1", True, (), self._cpus, self._cpus)]

    def instance_cpus(self, spec: DeploymentSpec) -> float:
        return 1.0

    def launch(self, spec: DeploymentSpec, instance_id: str, node_id: str | None) -> Any:
        actor = InstanceActor(spec, instance_id, self._cache_root)
        handle = LocalHandle(actor, instance_id, spec.name)
        self.handles[instance_id] = handle
        next(self.launched)
        return handle

    async def wait_started(self, handle: Any, timeout_s: float) -> InstanceReady:
        if self._cpus <= 0:  # no room anywhere: the instance waits for capacity forever
            await asyncio.Event().wait()
        ready = await asyncio.wait_for(handle._actor.start(NODE_ID), timeout_s)
        handle.started.set()
        return ready

    async def stop(self, handle: Any) -> None:
        await handle._actor.shutdown()
        self.handles.pop(handle.instance_id, None)
        self.stopped.append(handle.instance_id)


class Stack:
    """A started controller, its cluster, the app and an HTTP client bound to the app."""

    def __init__(self, controller: Any, cluster: LocalCluster, app: Any, client: Any) -> None:
        self.controller = controller
        self.cluster = cluster
        self.app = app
        self.client = client


@contextlib.asynccontextmanager
async def serving(
    tmp_path: Path,
    specs: tuple[DeploymentSpec, ...] = (),
    config: ApiConfig | None = None,
    cpus: float = 8.0,
) -> AsyncIterator[Stack]:
    """The real controller (started) over a LocalCluster, and the app behind an ASGI client."""
    cluster = LocalCluster(tmp_path / "cache", cpus=cpus)
    controller = Controller(cluster, tmp_path / "deployments.sqlite", reconcile_interval_s=0.05)
    await controller.start()
    try:
        for spec in specs:
            controller.deploy(spec)
        app = create_app(controller, config or ApiConfig())
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://ember.test") as client:
            yield Stack(controller, cluster, app, client)
        await app.state.router.drain_background()
    finally:
        await controller.stop()
