"""What the controller keeps about each instance and deployment, and what it needs from a cluster.

`InstanceRecord` and `DeploymentRecord` are mutable state owned by the controller (mutated on
its event loop only); an instance's `state` changes only through `fire`, which applies the pure
`types.transition`. `ClusterBackend` is the protocol `ember.cluster.RayCluster` implements.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from ember.controller.types import (
    DeploymentSpec,
    InstanceEvent,
    InstanceInfo,
    InstanceState,
    NodeInfo,
    transition,
)

if TYPE_CHECKING:
    from ember.cluster.instance import InstanceHandle, InstanceReady

logger = logging.getLogger(__name__)


class ClusterBackend(Protocol):
    """What the controller needs from the cluster (ember.cluster.RayCluster implements it)."""

    def nodes(self) -> list[NodeInfo]: ...

    def instance_cpus(self, spec: DeploymentSpec) -> float: ...

    def launch(self, spec: DeploymentSpec, instance_id: str, node_id: str | None) -> InstanceHandle:
        """Create the instance's actor(s) without waiting for them to start."""
        ...

    async def wait_started(self, handle: InstanceHandle, timeout_s: float) -> InstanceReady: ...

    async def stop(self, handle: InstanceHandle) -> None: ...

    async def probe(self, handle: InstanceHandle, timeout_s: float) -> bool:
        """False only if the instance is known to be gone (its actor or node died)."""
        ...


@dataclass(slots=True)
class InstanceRecord:
    instance_id: str
    deployment: str
    state: InstanceState
    started_at_s: float
    handle: InstanceHandle | None = None
    node_id: str | None = None
    load_s: float | None = None
    tier: str | None = None  # where its weights came from (`InstanceReady.tier`)
    # placement's estimate of its load (the node's loading queue); None: placed by Ray alone
    expected_load_s: float | None = None
    error: str | None = None
    drain_since_s: float | None = None
    task: asyncio.Task[None] | None = None
    revision: int = 0  # its deployment's revision at launch (an update bumps the deployment's)
    pid: int | None = None  # its process (`InstanceReady.pid`) once started

    def fire(self, event: InstanceEvent) -> None:
        before = self.state
        self.state = transition(self.state, event)
        logger.info(
            "instance id=%s deployment=%s event=%s state=%s->%s",
            self.instance_id,
            self.deployment,
            event,
            before,
            self.state,
        )

    def info(self) -> InstanceInfo:
        return InstanceInfo(
            instance_id=self.instance_id,
            deployment=self.deployment,
            node_id=self.node_id,
            state=self.state,
            in_flight=self.handle.in_flight if self.handle is not None else 0,
            started_at_s=self.started_at_s,
            load_s=self.load_s,
            tier=self.tier,
            error=self.error,
            revision=self.revision,
            estimated_load_s=self.expected_load_s,
            pid=self.pid,
            engine=getattr(self.handle, "engine_stats", None),
        )


@dataclass(slots=True)
class DeploymentRecord:
    spec: DeploymentSpec
    desired: int = 0
    last_busy_s: float | None = None
    wake_pending: bool = False
    deleted: bool = False
    failures: int = 0  # consecutive failed starts; reset by a successful one
    retry_at_s: float = 0.0
    last_error: str | None = None
    error_seq: int = 0
    failed: list[InstanceRecord] = field(default_factory=list)  # the last few, for `status`
    version: str | None = None  # digest of the source's contents when deployed (None: unknown)
    # Bumped by an update that needs new instances (engine fields, the source or its contents):
    # instances of an older revision serve until this one's are ready (a rolling update).
    revision: int = 0
    ahead_checked_at: float = float("-inf")  # monotonic time of the last scale-out prefetch check
