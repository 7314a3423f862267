"""The node store as a Ray actor: one per node (named `ember-node-store:<node id>`, pinned to
its node with hard affinity, no CPU reserved), wrapping `ember.store.node_store.NodeStore`.

Instances on the node acquire checkpoints through it (`acquire_on_this_node`), which pins the
copy the instance maps (DRAM, or SSD for a checkpoint not yet in DRAM) for as long as the
instance's process lives: pins are held per process id and
reaped when that process is gone (an instance killed by Ray never says goodbye), so a crashed
instance never keeps a checkpoint pinned forever. The controller calls `prefetch`, `evict` and
`status` through the handle `start_node_store` returns, and `notice` (the node's cloud's
preemption notice, `ember.cluster.notices`) at each health probe.

Peers: a store fetching a remote checkpoint first asks the other nodes' stores
(`peer_offer`, all at once, `PEER_ASK_TIMEOUT_S`) whether one holds it (whole, or arriving
from the remote store), and fetches from the best offer (`OFFER_ORDER`) over `ember.store.peer`'s TCP stream. A store
opens its peer server (on the node's cluster address, `NodeStoreConfig.peer_port`) the first
time a peer asks, so a single-node deployment never listens.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

if TYPE_CHECKING:  # ember.store imports torch; the controller's process imports this module
    from ember.cluster.notices import NoticeConfig
    from ember.controller.types import DeploymentSpec
    from ember.store.node_store import CachedCheckpoint, NodeStoreConfig
    from ember.store.peer import PeerOffer, PeerServer

logger = logging.getLogger(__name__)

STORE_ACTOR_PREFIX = "ember-node-store:"
NAMESPACE = "ember"
# How long a fetch waits for the other nodes to say whether they hold its checkpoint, and how
# long a node asked waits for its own fetch from S3, just started, to be ready to share.
PEER_ASK_TIMEOUT_S = 2.0
PREPARE_WAIT_S = 1.5


@dataclass(frozen=True, slots=True)
class AcquireReport:
    """What an instance gets back: the directory to map (DRAM tier, or SSD tier for a
    checkpoint not yet in DRAM) and where the checkpoint was found."""

    path: str
    served_from: str  # "dram", "ssd", "peer", "remote" or "local"
    seconds: float
    # The DRAM copy was handed out before the source was asked whether it is current: the
    # instance must `confirm` before it serves (`acquire(..., trust_cache=True)`).
    unconfirmed: bool = False


def store_actor_name(node_id: str) -> str:
    return f"{STORE_ACTOR_PREFIX}{node_id}"


class NodeStoreActor:
    """Actor body (wrapped with ray.remote by `start_node_store`)."""

    def __init__(self, config: NodeStoreConfig, notices: NoticeConfig | None = None) -> None:
        from ember.cluster.adapter import worker_logging
        from ember.cluster.notices import NoticeConfig, NoticeWatcher
        from ember.store.node_store import NodeStore, claim_slot

        worker_logging()

        self._notices = NoticeWatcher(notices or NoticeConfig())

        # This machine's lowest free slot: a restarted store finds its predecessor's tiers.
        config, self._slot_lock = claim_slot(config)
        self._store = NodeStore(config, peers=self._find_peers)
        self._peer_server: PeerServer | None = None
        self._peer_lock = threading.Lock()
        logger.info("node store tiers dram=%s ssd=%s", config.dram_dir, config.ssd_dir)
        # source -> (pid, tier) of each pin held: "dram", or "ssd" for an instance that maps
        # the SSD copy (`NodeStore.acquire_ssd`)
        self._holders: dict[str, list[tuple[int, str]]] = {}
        # After a crash and restart: the instances still running keep their copies pinned.
        for pid, tier, source in self._store.adopt_mappings():
            self._holders.setdefault(source, []).append((pid, tier))
        # (source, pid) -> the freshness check of a copy handed out before it (`confirm`)
        self._checks: dict[tuple[str, int], asyncio.Future[bool]] = {}

    def _reap(self) -> None:
        for source, holders in list(self._holders.items()):
            for pid, tier in list(holders):
                if not _alive(pid):
                    holders.remove((pid, tier))
                    self._store.release(source, tier, pid)
                    logger.info("pin reaped source=%s pid=%d tier=%s", source, pid, tier)
            if not holders:
                del self._holders[source]
        for source, pid in [k for k in self._checks if not _alive(k[1])]:
            self._checks.pop((source, pid)).cancel()

    async def acquire(
        self, source: str, pid: int, streaming: bool = False, trust_cache: bool = False
    ) -> AcquireReport:
        """Pin `source` for process `pid`, fetching it if needed. With `streaming`, answer as
        soon as the engine can map it: a checkpoint on SSD (in the page cache) but not in DRAM is
        mapped from the SSD tier (checked first, copied into DRAM behind it:
        `NodeStore.acquire_ssd`); else the
        path may be the in-progress `.fetching/<key>` DRAM directory, which
        `ember.store.shm.map_dram` maps chunk by chunk.

        With `trust_cache`, a copy already in DRAM is pinned and handed out at once, and the
        question whether the source still holds that version (a GET of its index: one round
        trip to S3) runs meanwhile: the caller builds its engine, then must `confirm` before
        serving."""
        from ember.errors import StoreCapacityError

        self._reap()
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        if trust_cache:
            cached = await loop.run_in_executor(None, self._store.acquire_cached, source, pid)
            if cached is not None:
                self._holders.setdefault(source, []).append((pid, "dram"))
                self._checks[(source, pid)] = loop.run_in_executor(
                    None, self._store.is_current, source, cached[1]
                )
                return AcquireReport(str(cached[0]), "dram", time.perf_counter() - t0, True)
        # Stale copies go first (one read of the source's index), so `where` names the tier
        # the current version comes from.
        await loop.run_in_executor(None, self._store.drop_stale, source)
        where = self._store.locate(source) or ("remote" if source.startswith("s3://") else "local")
        tier: str | None = "dram"
        path: Path | None = None
        try:
            if streaming:
                path = await loop.run_in_executor(
                    None, partial(self._store.acquire_ssd, source, pid, checked=True)
                )
                if path is not None:
                    tier = "ssd"
                else:
                    path, _complete = await loop.run_in_executor(
                        None,
                        partial(self._store.acquire_streaming, source, checked=True, owner=pid),
                    )
            else:
                path = await loop.run_in_executor(
                    None, partial(self._store.acquire, source, pid, checked=True)
                )
        except StoreCapacityError as e:
            # No room in DRAM for it: the instance maps it from disk (SSD tier, or the local
            # directory) rather than fail, slower to start but serving.
            logger.warning("dram tier has no room, mapping from disk source=%s: %s", source, e)
            path, tier = await loop.run_in_executor(None, self._store.acquire_on_disk, source, pid)
            if tier is None:  # a local directory, read where it is
                where = "disk"
        if tier is not None:
            self._holders.setdefault(source, []).append((pid, tier))
        if where == "remote":  # fetched just now: from a peer, or the remote store
            where = self._store.fetched_from(source) or where
        return AcquireReport(str(path), where, time.perf_counter() - t0)

    async def confirm(self, source: str, pid: int) -> bool:
        """Whether the copy `acquire(..., trust_cache=True)` handed `pid` is `source`'s current
        checkpoint (True if nothing was left to confirm). If not, the caller releases it and
        acquires again without `trust_cache`, which fetches the new version."""
        check = self._checks.pop((source, pid), None)
        return True if check is None else bool(await check)

    async def release(self, source: str, pid: int) -> None:
        holders = self._holders.get(source, [])
        for holder in holders:
            if holder[0] == pid:
                holders.remove(holder)
                self._store.release(source, holder[1], pid)
                break

    async def ensure(self, source: str, tier: str = "dram") -> AcquireReport:
        self._reap()
        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        result = await loop.run_in_executor(None, self._store.ensure, source, tier)
        return AcquireReport(str(result.path), result.served_from, time.perf_counter() - t0)

    async def check(self, source: str) -> tuple[int, str]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, self._store.check, source)

    async def prefetch(self, source: str, tier: str = "dram") -> None:
        self._store.prefetch(source, tier)

    async def prepare(self, spec: DeploymentSpec, cache_root: str, tier: str = "ssd") -> None:
        """A local model's first start, done ahead (the controller's prefetch on deploy): in
        the background, convert its Hugging Face folder into this node's cache of converted
        checkpoints, as the first instance here would (same file lock, same directory), and
        for `tier` "dram" bring the result into the DRAM tier. Returns at once."""
        threading.Thread(
            target=self._prepare, args=(spec, cache_root, tier), name="ember-prepare", daemon=True
        ).start()

    def _prepare(self, spec: DeploymentSpec, cache_root: str, tier: str) -> None:
        from ember.cluster.adapter import current_node_id
        from ember.cluster.runner import prepare_checkpoint

        t0 = time.perf_counter()
        try:
            path, _ = prepare_checkpoint(spec, cache_root, current_node_id())
            if tier == "dram":
                self._store.ensure(str(path), "dram")
        except Exception:  # the first start meets the same error and reports it
            logger.exception("prepare failed source=%s tier=%s", spec.source, tier)
            return
        logger.info(
            "prepared source=%s tier=%s in %.2f s", spec.source, tier, time.perf_counter() - t0
        )

    async def evict(self, source: str, tier: str = "dram") -> bool:
        self._reap()
        return self._store.evict(source, tier)

    async def status(self) -> list[CachedCheckpoint]:
        self._reap()
        return self._store.status()

    async def rates(self) -> dict[str, float]:
        """Measured fetch rates into this node, bytes/s by where from ("remote", "peer",
        "ssd")."""
        return self._store.rates.rates()

    async def notice(self) -> float | None:
        """Seconds until this node is reclaimed, if its cloud posted a preemption notice
        (None: no notice, or no notice source configured)."""
        if self._notices.config.source == "none":
            return None
        return await asyncio.get_running_loop().run_in_executor(None, self._notices.poll)

    async def peer_offer(self, key: str) -> PeerOffer | None:
        """Another node's store asks whether this node holds checkpoint `key` (whole, or being
        fetched from the remote store: `NodeStore.servable_copy`): where to fetch it (this
        store's peer server, started now if need be), or None."""
        if not self._store.config.peer_fetch:
            return None
        # (a fetch from S3 that has just started is waited for: off the event loop)
        copy = await asyncio.get_running_loop().run_in_executor(
            None, self._store.servable_copy, key, PREPARE_WAIT_S
        )
        if copy is None:
            return None
        server = self._serve_peers()
        return server.offer(ray.get_runtime_context().get_node_id()[:12], copy[1])

    def _serve_peers(self) -> PeerServer:
        from ember.store.peer import PeerServer

        with self._peer_lock:
            if self._peer_server is None:

                def resolve(key: str) -> Path | None:
                    copy = self._store.servable_copy(key)
                    return None if copy is None else copy[0]

                host = ray.util.get_node_ip_address()
                self._peer_server = PeerServer(resolve, host, self._store.config.peer_port)
            return self._peer_server

    def _find_peers(self, key: str) -> list[PeerOffer]:
        """The other nodes' offers of checkpoint `key` in `OFFER_ORDER` (DRAM copies first,
        fetches still in progress last). Called from a fetch thread; a node that does not answer
        in PEER_ASK_TIMEOUT_S is left out."""
        from ember.store.peer import OFFER_ORDER

        if not ray.is_initialized():  # the actor's class used outside Ray (tests)
            return []
        me = ray.get_runtime_context().get_node_id()
        handles = [
            h
            for n in ray.nodes()
            if n["Alive"] and n["NodeID"] != me
            for h in [node_store_handle(n["NodeID"])]
            if h is not None
        ]
        if not handles:
            return []
        # Futures, not ray.get: this runs in a thread of an async actor.
        asked = [h.peer_offer.remote(key).future() for h in handles]
        done, _ = concurrent.futures.wait(asked, timeout=PEER_ASK_TIMEOUT_S)
        offers = []
        for answer in done:
            try:
                offer = answer.result()
            except Exception as e:  # a store that died meanwhile
                logger.info("peer did not answer: %s", e)
                continue
            if offer is not None:
                offers.append(offer)
        return sorted(offers, key=lambda o: OFFER_ORDER.index(o.tier))

    async def tier_dirs(self) -> dict[str, str]:
        """The directories of this store's slot: {"dram": ..., "ssd": ...}."""
        return {"dram": str(self._store.dram.root), "ssd": str(self._store.ssd.root)}

    async def drop_page_cache(self, source: str) -> None:
        """Benchmarks: push the SSD copy out of the page cache (a truly cold SSD read)."""
        from ember.store.node_store import checkpoint_key

        d = self._store.ssd.path(checkpoint_key(source))
        for f in d.iterdir():
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _alive(pid: int) -> bool:
    """A running process (a killed actor can linger as a zombie until its parent reaps it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def start_node_store(
    node_id: str, config: NodeStoreConfig, notices: NoticeConfig | None = None
) -> Any:
    """The node's store actor, created if it does not exist (idempotent). Hard affinity: it
    must run on `node_id`, the node whose DRAM and SSD it manages (and whose cloud metadata
    `notices` reads)."""
    remote_cls: Any = ray.remote(NodeStoreActor)
    return remote_cls.options(
        name=store_actor_name(node_id),
        namespace=NAMESPACE,
        get_if_exists=True,
        num_cpus=0,
        max_concurrency=64,
        max_restarts=-1,
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node_id, soft=False),
    ).remote(config, notices)


def node_store_handle(node_id: str) -> Any | None:
    """The store actor of `node_id`, or None if that node has none."""
    try:
        return ray.get_actor(store_actor_name(node_id), namespace=NAMESPACE)
    except ValueError:
        return None


async def acquire_on_this_node(
    source: str, timeout_s: float = 600.0, *, streaming: bool = False, trust_cache: bool = False
) -> AcquireReport | None:
    """From inside an instance: fetch and pin `source` in this node's DRAM tier for this
    process. None when the node runs no store actor (the caller loads as before). With
    `trust_cache`, see `NodeStoreActor.acquire` (then `confirm_on_this_node`)."""
    node_id = ray.get_runtime_context().get_node_id()
    handle = node_store_handle(node_id)
    if handle is None:
        return None
    report: AcquireReport = await asyncio.wait_for(
        handle.acquire.remote(source, os.getpid(), streaming, trust_cache), timeout_s
    )
    return report


async def confirm_on_this_node(source: str, timeout_s: float = 60.0) -> bool:
    """After `acquire_on_this_node(..., trust_cache=True)`: whether the copy is current."""
    handle = node_store_handle(ray.get_runtime_context().get_node_id())
    if handle is None:
        return True
    return bool(await asyncio.wait_for(handle.confirm.remote(source, os.getpid()), timeout_s))


async def release_on_this_node(source: str) -> None:
    """Drop this process's pin on `source` (an instance that will not use the copy)."""
    handle = node_store_handle(ray.get_runtime_context().get_node_id())
    if handle is not None:
        await handle.release.remote(source, os.getpid())


def fetch_on_this_node(source: str, timeout_s: float = 600.0) -> AcquireReport | None:
    """Blocking form of `acquire_on_this_node` for code running in an executor thread: the
    DRAM-tier directory of `source` (pinned for this process) and where it was found; None
    without a store actor."""
    node_id = ray.get_runtime_context().get_node_id()
    handle = node_store_handle(node_id)
    if handle is None:
        return None
    report: AcquireReport = ray.get(handle.acquire.remote(source, os.getpid()), timeout=timeout_s)
    return report
