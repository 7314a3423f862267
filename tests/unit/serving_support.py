"""In-process serving stack for API tests: the real Controller over a cluster without Ray.

`LocalCluster` implements the controller's `ClusterBackend` with instances living in this
process: each converts its checkpoint (`prepare_checkpoint`) and runs a real engine on its own
thread through the same `EngineRunner` the Ray instance actor uses; `LocalHandle` is the
`InstanceHandle` interface over one of them. Nothing here imitates the controller, the router
or the engine: only the Ray hop is skipped. A cluster with `cpus=0` has no room, so instances
stay pending forever (for queueing and timeout tests that need no engine). `nodes` names the
cluster's nodes (each with `cpus`): an instance runs "on" the node placement chose for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

from ember.api.app import create_app
from ember.api.config import ApiConfig
from ember.cluster.instance import InstanceReady
from ember.cluster.notices import NoticeConfig, NoticeWatcher
from ember.cluster.runner import EngineRunner, prepare_checkpoint
from ember.controller.controller import Controller
from ember.controller.types import (
    Continuation,
    DeploymentSpec,
    Extension,
    KvBlob,
    KvTicket,
    NodeInfo,
    StreamDelta,
    engine_counters,
)
from ember.errors import InstanceLostError
from ember.migration.transfer import MoveLink

NODE_ID = "local0000000000000000"
# Prompts an instance dies on POISON_AFTER_S after it is given one, before their first token
# (as if the request crashed its process in its prefill): a test adds them and removes them.
POISON: set[str] = set()
POISON_AFTER_S = 0.3


class LocalHandle:
    """The InstanceHandle interface over an engine runner in this process."""

    def __init__(
        self, spec: DeploymentSpec, instance_id: str, cache_root: str, node_id: str = NODE_ID
    ) -> None:
        self._spec = spec
        self._cache_root = cache_root
        self.instance_id = instance_id
        self.deployment = spec.name
        self.node_id: str | None = node_id
        self.in_flight = 0
        self.lost = False
        self.runner: EngineRunner | None = None
        self.aborted: list[str] = []
        self.exports: list[str] = []
        self.crashed = False
        self.engine_stats: dict[str, Any] | None = None
        self._queues: dict[str, asyncio.Queue[Any]] = {}

    async def start(self) -> InstanceReady:
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        path, tier = await loop.run_in_executor(
            None, prepare_checkpoint, self._spec, self._cache_root, NODE_ID
        )
        runner = await loop.run_in_executor(None, EngineRunner.create, self._spec, path)
        runner.start(loop)
        runner.share_kv("127.0.0.1")  # as the actor does: a move's K/V go runner to runner
        self.runner = runner
        node_id = self.node_id or NODE_ID
        return InstanceReady(node_id, str(path), time.perf_counter() - t0, 0, tier)

    async def generate(
        self, request_id: str, prompt: str | list[int] | Continuation, params: Any
    ) -> AsyncIterator[StreamDelta]:
        if self.lost or self.runner is None:
            raise InstanceLostError(f"instance {self.instance_id} is gone")
        text = prompt.prompt if isinstance(prompt, Continuation) else prompt
        if isinstance(text, str) and text in POISON:
            self.in_flight += 1
            try:
                await asyncio.sleep(POISON_AFTER_S)
                if not self.lost:
                    self.crash()
                raise InstanceLostError(f"instance {self.instance_id} died")
            finally:
                self.in_flight -= 1
        self.in_flight += 1
        runner = self.runner
        queue = self._queues[request_id] = runner.submit(request_id, prompt, params)
        finished = False
        try:
            while not finished:
                item = await queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    if isinstance(item, InstanceLostError):  # as InstanceHandle: replaced
                        self.lost = True
                    raise item
                finished = item.finished
                yield item
        finally:
            self.in_flight -= 1
            self._queues.pop(request_id, None)
            if not finished and not self.lost:
                runner.abort(request_id)
            runner.release(request_id)

    def crash(self) -> None:
        """As when the instance's process dies: its engine stops where it is; output already
        sent still arrives, then each request's stream raises InstanceLostError."""
        self.lost = True
        self.crashed = True
        self._end("died")

    def extend(self, request_id: str, extension: Extension) -> None:
        if self.lost or self.runner is None:
            raise InstanceLostError(f"instance {self.instance_id} is gone")
        self.runner.extend(request_id, extension)

    async def export(self, request_id: str, link: MoveLink) -> KvBlob | KvTicket | None:
        if self.lost or self.runner is None:
            raise InstanceLostError(f"instance {self.instance_id} is gone")
        self.exports.append(request_id)
        return await asyncio.wrap_future(self.runner.export(request_id, link))

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        if self.runner is not None:
            self.runner.abort(request_id)

    def stop(self) -> None:
        """As InstanceHandle.close with the actor's shutdown: requests still running end with
        InstanceLostError."""
        self._end("was stopped")

    def _end(self, why: str) -> None:
        """Stop the engine; every request still waiting gets InstanceLostError saying `why`."""
        runner, self.runner = self.runner, None
        if runner is not None:
            runner.stop()
        for queue in self._queues.values():
            queue.put_nowait(InstanceLostError(f"instance {self.instance_id} {why}"))


class LocalCluster:
    """A ClusterBackend whose instances live in this process (one node unless `nodes` names
    more; `notices` gives a node a cloud metadata service to watch)."""

    def __init__(
        self,
        cache_root: str | Path,
        cpus: float = 8.0,
        nodes: tuple[str, ...] = (NODE_ID,),
        notices: dict[str, NoticeConfig] | None = None,
        track_cpus: bool = False,
    ) -> None:
        self._cache_root = str(cache_root)
        self._cpus = cpus
        self._track_cpus = track_cpus  # a node's free CPUs less its instances' (1 each)
        self._nodes = nodes
        # Each node's cloud metadata, read the way a node store reads its own.
        self._watchers = {n: NoticeWatcher(c) for n, c in (notices or {}).items()}
        self.handles: dict[str, LocalHandle] = {}  # those not stopped
        self.every_handle: list[LocalHandle] = []
        self.launched = itertools.count()
        self.stopped: list[str] = []

    async def notices(self) -> dict[str, float]:
        loop = asyncio.get_running_loop()
        polls = [loop.run_in_executor(None, w.poll) for w in self._watchers.values()]
        found = dict(zip(self._watchers, await asyncio.gather(*polls), strict=True))
        return {n: s for n, s in found.items() if s is not None}

    def nodes(self) -> list[NodeInfo]:
        def free(node: str) -> float:
            if not self._track_cpus:
                return self._cpus
            used = sum(h.node_id == node for h in self.handles.values())
            return max(0.0, self._cpus - used * self.instance_cpus(None))  # type: ignore[arg-type]

        return [NodeInfo(n, "127.0.0.1", True, (), self._cpus, free(n)) for n in self._nodes]

    def instance_cpus(self, spec: DeploymentSpec) -> float:
        return 1.0

    def launch(self, spec: DeploymentSpec, instance_id: str, node_id: str | None) -> Any:
        handle = LocalHandle(spec, instance_id, self._cache_root, node_id or self._nodes[0])
        self.handles[instance_id] = handle
        self.every_handle.append(handle)
        next(self.launched)
        return handle

    async def wait_started(self, handle: Any, timeout_s: float) -> InstanceReady:
        if self._cpus <= 0:  # no room anywhere: the instance waits for capacity forever
            await asyncio.Event().wait()
        return await asyncio.wait_for(handle.start(), timeout_s)

    async def probe(self, handle: Any, timeout_s: float) -> bool:
        runner = handle.runner
        if runner is None or handle.lost:
            return False
        stats = runner.stats()
        handle.engine_stats = engine_counters(stats)
        return not stats["broken"]

    async def stop(self, handle: Any) -> None:
        await asyncio.get_running_loop().run_in_executor(None, handle.stop)
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
    cache_root: Path | None = None,
    nodes: tuple[str, ...] = (NODE_ID,),
    notices: dict[str, NoticeConfig] | None = None,
    probe_interval_s: float = 5.0,
    track_cpus: bool = False,
) -> AsyncIterator[Stack]:
    """The real controller (started) over a LocalCluster, and the app behind an ASGI client."""
    cluster = LocalCluster(
        cache_root or tmp_path / "cache", cpus=cpus, nodes=nodes, notices=notices,
        track_cpus=track_cpus,
    )  # fmt: skip
    controller = Controller(
        cluster,
        tmp_path / "deployments.sqlite",
        reconcile_interval_s=0.05,
        probe_interval_s=probe_interval_s,
    )
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
