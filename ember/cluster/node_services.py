"""What ember runs on every node besides instances: the node store actor and the pool of
pre-started workers. `RayCluster` owns one `NodeServices` and calls it from these places:
`sync(nodes)` each time it lists nodes (so nodes that join later get theirs), `take(...)` when
it launches an instance, `checkpoints()` and `rates()` for `ember status` and placement,
`shutdown()`. `prefetch` and `evict` are there for the controller's placement policy
(`cluster.services.prefetch(...)`).

Configuration comes from the environment of the `ember serve` process (so it reaches every
node's actors as arguments, not through their environments):

- EMBER_DRAM_DIR (default /dev/shm/ember-<uid>/dram), EMBER_DRAM_CAPACITY_BYTES (8 GiB)
- EMBER_SSD_DIR (default <cache_dir>/ssd), EMBER_SSD_CAPACITY_BYTES (100 GiB)
- EMBER_S3_ENDPOINT_URL (any S3-compatible server; default AWS), AWS_* credentials as usual
- EMBER_WORKER_POOL_SIZE: pre-started workers per node (default 1; 0 turns the pool off)
- EMBER_RATE_MIN_BYTES (64 MiB): smaller fetches are left out of the store's measured rates
- EMBER_CONFIRM_CACHE_FIRST (default 0), read by pooled workers: 1 asks the source whether a
  DRAM copy is still current before building the engine over it (one S3 round trip on the
  start's path) instead of while building it
- EMBER_POOL_PACK_WEIGHTS (default 1): pooled instances re-lay bf16 weights out for oneDNN
  after their first step (faster decode, a private copy per instance), as instances started
  from scratch do; 0 keeps the weights as zero-copy views of the DRAM tier
- EMBER_NOTICE_SOURCE (none, aws or gce; default none), EMBER_NOTICE_URL: each node's store
  asks its cloud's metadata service for a preemption notice at every health probe
  (`ember.cluster.notices`); a notice drains the node (`Controller.notice`)
- EMBER_NODE_STORE=0 turns both off (instances then load as before, from local paths only).

Each node's tier directories get the node id appended, so several Ray nodes on one machine (a
local test cluster) keep separate tiers. A pooled instance reserves its CPUs through a
placement group created when it is taken (freed when the instance is stopped), so the
controller's view of free CPUs is the same as for an instance started from scratch.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
from ray.util.placement_group import placement_group

from ember.cluster.adapter import ActorRef
from ember.cluster.node_store_actor import start_node_store
from ember.cluster.notices import NoticeConfig
from ember.cluster.worker_pool import WorkerPool
from ember.controller.types import DeploymentSpec, NodeInfo
from ember.errors import ConfigError

if TYPE_CHECKING:  # ember.store imports torch: only store actors and instances load it
    from ember.store.node_store import NodeStoreConfig

logger = logging.getLogger(__name__)

# After a pooled worker's start has ended, its replacement starts this much later, so that its
# imports (about 2 s of CPU) do not run beside the load and the new instance's first request.
# The health probe's pool top-up leaves such a node alone until then. A 0.5b start from DRAM
# over HTTP on 2 cores (5 requests each, median): replacement started at the take 0.354 s,
# right after the start 0.386 s, 2 s after it (probe held off) 0.300 s.
REFILL_DELAY_S = 2.0
# The longest a start holds its node's pool back (a start the caller never reports ended).
HOLD_MAX_S = 120.0


@dataclass(frozen=True, slots=True)
class NodeServicesConfig:
    enabled: bool = True
    store: NodeStoreConfig | None = None  # None: NodeStoreConfig's defaults
    pool_size: int = 1
    pack_weights: bool = True  # pooled instances pack bf16 weights (False: zero-copy views)
    notices: NoticeConfig = field(default_factory=NoticeConfig)

    @classmethod
    def from_env(cls, cache_dir: str, env: dict[str, str] | None = None) -> NodeServicesConfig:
        from ember.store.node_store import NodeStoreConfig
        from ember.store.remote import RemoteConfig

        e = dict(os.environ if env is None else env)

        def num(name: str, default: int) -> int:
            try:
                return int(e.get(name, default))
            except ValueError:
                raise ConfigError(f"{name}={e[name]!r} is not an integer") from None

        base = NodeStoreConfig()
        store = NodeStoreConfig(
            dram_dir=e.get("EMBER_DRAM_DIR", base.dram_dir),
            dram_capacity_bytes=num("EMBER_DRAM_CAPACITY_BYTES", base.dram_capacity_bytes),
            ssd_dir=e.get("EMBER_SSD_DIR", str(Path(cache_dir).expanduser() / "ssd")),
            ssd_capacity_bytes=num("EMBER_SSD_CAPACITY_BYTES", base.ssd_capacity_bytes),
            rate_min_bytes=num("EMBER_RATE_MIN_BYTES", base.rate_min_bytes),
            remote=RemoteConfig(endpoint_url=e.get("EMBER_S3_ENDPOINT_URL") or None),
            peer_fetch=e.get("EMBER_PEER_FETCH", "1") not in ("0", "", "false"),
            peer_port=num("EMBER_PEER_PORT", base.peer_port),
        )
        pool = num("EMBER_WORKER_POOL_SIZE", 1)
        if pool < 0:
            raise ConfigError(f"EMBER_WORKER_POOL_SIZE must be >= 0, got {pool}")
        pack = e.get("EMBER_POOL_PACK_WEIGHTS", "1") not in ("0", "", "false")
        return cls(
            e.get("EMBER_NODE_STORE", "1") != "0", store, pool, pack, NoticeConfig.from_env(e)
        )


class NodeServices:
    def __init__(
        self,
        config: NodeServicesConfig,
        cache_root: str,
        device: str = "cpu",
        instance_cpus: float = 1.0,
        env: dict[str, str] | None = None,
    ) -> None:
        self.config = config
        self._instance_cpus = instance_cpus
        self._stores: dict[str, Any] = {}
        self._ready: dict[str, Any] = {}  # node id -> ObjectRef ready once its store started
        if device != "cpu" and config.pool_size:
            # A pooled worker reserves no GPU while idle, so it could not see one once taken.
            logger.info("worker pool off: device=%s (pooled workers are CPU-only)", device)
            self.config = config = replace(config, pool_size=0)
        self._pool = WorkerPool(config.pool_size, cache_root, device, env, config.pack_weights)
        self._cache_root = cache_root
        self._taken: dict[str, Any] = {}  # name -> actor handle of pooled workers in service
        # Nodes whose pool `sync` leaves alone until then (monotonic time): a pooled worker was
        # taken there and its start is running, or ended less than REFILL_DELAY_S ago. The
        # node each taken worker came from.
        self._hold: dict[str, float] = {}
        self._taken_on: dict[str, str] = {}

    def store_config(self) -> NodeStoreConfig:
        """The stores' configuration; each store narrows its directories to a slot of its
        machine when it starts (`ember.store.node_store.claim_slot`)."""
        from ember.store.node_store import NodeStoreConfig

        return self.config.store or NodeStoreConfig()

    def sync(self, nodes: list[NodeInfo]) -> None:
        """Start a store actor (and fill the pool) on every alive node that has none."""
        if not self.config.enabled:
            return
        alive = [n.node_id for n in nodes if n.alive]
        for node_id in alive:
            if node_id not in self._stores:
                self._stores[node_id] = start_node_store(
                    node_id, self.store_config(), self.config.notices
                )
                self._ready[node_id] = self._stores[node_id].__ray_ready__.remote()
                logger.info("node store started node=%s", node_id[:12])
        for gone in set(self._stores) - set(alive):
            del self._stores[gone]
            self._ready.pop(gone, None)
        if self.config.pool_size:
            now = time.monotonic()
            self._pool.sync(alive, hold={n for n, t in self._hold.items() if t > now})

    async def warm(self, timeout_s: float) -> bool:
        """Wait until every node's store has started and its idle pooled workers have done
        their imports (their constructors ran), at most `timeout_s`; False if time ran out.
        `ember serve` answers only after this, so a request sent the moment `/health` first
        answers finds a warm worker instead of paying for its imports."""
        refs = list(self._ready.values())
        refs += [ref.actor.info.remote() for idle in self._pool.idle().values() for ref in idle]
        if not refs:
            return True
        done, _ = await asyncio.wait(
            [asyncio.ensure_future(_quiet(r)) for r in refs], timeout=timeout_s
        )
        return len(done) == len(refs)

    def take(self, spec: DeploymentSpec, instance_id: str, node_id: str | None) -> ActorRef | None:
        """A pre-started worker on `node_id`, assigned to `spec`; None if the pool is off or
        empty there (the caller starts an instance from scratch).

        Its replacement starts REFILL_DELAY_S after this instance's start has ended
        (`started`), not now: on a small node the replacement's imports would compete with the
        load and the first request for CPU. A second start on the node meanwhile starts the
        replacement at once and takes it, as before."""
        if not self.config.enabled or spec.tp != 1:
            return None
        if node_id is None:  # no node had room: any node's worker, replaced at once
            ref = self._pool.take(None)
        else:
            ref = self._pool.take(node_id, refill=False)
            if ref is None and self._hold.get(node_id, 0.0) > time.monotonic():
                # Its replacement is being held back for a start still running here: start it
                # now, for this one.
                self._pool.fill(node_id)
                ref = self._pool.take(node_id, refill=False)
            if ref is not None:
                until = time.monotonic() + HOLD_MAX_S
                self._hold[node_id] = max(self._hold.get(node_id, 0.0), until)
                self._taken_on[ref.name] = node_id
        if ref is None:
            return None
        ref.actor.assign.remote(spec, instance_id)  # ordered before the caller's start()
        pg = placement_group(
            [{"CPU": self._instance_cpus}],
            strategy="STRICT_PACK",
            name=f"{ref.name}-cpus",
            _soft_target_node_id=node_id,
        )
        self._taken[ref.name] = ref.actor
        logger.info("pooled worker taken name=%s instance=%s", ref.name, instance_id)
        return ActorRef(name=ref.name, actor=ref.actor, placement_group=pg)

    def idle(self) -> dict[str, int]:
        """Node id -> pre-started workers idle there."""
        return {n: len(refs) for n, refs in self._pool.idle().items()}

    def started(self, name: str) -> None:
        """The start of the instance in pooled worker `name` has ended (ready or failed): its
        node's pool is topped up REFILL_DELAY_S later (the new instance's first request runs
        meanwhile), unless another start there holds it back longer."""
        node_id = self._taken_on.pop(name, None)
        if node_id is None:
            return
        others = node_id in self._taken_on.values()  # another start still running there
        self._hold[node_id] = time.monotonic() + (HOLD_MAX_S if others else REFILL_DELAY_S)
        if others:
            return
        try:
            asyncio.get_running_loop().call_later(REFILL_DELAY_S, self._refill, node_id)
        except RuntimeError:  # no event loop: now
            self._refill(node_id)

    def _refill(self, node_id: str) -> None:
        if self._hold.get(node_id, 0.0) > time.monotonic() + 0.05:
            return  # held again by a later start
        self._hold.pop(node_id, None)
        if node_id in self._stores:
            self._pool.fill(node_id)

    def _started(self, node_id: str) -> bool:
        ref = self._ready.get(node_id)
        if ref is None:
            return True
        done, _ = ray.wait([ref], timeout=0)
        if done:
            del self._ready[node_id]
        return bool(done)

    def live_instance_names(self) -> list[str]:
        """Pooled workers taken into service whose actors are still alive (the same view of
        liveness as the adapter's `actor_names`: Ray's list of named actors)."""
        if not self._taken:
            return []
        live = {n["name"] for n in ray.util.list_named_actors(all_namespaces=True)}
        for name in [n for n in self._taken if n not in live]:
            del self._taken[name]
        return sorted(self._taken)

    async def checkpoints(self, timeout_s: float = 1.0) -> dict[str, list[dict[str, Any]]]:
        """Per node id: the checkpoints in its tiers (tier, source, bytes, pins). Stores still
        starting, or slower than `timeout_s`, are left out (status must answer promptly)."""

        rows = await self._ask_stores("status", timeout_s)
        return {n: [asdict(r) for r in answer] for n, answer in rows.items()}

    async def rates(self, timeout_s: float = 1.0) -> dict[str, dict[str, float]]:
        """Per node id: its store's measured fetch rates, bytes/s by where from ("remote",
        "ssd"); stores that measured nothing yet answer {}."""
        return await self._ask_stores("rates", timeout_s)

    async def notices(self, timeout_s: float = 2.0) -> dict[str, float]:
        """Per node id under a preemption notice from its cloud: the seconds left ({} with no
        notice source configured)."""
        if self.config.notices.source == "none":
            return {}
        answers = await self._ask_stores("notice", timeout_s)
        return {n: float(s) for n, s in answers.items() if s is not None}

    async def _ask_stores(self, method: str, timeout_s: float) -> dict[str, Any]:
        """Node id -> what `method` of its store answered, from the started stores that
        answered within `timeout_s`."""

        async def one(handle: Any) -> Any:
            return await asyncio.wait_for(getattr(handle, method).remote(), timeout_s)

        ids = [n for n in self._stores if self._started(n)]
        answers = await asyncio.gather(*(one(self._stores[n]) for n in ids), return_exceptions=True)
        return {n: a for n, a in zip(ids, answers, strict=True) if not isinstance(a, BaseException)}

    async def check(self, source: str) -> tuple[int, str]:
        """Ask a node's store whether `source` (s3://) holds a checkpoint it can fetch: its
        bytes and version. Raises the store's CheckpointError naming the object."""
        stores = [self._stores[n] for n in sorted(self._stores)]
        if not stores:
            raise ConfigError(
                f"source: {source} is fetched by the node stores, and none runs "
                "(EMBER_NODE_STORE=0, or no node yet)"
            )
        try:
            nbytes, version = await stores[0].check.remote(source)
            return int(nbytes), str(version)
        except ray.exceptions.RayTaskError as e:
            cause = getattr(e, "cause", None)
            raise (cause if isinstance(cause, BaseException) else e) from None

    def prefetch(self, source: str, node_id: str, tier: str = "dram") -> None:
        """Start bringing `source` into `node_id`'s `tier` (returns at once)."""
        store = self._stores.get(node_id)
        if store is None:
            raise ConfigError(f"node {node_id[:12]} runs no node store")
        store.prefetch.remote(source, tier)

    def prepare(self, spec: DeploymentSpec, node_id: str, tier: str = "ssd") -> None:
        """Start converting `spec`'s local model on `node_id` (and, for "dram", loading it into
        the DRAM tier) ahead of its first start; returns at once."""
        store = self._stores.get(node_id)
        if store is None:
            raise ConfigError(f"node {node_id[:12]} runs no node store")
        store.prepare.remote(spec, self._cache_root, tier)

    async def evict(self, source: str, node_id: str, tier: str = "dram") -> bool:
        """Drop `source` from `node_id`'s `tier`; False if it was not there. Raises
        StoreCapacityError if an instance on the node is using it."""
        store = self._stores.get(node_id)
        if store is None:
            raise ConfigError(f"node {node_id[:12]} runs no node store")
        return bool(await store.evict.remote(source, tier))

    def shutdown(self) -> None:
        """Stop the idle pool. Store actors end with this driver (Ray fate-sharing); their tier
        directories stay, and the next store actor on the node finds the complete checkpoints
        in them again."""
        self._pool.shutdown()


async def _quiet(ref: Any) -> None:
    """Await a Ray object ref; a failure is the caller's to meet later (a worker that died
    while starting is replaced by the pool, a store that failed is logged where it is used)."""
    try:
        await ref
    except Exception:
        logger.debug("waiting for a node service failed", exc_info=True)
