"""`RayCluster`: the controller's view of a Ray cluster (nodes, instance start and stop).

Owns the `RayAdapter` connection and `ClusterConfig`. An instance is one named actor
(`ember-instance:<id>`) hosting an engine; a tensor-parallel instance's actor reserves every
rank's CPUs and GPUs (the other ranks are its child processes). Stopping an instance kills its
actor and removes a pooled worker's placement group, so a deleted deployment leaves no actor
and no reservation behind.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from ember.cluster.adapter import ACTOR_PREFIX, RayAdapter
from ember.cluster.instance import InstanceActor, InstanceHandle, InstanceReady
from ember.cluster.node_services import NodeServices, NodeServicesConfig
from ember.controller.config import default_cache_dir
from ember.controller.types import DeploymentSpec, NodeInfo, engine_counters
from ember.errors import ConfigError, DeploymentError, InstanceLostError, RequestTimeoutError

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """How ember uses Ray.

    address: None starts a private Ray on 127.0.0.1; "auto" or HOST:PORT joins a cluster.
    num_cpus: logical CPUs of the private Ray (None: max(4, cores), so two instances fit on a
        small machine; each instance's torch threads follow `instance_cpus`).
    instance_cpus / instance_gpus: resources one tensor-parallel rank reserves.
    device: where engines run ("cpu", or "cuda" with instance_gpus >= 1).
    cache_dir: root of the per-node caches (converted checkpoints under nodes/<host>/;
        default $EMBER_CACHE_DIR, else ~/.cache/ember).
    labels: labels of the private Ray's node (a cluster's nodes get theirs from `ray start
        --labels`); ember reads "spot" ("true"/"false") and "zone".
    """

    address: str | None = None
    num_cpus: int | None = None
    instance_cpus: float = 1.0
    instance_gpus: float = 0.0
    device: str = "cpu"
    cache_dir: str = field(default_factory=lambda: default_cache_dir())
    labels: tuple[tuple[str, str], ...] = field(default=())

    def validate(self) -> None:
        if self.num_cpus is not None and self.num_cpus < 1:
            raise ConfigError(f"num_cpus: must be >= 1, got {self.num_cpus}")
        if self.instance_cpus <= 0:
            raise ConfigError(f"instance_cpus: must be > 0, got {self.instance_cpus}")
        if self.instance_gpus < 0:
            raise ConfigError(f"instance_gpus: must be >= 0, got {self.instance_gpus}")
        if self.device != "cpu" and not self.device.startswith("cuda"):
            raise ConfigError(f"device: must be 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.device.startswith("cuda") and self.instance_gpus < 1:
            raise ConfigError("instance_gpus: must be >= 1 when device is cuda")


class RayCluster:
    """Implements `ember.controller.controller.ClusterBackend` on Ray."""

    def __init__(self, config: ClusterConfig, adapter: RayAdapter | None = None) -> None:
        config.validate()
        self.config = config
        if adapter is not None:
            self._adapter = adapter
        elif config.address is None:
            num_cpus = config.num_cpus or max(4, os.cpu_count() or 1)
            self._adapter = RayAdapter.start_local(num_cpus=num_cpus, labels=dict(config.labels))
        else:
            self._adapter = RayAdapter.connect(config.address)
        self.services = NodeServices(  # node store actor + pre-started workers on every node
            NodeServicesConfig.from_env(config.cache_dir), config.cache_dir, config.device,
            config.instance_cpus, _actor_env(config),
        )  # fmt: skip

    @property
    def address(self) -> str:
        return self._adapter.address

    def shutdown(self) -> None:
        """Leave the cluster (a private Ray is stopped with every process it started)."""
        self.services.shutdown()
        self._adapter.shutdown()

    def nodes(self) -> list[NodeInfo]:
        nodes = self._adapter.nodes()
        self.services.sync(nodes)  # nodes that joined get their store and pool
        return nodes

    async def warm(self, timeout_s: float = 60.0) -> bool:
        """Wait until the node stores have started and the pre-started workers have done their
        imports (at most `timeout_s`; False if time ran out)."""
        self.nodes()
        return await self.services.warm(timeout_s)

    async def checkpoints(self) -> dict[str, list[dict[str, Any]]]:
        """Per node id, the checkpoints its node store holds (tier, source, bytes, pins)."""
        return await self.services.checkpoints()

    @property
    def peer_fetch(self) -> bool:
        """Whether the node stores fetch checkpoints from each other (placement counts other
        nodes' copies only then)."""
        return self.services.config.enabled and self.services.store_config().peer_fetch

    def pool_idle(self) -> dict[str, int]:
        """Per node id, its pre-started workers idle (`ember status`)."""
        return self.services.idle()

    async def rates(self) -> dict[str, dict[str, float]]:
        """Per node id, its node store's measured fetch rates (bytes/s by "remote", "peer",
        "ssd")."""
        return await self.services.rates()

    async def notices(self) -> dict[str, float]:
        """Per node id whose cloud posted a preemption notice, the seconds left."""
        return await self.services.notices()

    async def check_source(self, source: str) -> tuple[int, str]:
        """That an `s3://` source holds a checkpoint the node stores can fetch: its bytes and
        version (a digest of its index)."""
        self.nodes()  # the stores start with their nodes
        return await self.services.check(source)

    def prefetch(self, source: str, node_id: str, tier: str) -> None:
        """Start bringing `source` into `node_id`'s store tier ("ssd" or "dram"); returns at
        once (the controller's prefetch on deploy)."""
        self.services.prefetch(source, node_id, tier)

    def prepare(self, spec: DeploymentSpec, node_id: str, tier: str) -> None:
        """Start converting `spec`'s local model on `node_id` ahead of its first start (and for
        "dram" loading it into the node store's DRAM tier); returns at once."""
        self.services.prepare(spec, node_id, tier)

    async def evict(self, source: str, node_id: str, tier: str) -> bool:
        """Drop `source` from `node_id`'s store tier; False if it was not there. Raises
        StoreCapacityError if an instance on the node is using that copy."""
        return await self.services.evict(source, node_id, tier)

    def instance_cpus(self, spec: DeploymentSpec) -> float:
        return self.config.instance_cpus * spec.tp

    def instance_gpus(self, spec: DeploymentSpec) -> float:
        return self.config.instance_gpus * spec.tp

    def launch(self, spec: DeploymentSpec, instance_id: str, node_id: str | None) -> InstanceHandle:
        ref = self.services.take(spec, instance_id, node_id) or self._adapter.create_actor(
            InstanceActor,
            f"{ACTOR_PREFIX}{instance_id}",
            (spec, instance_id, self.config.cache_dir, self.config.device),
            cpus=self.config.instance_cpus,
            gpus=self.config.instance_gpus,
            node_id=node_id,
            ranks=spec.tp,
            env=_actor_env(self.config),
        )
        logger.info(
            "instance launched id=%s deployment=%s node_hint=%s tp=%d",
            instance_id,
            spec.name,
            (node_id or "any")[:12],
            spec.tp,
        )
        return InstanceHandle(
            self._adapter, ref, instance_id=instance_id, deployment=spec.name, node_id=node_id
        )

    async def wait_started(self, handle: InstanceHandle, timeout_s: float) -> InstanceReady:
        try:
            ready: Any = await self._adapter.call(handle.actor_ref, "start", timeout_s=timeout_s)
        except asyncio.TimeoutError:
            raise RequestTimeoutError(
                f"instance {handle.instance_id} did not start within {timeout_s:g} s "
                "(no node with room, or a slow load)"
            ) from None
        finally:  # a pooled worker's replacement starts now, off the start's CPU time
            self.services.started(handle.actor_ref.name)
        if not isinstance(ready, InstanceReady):
            raise DeploymentError(f"instance {handle.instance_id} answered {ready!r} to start")
        return ready

    async def stop(self, handle: InstanceHandle) -> None:
        await handle.close()
        await self._adapter.kill(handle.actor_ref)
        logger.info("instance stopped id=%s", handle.instance_id)

    async def probe(self, handle: InstanceHandle, timeout_s: float) -> bool:
        try:
            stats = await self._adapter.call(handle.actor_ref, "stats", timeout_s=timeout_s)
        except InstanceLostError:
            return False
        except asyncio.TimeoutError:
            # A busy or starved actor is slow, not dead: only Ray's word that it died counts.
            logger.warning("instance id=%s is slow to answer its probe", handle.instance_id)
            return True
        if not isinstance(stats, dict):
            return True
        handle.engine_stats = engine_counters(stats)
        if stats.get("broken"):  # alive, but its engine failed
            logger.warning(
                "instance id=%s: its engine failed: %s", handle.instance_id, stats["broken"]
            )
            return False
        return True

    def actor_names(self) -> list[str]:
        """Names of ember's live instance actors (tests check that none leak)."""
        return sorted(self._adapter.actor_names() + self.services.live_instance_names())


def _actor_env(config: ClusterConfig) -> dict[str, str]:
    from ember.cluster.adapter import WORKER_LOG_LEVEL_ENV

    threads = str(max(1, int(config.instance_cpus)))
    env = {
        "OMP_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
        "TOKENIZERS_PARALLELISM": "false",
        "MASTER_ADDR": os.environ.get("MASTER_ADDR", "127.0.0.1"),
    }
    if os.environ.get(WORKER_LOG_LEVEL_ENV):
        env[WORKER_LOG_LEVEL_ENV] = os.environ[WORKER_LOG_LEVEL_ENV]
    return env
