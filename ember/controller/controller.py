"""The controller: deployments in, instances out, through a reconcile loop that never dies.

Owns: the set of deployments (persisted in SQLite through `DeploymentStore`, restored on
start), every instance's lifecycle record, and the decision of how many instances each
deployment should have (`ember.policy.autoscaler.desired_instances`, fed with the router's
queue and in-flight counts and an injected clock). It acts only through a `ClusterBackend`.
A preemption notice for a node (`notice`) drains the node's instances: replacements start
elsewhere and the router moves their requests live (`set_migrate_hook`).

Invariants: `reconcile_once` is idempotent (running it twice with nothing changed does
nothing); instance states change only through `types.transition`; a deployment being
deleted has no active instance once its stop tasks finish; the loop catches and logs every
exception at its boundary and keeps going.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from ember.controller.placement import DISK, NOWHERE, TIER_RANK, NodeLosses, choose_node
from ember.controller.records import ClusterBackend, DeploymentRecord, InstanceRecord
from ember.controller.state import DeploymentStore
from ember.controller.types import (
    ACTIVE_STATES,
    DeploymentSpec,
    DeploymentStatus,
    InstanceEvent,
    InstanceState,
    NodeInfo,
)
from ember.engine.checkpoint import folder_fingerprint
from ember.errors import (
    ConfigError,
    DeploymentError,
    ModelNotFoundError,
    RequestTimeoutError,
    StoreCapacityError,
)
from ember.policy.autoscaler import AutoscalerConfig, desired_instances
from ember.policy.clock import Clock, SystemClock

if TYPE_CHECKING:
    from ember.cluster.instance import InstanceHandle

logger = logging.getLogger(__name__)

LoadSource = Callable[[str], tuple[int, int]]  # deployment -> (queued, in_flight)
HINT_TTL_S = 600.0  # how long a prefetch or start is believed without the stores listing it
# Scale-out prefetch: a deployment whose load is above this fraction of what its instances are
# sized for (target_concurrency each) gets its checkpoint onto the node its next instance would
# start on; checked at most every AHEAD_INTERVAL_S per deployment.
AHEAD_LOAD = 0.5
AHEAD_INTERVAL_S = 2.0
# A node that outlives its preemption notice by this long is used again, in seconds.
NOTICE_KEEP_S = 300.0


class Controller:
    """Reconciles deployments (desired) with instances (actual); see the module docstring."""

    def __init__(
        self,
        cluster: ClusterBackend,
        db_path: str | Path,
        clock: Clock | None = None,
        reconcile_interval_s: float = 0.5,
        *,
        start_timeout_s: float = 600.0,
        max_retry_backoff_s: float = 30.0,
        probe_interval_s: float = 5.0,
    ) -> None:
        self._cluster = cluster
        self._store = DeploymentStore(db_path)
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._interval_s = reconcile_interval_s
        self._start_timeout_s = start_timeout_s
        self._max_backoff_s = max_retry_backoff_s
        self._probe_interval_s = probe_interval_s
        self._probe_task: asyncio.Task[None] | None = None
        self._last_probe_s = 0.0
        self._deployments: dict[str, DeploymentRecord] = {}
        self._instances: dict[str, InstanceRecord] = {}
        # Where each source's checkpoint is, for placement: node -> DRAM / DISK. `_stored` is
        # what the node stores listed at the last refresh; `_hints` what this controller saw
        # (an instance that started there, a prefetch it asked for), with when.
        self._stored: dict[str, dict[str, int]] = {}
        self._model_bytes: dict[str, int] = {}  # source -> checkpoint bytes, when known
        self._versions: dict[str, str] = {}  # s3:// source -> version seen by `check_source`
        self._losses = NodeLosses()  # nodes seen to go away: spot zones' preemption risk
        # node -> its store's measured fetch rates, bytes/s by "remote" / "ssd" (refreshed
        # with `_stored`; where a node measured nothing, placement takes the other nodes' S3
        # link, else its defaults)
        self._rates: dict[str, dict[str, float]] = {}
        # source -> node -> bytes a fetch in flight there still has to bring from S3
        self._pending: dict[str, dict[str, float]] = {}
        self._hints: dict[str, dict[str, tuple[int, float]]] = {}
        self._load_source: LoadSource | None = None
        self._migrate_hook: Callable[[str, float], object] | None = None
        self._noticed: dict[str, float] = {}  # node -> clock time its preemption notice ends
        self._ids = itertools.count(1)
        self._kick: asyncio.Event | None = None
        self._changed: asyncio.Event | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._cleanups: set[asyncio.Task[None]] = set()  # kills of failed instances' actors

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Restore deployments from SQLite and start the reconcile loop."""
        self._kick = asyncio.Event()
        self._changed = asyncio.Event()
        for spec in self._store.load_all():
            self._deployments[spec.name] = DeploymentRecord(spec=spec)
            logger.info("deployment restored name=%s source=%s", spec.name, spec.source)
        self._sync_nodes()  # node stores and pre-started workers start with the server
        self._loop_task = asyncio.create_task(self._run(), name="ember-reconcile")

    async def stop(self) -> None:
        """Stop the loop and every instance (deployments stay in SQLite)."""
        self._stopping = True
        for task in (self._loop_task, self._probe_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._loop_task = self._probe_task = None
        for inst in list(self._instances.values()):
            self._begin_stop(inst)
        tasks = [i.task for i in self._instances.values() if i.task is not None]
        tasks += list(self._cleanups)
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self._instances.clear()
        self._store.close()

    # --- deployments -----------------------------------------------------------------------

    def deploy(self, spec: DeploymentSpec) -> None:
        """Create or update a deployment. An update of what instances load (the source or its
        contents, tp, dtype, the engine's limits) starts a new revision: its instances replace
        the running ones one for one, which serve until their replacements are ready."""
        spec.validate()
        remote = spec.source.startswith("s3://")  # fetched by the node stores
        if not remote and not Path(spec.source).expanduser().exists():
            raise DeploymentError(f"source: {spec.source} does not exist on this machine")
        if not remote:  # its files' sizes (the converted checkpoint is about as large)
            self._model_bytes[spec.source] = _folder_bytes(Path(spec.source).expanduser())
        version = (
            self._versions.get(spec.source) if remote
            else _local_version(Path(spec.source).expanduser())
        )  # fmt: skip
        self._store.save(spec)
        dep = self._deployments.get(spec.name)
        if dep is None or dep.deleted:
            self._deployments[spec.name] = DeploymentRecord(
                spec=spec, last_busy_s=self._clock.now(), version=version
            )
            logger.info("deployment created name=%s source=%s", spec.name, spec.source)
            self._prefetch(spec)
        else:
            old = dep.spec
            # The same source with new contents (pushed or converted again in place): the
            # instances run the old weights and are replaced like on an engine change.
            updated = old.source == spec.source and None not in (dep.version, version)
            updated = updated and dep.version != version
            if (old.source, old.prefetch) != (spec.source, spec.prefetch):
                self._prefetch(spec)
            dep.spec = spec
            dep.version = version or dep.version
            dep.failures, dep.retry_at_s, dep.last_error = 0, 0.0, None
            if updated:
                logger.info("deployment source changed in place name=%s", spec.name)
            if _engine_fields(old) != _engine_fields(spec) or updated:
                # Instances load one engine configuration: a new revision replaces them, one
                # for one. The ready ones keep serving until their replacements are ready
                # (`_reconcile_deployment` retires them then); ones still starting serve no
                # one and stop now.
                dep.revision += 1
                # (New contents at the same `s3://` place roll too: a node store retires the
                # old copy the old instances map and fetches the new one beside it.)
                for inst in self._live(spec.name):
                    if inst.state in (InstanceState.PENDING, InstanceState.STARTING):
                        self._begin_stop(inst)
                logger.info("deployment revision name=%s revision=%d", spec.name, dep.revision)
            logger.info("deployment updated name=%s", spec.name)
        self._notify()

    async def check_source(self, spec: DeploymentSpec) -> None:
        """Before a deploy: an `s3://` source must hold a checkpoint the node stores can read
        (a wrong bucket or prefix fails here, not at the first request). Raises the store's
        CheckpointError naming the object; a local source is checked by `deploy`."""
        fn = getattr(self._cluster, "check_source", None)
        if spec.source.startswith("s3://") and callable(fn):
            nbytes, version = await fn(spec.source)
            self._model_bytes[spec.source] = int(nbytes)  # for placement's estimate
            self._versions[spec.source] = str(version)  # for `deploy`: an update in place
            logger.info(
                "source checked source=%s bytes=%d version=%s", spec.source, nbytes, version
            )

    def delete(self, name: str) -> None:
        """Forget a deployment and stop its instances (their actors are killed). Once they
        have stopped, an `s3://` checkpoint no other deployment serves leaves the node stores'
        DRAM tier (memory the node gets back; the SSD copy stays for a later deploy)."""
        dep = self._deployments.get(name)
        if dep is None or dep.deleted:
            raise ModelNotFoundError(f"no deployment named {name!r}")
        dep.deleted = True
        self._store.delete(name)
        for inst in self._live(name):
            self._begin_stop(inst)
        logger.info("deployment deleted name=%s", name)
        if dep.spec.source.startswith("s3://") and self._kick is not None:  # started
            stops = [i.task for i in self._live(name, include_stopping=True) if i.task]
            task = asyncio.create_task(
                self._free_dram(dep.spec.source, stops), name=f"free-dram-{name}"
            )
            self._cleanups.add(task)
            task.add_done_callback(self._cleanups.discard)
            task.add_done_callback(_log_task_error)
        self._notify()

    async def _free_dram(self, source: str, stops: list[asyncio.Task[None]]) -> None:
        """After a delete: evict `source` from every node's DRAM tier once the deployment's
        instances are gone (their pins go with their processes), unless a deployment still
        (or again) serves it."""
        await asyncio.gather(*stops, return_exceptions=True)
        evict = getattr(self._cluster, "evict", None)
        for _ in range(20):  # a pin is released when its instance process has exited
            if self._stopping or not callable(evict):
                return
            if any(d.spec.source == source and not d.deleted for d in self._deployments.values()):
                return
            _, busy = await self._evict_copies(evict, source, "dram")
            if not busy:
                return
            await asyncio.sleep(0.5)
        logger.warning("%s stayed in use in a DRAM tier after its deployment was deleted", source)

    def get(self, name: str) -> DeploymentSpec:
        dep = self._deployments.get(name)
        if dep is None or dep.deleted:
            raise ModelNotFoundError(f"no deployment named {name!r}")
        return dep.spec

    def list_deployments(self) -> list[DeploymentSpec]:
        return [d.spec for d in self._deployments.values() if not d.deleted]

    def status(self) -> list[DeploymentStatus]:
        out = []
        for name, dep in sorted(self._deployments.items()):
            if dep.deleted:
                continue
            insts = [i.info() for i in self._instances.values() if i.deployment == name]
            insts += [i.info() for i in dep.failed]
            cached = tuple(sorted(self._locality(dep.spec.source)))
            out.append(
                DeploymentStatus(
                    dep.spec, tuple(insts), dep.desired, cached, dep.revision, dep.last_error
                )
            )
        return out

    def nodes(self) -> list[NodeInfo]:
        return self._cluster.nodes()

    async def checkpoints(self) -> dict[str, list[dict[str, Any]]]:
        """Per node, the checkpoints in its node store's tiers ({} without node stores)."""
        fn = getattr(self._cluster, "checkpoints", None)
        return await fn() if callable(fn) else {}

    def pool_idle(self) -> dict[str, int]:
        """Per node, its pre-started workers waiting for a start (empty without a pool)."""
        fn = getattr(self._cluster, "pool_idle", None)
        return dict(fn()) if callable(fn) else {}

    def rates(self) -> dict[str, dict[str, float]]:
        """Per node, its store's measured fetch rates (bytes/s by "remote", "ssd"), as of the
        last refresh; placement's estimate uses them."""
        return {node_id: dict(r) for node_id, r in self._rates.items() if r}

    def ready_instances(self, name: str) -> list[InstanceHandle]:
        """Handles of the deployment's ready instances ([] for an unknown name), without those
        found lost (they are failed and replaced at the next reconcile)."""
        return [
            i.handle
            for i in self._instances.values()
            if i.deployment == name
            and i.state is InstanceState.READY
            and i.handle is not None
            and not i.handle.lost
        ]

    def set_load_source(self, fn: LoadSource) -> None:
        self._load_source = fn

    def set_migrate_hook(self, fn: Callable[[str, float], object]) -> None:
        """`fn(instance_id, deadline_s)` moves the requests streaming from an instance elsewhere,
        live, within `deadline_s` seconds (the router's `migrate`); called for each instance on
        a node under notice, with the time left until the node goes."""
        self._migrate_hook = fn

    # --- preemption notices ----------------------------------------------------------------

    def notice(self, node_id: str, deadline_s: float) -> dict[str, Any]:
        """A preemption notice: node `node_id` (a prefix is enough) goes away in `deadline_s`
        seconds. Nothing new is placed there; its starting instances stop; its ready ones
        drain: they take no new request, replacements start on other nodes at once, and the
        requests they are streaming move to other instances live (`set_migrate_hook`).
        Requests still there when the node goes are resumed from the journal.

        Returns {"node", "deadline_s", "draining": [instance ids], "moving": requests}.
        Raises ConfigError for a node id that names no alive node (or several) or a
        negative deadline."""
        if not deadline_s >= 0:
            raise ConfigError(f"deadline_s: must be >= 0 seconds, got {deadline_s!r}")
        target = _one_node([n for n in self._cluster.nodes() if n.alive], node_id)
        now = self._clock.now()
        earlier = self._noticed.get(target, math.inf)
        # A second notice cannot put the deadline off, but one past its deadline is over: a
        # node that outlived it and is noticed again goes by the new one.
        self._noticed[target] = (
            now + deadline_s if earlier < now else min(now + deadline_s, earlier)
        )
        draining: list[str] = []
        moving = 0
        for inst in list(self._instances.values()):
            if inst.node_id != target:
                continue
            if inst.state is InstanceState.READY:
                inst.fire(InstanceEvent.DRAIN)
                inst.drain_since_s = now
                draining.append(inst.instance_id)
                if self._migrate_hook is not None:
                    moved = self._migrate_hook(inst.instance_id, self._noticed[target] - now)
                    moving += moved if isinstance(moved, int) else 0
            elif inst.state in (InstanceState.PENDING, InstanceState.STARTING):
                self._begin_stop(inst)
        logger.warning(
            "preemption notice node=%s deadline_s=%.1f draining=%s moving=%d requests",
            target[:12], deadline_s, draining, moving,
        )  # fmt: skip
        self._notify()  # replacements now, not at the next tick
        return {"node": target, "deadline_s": deadline_s, "draining": draining, "moving": moving}

    async def _read_notices(self) -> None:
        """Preemption notices the nodes' clouds posted (`ClusterBackend.notices`, optional;
        read at each health probe): each new one drains its node as `notice` does."""
        notices = getattr(self._cluster, "notices", None)
        if not callable(notices):
            return
        try:
            found: dict[str, float] = await notices()
        except Exception as e:  # the cluster may be unreachable for a moment
            logger.warning("reading the nodes' preemption notices failed: %s", e)
            return
        for node_id, seconds in found.items():
            if node_id not in self._noticed:
                try:
                    self.notice(node_id, max(float(seconds), 0.0))
                except ConfigError as e:  # the node went meanwhile
                    logger.warning("preemption notice for node %s: %s", node_id[:12], e)

    def noticed(self) -> dict[str, float]:
        """Nodes under a preemption notice: node id -> seconds left (negative: overdue)."""
        now = self._clock.now()
        return {node: deadline - now for node, deadline in self._noticed.items()}

    def wake(self, name: str) -> None:
        """A request for `name` is waiting: reconcile now instead of at the next tick."""
        dep = self._deployments.get(name)
        if dep is None or dep.deleted:
            return
        dep.wake_pending = True
        dep.last_busy_s = self._clock.now()
        self._notify()

    async def wait_for_instance(self, name: str, timeout_s: float) -> None:
        """Return once `name` has a ready instance.

        Raises RequestTimeoutError after `timeout_s`, ModelNotFoundError if the deployment
        is (or becomes) unknown, DeploymentError if an instance fails to start meanwhile.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        dep = self._deployments.get(name)
        seq = dep.error_seq if dep is not None else 0
        while True:
            dep = self._deployments.get(name)
            if dep is None or dep.deleted:
                raise ModelNotFoundError(f"no deployment named {name!r}")
            if self.ready_instances(name):
                return
            if dep.error_seq != seq:
                raise DeploymentError(f"{name}: instance failed to start: {dep.last_error}")
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise RequestTimeoutError(f"{name}: no instance ready within {timeout_s:g} s")
            assert self._changed is not None, "Controller.start() was not called"
            changed = self._changed
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(changed.wait(), remaining)

    # --- the loop ------------------------------------------------------------------------

    async def _run(self) -> None:
        assert self._kick is not None
        while not self._stopping:
            try:
                await self.reconcile_once()
            except Exception:  # the loop body never dies: log and try again next tick
                logger.exception("reconcile failed; retrying in %.2f s", self._interval_s)
            try:
                self._maybe_probe()
            except Exception:
                logger.exception("starting health probes failed")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._kick.wait(), self._interval_s)
            self._kick.clear()

    def _maybe_probe(self) -> None:
        """Every probe_interval_s, ask each ready instance for its stats in the background.

        An idle instance whose actor or node died is found here rather than by the next
        request sent to it. (Loop time, not the injected clock: this is liveness, not policy.)
        """
        now = asyncio.get_running_loop().time()
        if now - self._last_probe_s < self._probe_interval_s:
            return
        if self._probe_task is not None and not self._probe_task.done():
            return
        self._last_probe_s = now
        ready = [i for i in self._instances.values() if i.state is InstanceState.READY and i.handle]
        self._probe_task = asyncio.create_task(self._probe(ready), name="ember-probe")

    async def _probe(self, insts: list[InstanceRecord]) -> None:
        """Probe `insts`, start node services on nodes that joined, and refresh what the node
        stores hold (for placement)."""
        self._sync_nodes()
        await self._read_notices()
        try:
            stored = await self.checkpoints()
        except Exception as e:
            logger.warning("listing the node stores' checkpoints failed: %s", e)
        else:
            # A fetch in flight counts as a copy in its tier where the node has no complete
            # one (a start there joins it), with the bytes still to come from S3 as pending.
            fresh: dict[str, dict[str, int]] = {}
            arriving: dict[str, dict[str, tuple[int, float]]] = {}
            for node_id, rows in stored.items():
                for row in rows:
                    if row.get("retired"):  # an old version's copy, still mapped: not served
                        continue
                    rank = TIER_RANK.get(row.get("tier", ""))
                    if rank is None:
                        continue
                    key, nbytes = str(row.get("key")), int(row.get("nbytes") or 0)
                    if nbytes:
                        self._model_bytes[key] = nbytes
                    if row.get("fetched") is not None:
                        done = float(row["fetched"])
                        best = arriving.setdefault(key, {}).get(node_id, (NOWHERE, 0.0))
                        left = (1.0 - done) * nbytes
                        if (rank, left) < best:
                            arriving[key][node_id] = (rank, left)
                        continue
                    by_node = fresh.setdefault(key, {})  # the source
                    by_node[node_id] = min(rank, by_node.get(node_id, NOWHERE))
            pending: dict[str, dict[str, float]] = {}
            for key, in_flight in arriving.items():
                for node_id, (rank, left) in in_flight.items():
                    if node_id not in fresh.get(key, {}):
                        fresh.setdefault(key, {})[node_id] = rank
                        pending.setdefault(key, {})[node_id] = left
            self._stored, self._pending = fresh, pending
        rates = getattr(self._cluster, "rates", None)
        if callable(rates):
            try:
                self._rates = await rates()
            except Exception as e:
                logger.warning("reading the node stores' fetch rates failed: %s", e)
        if not insts:
            return
        timeout_s = max(1.0, self._probe_interval_s)
        results = await asyncio.gather(
            *(self._cluster.probe(i.handle, timeout_s) for i in insts if i.handle),
            return_exceptions=True,
        )
        for inst, ok in zip(insts, results, strict=True):
            if ok is not True and inst.state is InstanceState.READY and inst.handle is not None:
                logger.warning("instance id=%s failed its health probe: %s", inst.instance_id, ok)
                inst.handle.lost = True
        if any(ok is not True for ok in results):
            self._notify()

    async def reconcile_once(self) -> None:
        """One pass: for each deployment, compare desired with actual instances and act."""
        now = self._clock.now()
        for name, dep in list(self._deployments.items()):
            try:
                self._reconcile_deployment(name, dep, now)
            except Exception:  # one broken deployment must not starve the others
                logger.exception("reconcile of deployment %s failed", name)
        for inst_id, inst in list(self._instances.items()):
            if inst.state is InstanceState.STOPPED:
                del self._instances[inst_id]
        for name, dep in list(self._deployments.items()):
            if dep.deleted and not self._live(name, include_stopping=True):
                del self._deployments[name]

    def _reconcile_deployment(self, name: str, dep: DeploymentRecord, now: float) -> None:
        insts = self._live(name)
        if dep.deleted:
            for inst in insts:
                self._begin_stop(inst)
            return
        self._reap_lost(insts)
        insts = self._live(name)
        queued, router_in_flight = self._load_source(name) if self._load_source else (0, 0)
        handle_in_flight = sum(i.handle.in_flight for i in insts if i.handle is not None)
        in_flight = max(router_in_flight, handle_in_flight)
        if dep.wake_pending and queued == 0 and in_flight == 0:
            queued = 1  # the router's request may not be counted yet
        dep.wake_pending = False
        if queued + in_flight > 0:
            dep.last_busy_s = now
        active = [i for i in insts if i.state in ACTIVE_STATES and i.revision == dep.revision]
        # A rolling update: the previous revision's ready instances, serving until replaced.
        outdated = [
            i for i in insts if i.state is InstanceState.READY and i.revision != dep.revision
        ]
        spec = dep.spec
        config = AutoscalerConfig(
            min_instances=spec.min_instances,
            max_instances=spec.max_instances,
            target_concurrency=spec.target_concurrency,
            keep_alive_s=spec.keep_alive_s,
        )
        dep.desired = desired_instances(
            config,
            queued=queued,
            in_flight=in_flight,
            # During a roll each new instance replaces an old one: the deployment's size is
            # the larger count, not their sum (which would keep the surge for good).
            current=max(len(active), len(outdated)),
            now_s=now,
            last_busy_s=dep.last_busy_s,
        )
        if dep.desired > len(active) and now >= dep.retry_at_s:
            nodes = self._cluster.nodes()
            self._observe(nodes)
            for _ in range(dep.desired - len(active)):
                nodes, placed = self._launch(dep, now, nodes)
                if not placed and outdated:
                    # No node has room for the new revision next to the old: retire an old
                    # instance first (its CPUs free up; Ray starts the queued one there).
                    self._scale_down(outdated, 1, now)
                    outdated = [i for i in outdated if i.state is InstanceState.READY]
        elif dep.desired < len(active):
            self._scale_down(active, len(active) - dep.desired, now)
        if outdated:
            # Keep as many old instances as the new revision still lacks ready ones; the rest
            # drain (busy) or stop (idle). A new revision that cannot start leaves them serving.
            ready = sum(1 for i in active if i.state is InstanceState.READY)
            keep = min(len(outdated), max(0, dep.desired - ready))
            if len(outdated) > keep:
                self._scale_down(outdated, len(outdated) - keep, now)
        self._prefetch_ahead(dep, len(active), queued + in_flight)
        for inst in insts:
            if inst.state is InstanceState.DRAINING:
                idle = inst.handle is None or inst.handle.in_flight == 0
                overdue = now - (inst.drain_since_s or now) > spec.request_timeout_s
                if idle or overdue:
                    self._begin_stop(inst)

    def _scale_down(self, active: list[InstanceRecord], surplus: int, now: float) -> None:
        # Not-yet-ready instances go first (they serve nobody), then the least loaded.
        def cost(i: InstanceRecord) -> tuple[int, int]:
            load = i.handle.in_flight if i.handle is not None else 0
            return (1 if i.state is InstanceState.READY else 0, load)

        for inst in sorted(active, key=cost)[:surplus]:
            if inst.state is InstanceState.READY and inst.handle and inst.handle.in_flight > 0:
                inst.fire(InstanceEvent.DRAIN)
                inst.drain_since_s = now
            else:
                self._begin_stop(inst)

    def _reap_lost(self, insts: list[InstanceRecord]) -> None:
        for inst in insts:
            if inst.state is InstanceState.READY and inst.handle is not None:
                if inst.handle.lost:
                    self._fail(
                        inst, "instance lost (its actor, node or engine failed)", start_failed=False
                    )

    # --- instance actions ------------------------------------------------------------------

    def _launch(
        self, dep: DeploymentRecord, now: float, nodes: list[NodeInfo]
    ) -> tuple[list[NodeInfo], bool]:
        """Start one instance; returns `nodes` with the chosen node's free CPUs reduced, and
        whether a node had room for it (else Ray queues it until one has)."""
        spec = dep.spec
        instance_id = f"{spec.name}-{next(self._ids)}"
        inst = InstanceRecord(
            instance_id, spec.name, InstanceState.PENDING, started_at_s=now, revision=dep.revision
        )
        self._instances[instance_id] = inst
        need, need_gpus = self._cluster.instance_cpus(spec), self._instance_gpus(spec)
        kw = self._estimate_inputs(spec, nodes)
        queue = kw["queue_s"]
        where = choose_node(
            [n for n in nodes if n.node_id not in self._noticed],
            self._locality(spec.source),
            need_cpus=need,
            need_gpus=need_gpus,
            taken=[i.node_id for i in self._live(spec.name) if i.node_id],
            **kw,
        )
        node_id = where.node_id if where is not None else None
        if where is not None:
            inst.expected_load_s = where.startup_s - queue.get(where.node_id, 0.0)
            logger.info(
                "placement instance=%s node=%s tier=%s estimated_start_s=%.2f risk=%.2f",
                instance_id, where.node_id[:12], where.tier, where.startup_s, where.risk,
            )  # fmt: skip
        try:
            inst.handle = self._cluster.launch(spec, instance_id, node_id)
        except Exception as e:
            logger.exception("launch of %s failed", instance_id)
            self._fail(inst, f"{type(e).__name__}: {e}")
            return nodes, True
        inst.node_id = node_id
        inst.fire(InstanceEvent.LAUNCHED)
        inst.task = asyncio.create_task(self._await_start(inst, spec), name=f"start-{instance_id}")
        nodes = [
            replace(
                n, cpus_available=n.cpus_available - need,
                gpus_available=n.gpus_available - need_gpus,
            ) if n.node_id == node_id else n
            for n in nodes
        ]  # fmt: skip
        return nodes, where is not None

    async def _await_start(self, inst: InstanceRecord, spec: DeploymentSpec) -> None:
        assert inst.handle is not None
        try:
            ready = await self._cluster.wait_started(inst.handle, self._start_timeout_s)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            if inst.state is InstanceState.STARTING:
                logger.error("instance id=%s failed to start: %s", inst.instance_id, e)
                self._fail(inst, f"{type(e).__name__}: {e}")
            return
        if inst.state is not InstanceState.STARTING:
            return  # stopped while starting; the stop task owns the actor now
        inst.node_id = ready.node_id
        inst.handle.node_id = ready.node_id
        inst.load_s = ready.load_s
        inst.tier = ready.tier
        inst.pid = ready.pid or None
        self._hint(spec.source, ready.node_id, DISK)  # at least on its disk now
        dep = self._deployments.get(inst.deployment)
        if dep is not None:
            dep.failures, dep.retry_at_s, dep.last_error = 0, 0.0, None
        inst.fire(InstanceEvent.LOADED)
        self._notify()

    def _fail(self, inst: InstanceRecord, error: str, *, start_failed: bool = True) -> None:
        """Record a failed instance and clean up its actor.

        A failed start backs the deployment off (exponentially, in clock time) and tells the
        requests waiting for an instance why; a lost instance is simply replaced.
        """
        inst.fire(InstanceEvent.ERROR)
        inst.error = error
        dep = self._deployments.get(inst.deployment)
        if dep is not None:
            if start_failed:
                dep.failures += 1
                dep.retry_at_s = self._clock.now() + min(self._max_backoff_s, 2.0**dep.failures)
                dep.last_error = error
                dep.error_seq += 1
            dep.failed = (dep.failed + [inst])[-3:]
        self._instances.pop(inst.instance_id, None)
        if inst.handle is not None:
            handle = inst.handle
            # Kill whatever is left of the actor; its record stays as FAILED for `status`.
            task = asyncio.create_task(
                self._cluster.stop(handle), name=f"cleanup-{inst.instance_id}"
            )
            self._cleanups.add(task)
            task.add_done_callback(self._cleanups.discard)
            task.add_done_callback(_log_task_error)
        self._notify()

    def _begin_stop(self, inst: InstanceRecord) -> None:
        if inst.state in (InstanceState.STOPPING, InstanceState.STOPPED, InstanceState.FAILED):
            return
        inst.fire(InstanceEvent.STOP)
        if inst.state is InstanceState.STOPPED:  # was pending: nothing was created
            return
        if inst.task is not None and not inst.task.done():
            inst.task.cancel()
        inst.task = asyncio.create_task(self._stop(inst), name=f"stop-{inst.instance_id}")
        self._notify()

    async def _stop(self, inst: InstanceRecord) -> None:
        try:
            if inst.handle is not None:
                await self._cluster.stop(inst.handle)
            inst.fire(InstanceEvent.EXITED)
        except Exception as e:
            logger.exception("stop of %s failed", inst.instance_id)
            inst.error = f"{type(e).__name__}: {e}"
            inst.fire(InstanceEvent.ERROR)
        self._notify()

    def _sync_nodes(self) -> None:
        """List the nodes: the cluster starts a node store and a pre-started worker on each new
        one (`RayCluster.nodes`), so the first request finds a warm worker waiting."""
        try:
            self._observe(self._cluster.nodes())
        except Exception as e:  # the cluster may be unreachable for a moment
            logger.warning("listing the cluster's nodes failed: %s", e)

    def _observe(self, nodes: list[NodeInfo]) -> None:
        for node_id in self._losses.observe(nodes, time.monotonic()):
            logger.warning("node lost node=%s", node_id[:12])
        if self._noticed:  # a notice ends with its node, or NOTICE_KEEP_S after its deadline
            alive = {n.node_id for n in nodes if n.alive}
            now = self._clock.now()
            for node_id, deadline in list(self._noticed.items()):
                if node_id not in alive or now > deadline + NOTICE_KEEP_S:
                    del self._noticed[node_id]

    # --- checkpoint locality ---------------------------------------------------------------

    def _locality(self, source: str) -> dict[str, int]:
        """Node id -> where it holds `source`'s checkpoint (placement.DRAM or DISK).

        What the stores listed, and this controller's hints: a local model an instance
        converted stays on that node's disk (nothing evicts conversions); an `s3://` one a
        prefetch or an instance brought in is trusted for HINT_TTL_S, by when the stores list
        it (or evicted it)."""
        now = time.monotonic()
        remote = source.startswith("s3://")
        out = {
            node_id: rank
            for node_id, (rank, at) in self._hints.get(source, {}).items()
            if not remote or now - at < HINT_TTL_S
        }
        for node_id, rank in self._stored.get(source, {}).items():
            out[node_id] = min(rank, out.get(node_id, NOWHERE))
        return out

    def _hint(self, source: str, node_id: str, rank: int) -> None:
        hints = self._hints.setdefault(source, {})
        old = hints.get(node_id)
        hints[node_id] = (min(rank, old[0]) if old else rank, time.monotonic())

    def prefetch(self, name: str, tier: str = "ssd", node_id: str | None = None) -> str:
        """Have a node's store bring deployment `name`'s `s3://` checkpoint into `tier` ("ssd"
        or "dram") in the background, or convert its local model there ("ssd") and load that
        into DRAM ("dram"); `node_id` (a prefix is enough) or, by default, the node its next
        instance would start on. Returns the node id."""
        spec = self.get(name)
        fn = self._store_lever(spec, tier, _lever_name(spec))
        nodes = [n for n in self._cluster.nodes() if n.alive]
        target = _one_node(nodes, node_id) if node_id else self._prefetch_node(spec, nodes)
        if target is None:
            raise DeploymentError("no alive node to prefetch to")
        self._bring(fn, spec, target, tier)
        logger.info("prefetch source=%s node=%s tier=%s", spec.source, target[:12], tier)
        return target

    async def evict(self, name: str, tier: str = "dram", node_id: str | None = None) -> list[str]:
        """Drop deployment `name`'s `s3://` checkpoint from `tier` on `node_id` (a prefix is
        enough) or on every node that holds it there; returns the nodes it left. A copy an
        instance is using stays; StoreCapacityError names those nodes (after the others are
        done)."""
        spec = self.get(name)
        evict = self._store_lever(spec, tier, "evict")
        nodes = None
        if node_id is not None:
            nodes = [_one_node([n for n in self._cluster.nodes() if n.alive], node_id)]
        gone, busy = await self._evict_copies(evict, spec.source, tier, nodes)
        if busy:
            done = ", ".join(n[:12] for n in gone) or "no other node"
            raise StoreCapacityError(
                spec.source,
                f"in use in {tier} on node {', '.join(n[:12] for n in busy)}; evicted from {done}",
            )
        return gone

    async def _evict_copies(
        self, evict: Callable[..., Any], source: str, tier: str, nodes: list[str] | None = None
    ) -> tuple[list[str], list[str]]:
        """Evict `source` from `tier` (with the cluster's `evict`) on `nodes`, or on every node
        whose store lists a complete copy there; (the nodes it left, the nodes where an
        instance still uses it). What this controller believed about the evicted copies goes."""
        if nodes is None:
            stored = await self.checkpoints()
            nodes = sorted(
                n for n, rows in stored.items()
                if any(
                    r.get("key") == source and r.get("tier") == tier
                    and r.get("fetched") is None  # a fetch in flight is not a copy yet
                    and not r.get("retired")
                    for r in rows
                )
            )  # fmt: skip
        gone, busy = [], []
        for n in nodes:
            try:
                if await evict(source, n, tier):
                    gone.append(n)
            except StoreCapacityError:
                busy.append(n)
        rank = TIER_RANK[tier]
        for n in gone:
            if self._stored.get(source, {}).get(n) == rank:
                del self._stored[source][n]
            hint = self._hints.get(source, {}).get(n)
            if hint is not None and hint[0] == rank:
                del self._hints[source][n]
        logger.info("evict source=%s tier=%s nodes=%s", source, tier, [n[:12] for n in gone])
        return gone, busy

    def _store_lever(self, spec: DeploymentSpec, tier: str, what: str) -> Callable[..., Any]:
        if tier not in TIER_RANK:
            raise ConfigError(f"tier: {tier!r} is not one of {', '.join(TIER_RANK)}")
        if not spec.source.startswith("s3://") and what != "prepare":
            raise ConfigError(
                f"source: {spec.name} serves {spec.source}; only s3:// checkpoints can be "
                f"{what}ed by name (a local model's converted copies leave DRAM by the stores' "
                "LRU, and stay on each node's disk until `ember cache prune`)"
            )
        fn = getattr(self._cluster, what, None)
        if not callable(fn):
            raise DeploymentError(f"this cluster runs no node stores to {what} from")
        return cast(Callable[..., Any], fn)

    def _prefetch_node(
        self,
        spec: DeploymentSpec,
        nodes: list[NodeInfo],
        taken: Sequence[str] = (),
        anywhere: bool = True,
    ) -> str | None:
        """The node the next instance of `spec` would start on (`taken`: the nodes of its
        running instances); if none has room for it, any alive one with `anywhere`, else
        None."""
        kw = self._estimate_inputs(spec, nodes)
        where = self._locality(spec.source)
        need, need_gpus = self._cluster.instance_cpus(spec), self._instance_gpus(spec)
        best = choose_node(nodes, where, need_cpus=need, need_gpus=need_gpus, taken=taken, **kw)
        if best is None and anywhere:
            best = choose_node(nodes, where, need_cpus=0.0, **kw)
        return best.node_id if best is not None else None

    def _bring(self, fn: Callable[..., Any], spec: DeploymentSpec, node_id: str, tier: str) -> None:
        """Have `node_id`'s store bring `spec`'s checkpoint into `tier` with the cluster's
        `fn` (the method `_lever_name` names), and remember that it is there. Raises what `fn`
        raises."""
        remote = spec.source.startswith("s3://")
        fn(spec.source if remote else spec, node_id, tier)
        # A local model is converted there for good; its DRAM copy is the store's to evict.
        self._hint(spec.source, node_id, TIER_RANK[tier] if remote else DISK)

    def _instance_gpus(self, spec: DeploymentSpec) -> float:
        """GPUs one instance of `spec` reserves (0 on a CPU cluster)."""
        fn = getattr(self._cluster, "instance_gpus", None)
        return float(fn(spec)) if callable(fn) else 0.0

    def _estimate_inputs(self, spec: DeploymentSpec, nodes: list[NodeInfo]) -> dict[str, Any]:
        """`choose_node`'s inputs besides the locality: the checkpoint's size, the loads
        running on each node, its preemption risk and its store's measured fetch rates."""
        return {
            "model_bytes": self._model_bytes.get(spec.source),
            "queue_s": self._loading_queue(),
            "risk": self._losses.risk(nodes, time.monotonic()),
            "rates": self._rates,
            "pending": self._pending.get(spec.source, {}),
            # (a cluster without the attribute: node stores with their default, peers on)
            "peers": spec.source.startswith("s3://") and getattr(self._cluster, "peer_fetch", True),
        }

    def _loading_queue(self) -> dict[str, float]:
        """Node id -> estimated seconds of the loads running there (instances starting)."""
        out: dict[str, float] = {}
        for inst in self._instances.values():
            if inst.node_id and inst.state in (InstanceState.PENDING, InstanceState.STARTING):
                out[inst.node_id] = out.get(inst.node_id, 0.0) + (inst.expected_load_s or 0.0)
        return out

    def _prefetch(self, spec: DeploymentSpec) -> None:
        """At deploy, for a deployment that starts with no instance: ask one node's store to
        bring its checkpoint into `spec.prefetch`'s tier now (`_bring`: an `s3://` one fetched,
        a local model converted), so the first request
        starts from it: the node the next instance would be placed on, unless a node already
        holds it in that tier or a faster one."""
        fn = getattr(self._cluster, _lever_name(spec), None)
        if spec.prefetch == "none" or not callable(fn):
            return
        if spec.min_instances > 0:  # an instance starts now; its fetch fills SSD and DRAM
            return
        want = TIER_RANK[spec.prefetch]
        where = self._locality(spec.source)
        nodes = [n for n in self._cluster.nodes() if n.alive]
        if any(where.get(n.node_id, NOWHERE) <= want for n in nodes):
            return
        node_id = self._prefetch_node(spec, nodes)
        if node_id is None:
            return
        try:
            self._bring(fn, spec, node_id, spec.prefetch)
        except Exception as e:  # a node without a store, a store gone: the first start fetches
            logger.warning("prefetch of %s to node %s failed: %s", spec.source, node_id[:12], e)
            return
        logger.info("prefetch source=%s node=%s tier=%s", spec.source, node_id[:12], spec.prefetch)

    def _prefetch_ahead(self, dep: DeploymentRecord, active: int, load: int) -> None:
        """Scale-out prefetch: while a deployment carries more than AHEAD_LOAD of what its
        instances are sized for and may still grow, the node its next instance would start on
        gets the checkpoint into the deployment's `prefetch` tier (an `s3://` one fetched, a
        local one converted). The instance that the next rise in load adds then starts from
        there instead of downloading while requests queue for it. Nothing is done when that
        node already holds the checkpoint there or faster: typically the node of a running
        instance with room for another."""
        spec = dep.spec
        if spec.prefetch == "none" or not 0 < active < spec.max_instances:
            return
        if load <= AHEAD_LOAD * active * spec.target_concurrency:
            return
        now = time.monotonic()
        if now - dep.ahead_checked_at < AHEAD_INTERVAL_S:
            return
        dep.ahead_checked_at = now
        fn = getattr(self._cluster, _lever_name(spec), None)
        if not callable(fn):
            return
        nodes = [n for n in self._cluster.nodes() if n.alive]
        taken = [i.node_id for i in self._live(spec.name) if i.node_id]
        node_id = self._prefetch_node(spec, nodes, taken, anywhere=False)
        # A local model converted there is enough (its DRAM copy is a read of the page cache).
        enough = TIER_RANK[spec.prefetch] if spec.source.startswith("s3://") else DISK
        if node_id is None or self._locality(spec.source).get(node_id, NOWHERE) <= enough:
            return
        try:
            self._bring(fn, spec, node_id, spec.prefetch)
        except Exception as e:  # the next instance fetches it itself
            logger.warning("prefetch of %s to node %s failed: %s", spec.source, node_id[:12], e)
            return
        logger.info(
            "scale-out prefetch deployment=%s source=%s node=%s tier=%s load=%d instances=%d",
            spec.name, spec.source, node_id[:12], spec.prefetch, load, active,
        )  # fmt: skip

    # --- helpers ---------------------------------------------------------------------------

    def _live(self, name: str, include_stopping: bool = False) -> list[InstanceRecord]:
        skip = {InstanceState.STOPPED, InstanceState.FAILED}
        if not include_stopping:
            skip.add(InstanceState.STOPPING)
        return [i for i in self._instances.values() if i.deployment == name and i.state not in skip]

    def _notify(self) -> None:
        if self._kick is not None:
            self._kick.set()
        if self._changed is not None:
            self._changed.set()
            self._changed = asyncio.Event()


def _local_version(path: Path) -> str | None:
    """A local source's version: a digest of an ember checkpoint's index, or of a Hugging Face
    folder's file names, sizes and mtimes (what its conversion cache key is made of)."""
    try:
        index = path / "index.json"
        data = index.read_bytes() if index.is_file() else folder_fingerprint(path).encode()
        return hashlib.sha256(data).hexdigest()[:16]
    except OSError:
        return None


def _folder_bytes(path: Path) -> int:
    try:
        return sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    except OSError:
        return 0


def _lever_name(spec: DeploymentSpec) -> str:
    """The cluster method that brings `spec`'s checkpoint onto a node: `prefetch` fetches an
    `s3://` one, `prepare` converts a local model there."""
    return "prefetch" if spec.source.startswith("s3://") else "prepare"


def _one_node(nodes: list[NodeInfo], prefix: str) -> str:
    """The alive node whose id starts with `prefix` (`ember status` shows 12 characters)."""
    hits = [n.node_id for n in nodes if n.node_id.startswith(prefix)] if prefix else []
    if len(hits) != 1:
        what = "no alive node" if not hits else f"{len(hits)} alive nodes"
        raise ConfigError(f"node: {what} with an id starting {prefix!r}")
    return hits[0]


def _engine_fields(spec: DeploymentSpec) -> tuple[object, ...]:
    return (
        spec.source, spec.tp, spec.dtype, spec.max_model_len, spec.max_num_seqs,
        spec.max_num_batched_tokens,
    )  # fmt: skip


def _log_task_error(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("background task %s failed: %s", task.get_name(), task.exception())
