"""Pre-started, model-less engine workers: a cold start costs loading plus the first token, not
a process start and imports.

On a small model, starting a process and importing torch, the model code and the tokenizer
library takes longer than loading the weights from DRAM. `PooledInstanceActor` is an
`InstanceActor` started before any deployment needs it: its constructor imports everything
the engine needs and holds no model. `WorkerPool` (driver side, used by `RayCluster`) keeps
`size` of them per node; `take(node_id)` hands one over (the caller `assign`s it a deployment
and calls `start` as for any instance) and starts its replacement, at once or, with
`refill=False`, when the caller says (`fill`; `NodeServices` does once the start has ended).

A pooled worker loads its checkpoint through the node store (`acquire_on_this_node`), so on a
CPU node its weights are views into the DRAM tier's shared memory (zero copy) and the DRAM copy
stays pinned while the instance lives. Idle workers reserve no Ray CPU (they only cost memory;
see docs/node-store.md for the measured figure).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ember.cluster.adapter import NAMESPACE, ActorRef
from ember.cluster.instance import InstanceActor, InstanceReady
from ember.controller.types import DeploymentSpec
from ember.errors import DeploymentError

if TYPE_CHECKING:
    from ember.cluster.runner import EngineRunner

logger = logging.getLogger(__name__)

POOL_PREFIX = "ember-pool:"
ASSIGN_TIMEOUT_S = 60.0


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    pid: int
    warm_s: float  # imports done in the constructor
    rss_bytes: int  # resident memory while idle (counts shared library pages in full)
    uss_bytes: int  # memory only this process holds: what one more idle worker costs


class PooledInstanceActor(InstanceActor):
    """An instance actor without a deployment yet; `assign` gives it one."""

    def __init__(self, cache_root: str, device: str = "cpu", pack_weights: bool = True) -> None:
        import ember.cluster.runner  # noqa: F401  # the point: pay for imports before a request

        super().__init__(cast(DeploymentSpec, None), "", cache_root, device)
        self._pack_weights = pack_weights
        self._warm_s = _warm_on_a_thread_of_its_own(device)
        self._source: str | None = None
        self._timings: dict[str, float | str] = {}
        self._assigned = asyncio.Event()

    async def info(self) -> WorkerInfo:
        rss, uss = _memory_bytes()
        return WorkerInfo(os.getpid(), self._warm_s, rss, uss)

    async def start_timings(self) -> dict[str, float | str]:
        """Where `start` spent its time: store_s (node store: fetch or DRAM hit), served_from,
        engine_s (engine construction on the DRAM copy: model, tokenizer, KV cache)."""
        return dict(self._timings)

    async def assign(self, spec: DeploymentSpec, instance_id: str) -> None:
        if self._spec is not None:
            raise DeploymentError(f"pooled worker already serves {self._instance_id}")
        self._spec, self._instance_id = spec, instance_id
        self._assigned.set()

    async def start(self) -> InstanceReady:
        """Load through this node's store (DRAM tier, zero copy on CPU), then start the engine."""
        if self._ready is not None:
            return self._ready
        try:  # assign() was sent first, but an async actor may run the two in either order
            await asyncio.wait_for(self._assigned.wait(), ASSIGN_TIMEOUT_S)
        except asyncio.TimeoutError:
            raise DeploymentError(
                f"pooled worker was not assigned a deployment within {ASSIGN_TIMEOUT_S:g} s"
            ) from None
        from ember.cluster.adapter import current_node_id
        from ember.cluster.node_store_actor import (
            acquire_on_this_node,
            confirm_on_this_node,
            release_on_this_node,
        )
        from ember.cluster.runner import prepare_checkpoint
        from ember.store.shm import settled_path

        t0 = time.perf_counter()
        node_id = current_node_id()
        loop = asyncio.get_running_loop()
        source = self._spec.source
        if not source.startswith("s3://"):  # a local folder: convert once, then cache in DRAM
            converted, _ = await loop.run_in_executor(
                None, prepare_checkpoint, self._spec, self._cache_root, node_id
            )
            source = str(converted)
        t_fetch = time.perf_counter()
        # Streaming: the engine is built while the fetch runs; its weights map chunk by chunk. A
        # copy already in DRAM is handed out before the source is asked whether it still holds
        # that version: the question (a round trip to S3) overlaps the engine's build.
        overlap = os.environ.get("EMBER_CONFIRM_CACHE_FIRST", "0") in ("0", "")
        report = await acquire_on_this_node(source, streaming=True, trust_cache=overlap)
        self._timings["store_s"] = time.perf_counter() - t_fetch
        self._timings["served_from"] = report.served_from if report else "disk"
        t_engine = time.perf_counter()
        if report is None and source.startswith("s3://"):
            raise DeploymentError(f"{source}: no node store on node {node_id[:12]} to fetch it")
        path = settled_path(report.path) if report is not None else Path(source)
        self._source = source if report is not None else None
        runner, path = await self._build(path)
        if report is not None and report.unconfirmed:
            t_confirm = time.perf_counter()
            current = await confirm_on_this_node(source)
            self._timings["confirm_wait_s"] = time.perf_counter() - t_confirm
            if not current:  # an older version (pushed again in place): fetch the new one
                logger.warning("dram copy of %s is of an older version; fetching it again", source)
                await loop.run_in_executor(None, runner.stop)
                await release_on_this_node(source)
                report = await acquire_on_this_node(source, streaming=True)
                assert report is not None
                self._timings["served_from"] = report.served_from
                runner, path = await self._build(settled_path(report.path))
        self._run(runner, loop)
        self._timings["engine_s"] = time.perf_counter() - t_engine
        tier = report.served_from if report is not None else "disk"
        self._ready = InstanceReady(node_id, str(path), time.perf_counter() - t0, os.getpid(), tier)
        logger.info(
            "instance ready id=%s deployment=%s node=%s load_s=%.3f from=%s pooled=true",
            self._instance_id, self._spec.name, node_id[:12], self._ready.load_s,
            report.served_from if report else "disk",
        )  # fmt: skip
        return self._ready

    async def _build(self, path: Path) -> tuple[EngineRunner, Path]:
        """The engine over `path`, and the path it read."""
        from ember.errors import CheckpointNotFoundError
        from ember.store.shm import settled_path

        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(None, self._runner_for, path), path
        except (CheckpointNotFoundError, FileNotFoundError):
            # The fetch committed while the engine read the in-progress path (the directory
            # was between its rename and the link left in its place): the complete one.
            settled = settled_path(path)
            if settled == path:
                raise
            return await loop.run_in_executor(None, self._runner_for, settled), settled

    def _runner_for(self, path: Path) -> EngineRunner:
        """`EngineRunner.create`'s engine, with `pack_weights` chosen by the pool: unpacked,
        the weights stay views of the DRAM tier (no copy, shared by every instance of the model
        on the node); packed, each instance re-lays them out for oneDNN (a private copy that
        costs load time and memory, for faster bf16 decode)."""
        from ember.cluster.runner import EngineRunner

        return EngineRunner.create(self._spec, path, self._device, self._pack_weights)


def _memory_bytes() -> tuple[int, int]:
    """(RSS, USS) of this process from /proc/self/smaps_rollup."""
    fields: dict[str, int] = {}
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 2 and parts[0].endswith(":") and parts[1].isdigit():
                fields[parts[0][:-1]] = int(parts[1]) * 1024
    uss = fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)
    return fields.get("Rss", 0), uss


class WorkerPool:
    """`size` idle pooled workers per node, topped up after every `take`."""

    def __init__(
        self,
        size: int,
        cache_root: str,
        device: str = "cpu",
        env: dict[str, str] | None = None,
        pack_weights: bool = True,
    ) -> None:
        self.size = size
        self._pack_weights = pack_weights
        self._cache_root = cache_root
        self._device = device
        self._env = env
        self._idle: dict[str, list[ActorRef]] = {}
        self._ids = itertools.count()

    def sync(self, node_ids: list[str], hold: set[str] | frozenset[str] = frozenset()) -> None:
        """Fill the pool on every listed node but those in `hold`; forget nodes no longer
        listed."""
        for gone in set(self._idle) - set(node_ids):
            for ref in self._idle.pop(gone):
                _kill(ref)
        for node_id in node_ids:
            if node_id not in hold:
                self.fill(node_id)

    def fill(self, node_id: str) -> None:
        """Start workers on `node_id` until `size` are idle there."""
        idle = self._idle.setdefault(node_id, [])
        while len(idle) < self.size:
            idle.append(self._start(node_id))

    def _start(self, node_id: str) -> ActorRef:
        name = f"{POOL_PREFIX}{node_id[:12]}-{os.getpid()}-{next(self._ids)}"
        remote_cls: Any = ray.remote(PooledInstanceActor)
        actor = remote_cls.options(
            name=name,
            namespace=NAMESPACE,
            num_cpus=0,
            max_restarts=0,
            max_concurrency=1000,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node_id, soft=False),
            runtime_env={"env_vars": self._env} if self._env else None,
        ).remote(self._cache_root, self._device, self._pack_weights)
        logger.info("pooled worker starting name=%s node=%s", name, node_id[:12])
        return ActorRef(name=name, actor=actor)

    def take(self, node_id: str | None, *, refill: bool = True) -> ActorRef | None:
        """An idle worker on `node_id` (any node if None); None if there is none. With `refill`
        its replacement starts at once (on a small machine it then competes with the load for
        CPU; `refill=False` leaves topping up to the next `sync`)."""
        nodes = [node_id] if node_id is not None else list(self._idle)
        for n in nodes:
            idle = self._idle.get(n)
            if idle:
                ref = idle.pop(0)
                if refill:
                    idle.append(self._start(n))
                return ref
        return None

    def idle(self) -> dict[str, list[ActorRef]]:
        return {k: list(v) for k, v in self._idle.items()}

    def shutdown(self) -> None:
        for refs in self._idle.values():
            for ref in refs:
                _kill(ref)
        self._idle.clear()


def _warm_on_a_thread_of_its_own(device: str) -> float:
    """`warm_engine_process` on a thread that then ends, so that the OpenMP thread team its
    torch ops started ends with it. Run on the actor's main thread instead, that team stayed and
    the engine's own thread (which starts a team of its own) ran slower: a 2-thread 125m
    instance on 2 cores took ~20 ms longer to its first token and served 82-84% of the
    in-process throughput instead of 100% (`bench_serve.py --threads 2`)."""
    from ember.store.warmup import warm_engine_process

    result: list[float | BaseException] = []

    def warm() -> None:
        try:
            result.append(warm_engine_process(device))
        except BaseException as e:  # noqa: BLE001 - raised again on the caller's thread
            result.append(e)

    thread = threading.Thread(target=warm, name="ember-warm")
    thread.start()
    thread.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


def _kill(ref: ActorRef) -> None:
    try:
        ray.kill(ref.actor, no_restart=True)
    except Exception:  # already gone
        logger.debug("kill of %s failed", ref.name, exc_info=True)
