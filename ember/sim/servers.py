"""The serverless simulator's servers and instances, and the snapshot of them that the policy's
placement functions take (`server_states`: free GPUs, the tier holding a model on each server,
loading-queue wait, running instances with their token counts, notice, preemption risk, price).

A server's DRAM keeps checkpoints least recently used first (`dram_models` of them); its SSD
holds the checkpoints it was given when it joined. Preemption risk of a server = the share of
its zone's nodes removed in the last hour. State only; the simulator decides.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ember.policy import ModelSpec, RunningInstance, ServerState, Tier
from ember.policy.startup import RISK_WINDOW_S, zone_risk
from ember.sim.fleet import Replica, Requests
from ember.sim.switch import G4DN_SPOT_USD_PER_GPU_HOUR


def _default_bandwidth() -> dict[Tier, float]:
    # DRAM->GPU 25 GB/s: ServerlessLLM's hard-coded PCIe figure; SSD 2 GB/s and peer 50 Gbps:
    # the policy's LinkBandwidth defaults (SpotServe's network); remote 1 GB/s: an assumption.
    return {Tier.DRAM: 25e9, Tier.SSD: 2e9, Tier.PEER: 50e9 / 8, Tier.REMOTE: 1e9}


@dataclass(frozen=True, slots=True)
class ServerlessParams:
    keep_alive_s: float = 60.0
    target_concurrency: int = 4
    max_instances: int = 8
    dram_models: int = 4  # checkpoints a server's host DRAM keeps (LRU)
    ssd_copies: int = 2  # servers whose SSD holds each checkpoint when they join
    grace_period_s: float = 30.0
    max_batch: int = 4
    drain_s: float = 3600.0
    gpu_memory_bytes: int = 16 * 2**30
    spot_usd_per_gpu_hour: float = G4DN_SPOT_USD_PER_GPU_HOUR
    bandwidth: dict[Tier, float] = field(default_factory=_default_bandwidth)


class Server:
    __slots__ = (
        "name",
        "zone",
        "gpus",
        "free",
        "instances",
        "dram",
        "ssd",
        "noticed",
        "queue_until",
    )

    def __init__(self, name: str, zone: str, gpus: int, ssd: set[int]) -> None:
        self.name, self.zone, self.gpus, self.free = name, zone, gpus, gpus
        self.instances: set[Instance] = set()
        self.dram: OrderedDict[int, None] = OrderedDict()
        self.ssd = ssd
        self.noticed = False
        self.queue_until = 0.0


class Instance:
    __slots__ = ("iid", "model", "server", "rep", "ready", "last_used", "draining")

    def __init__(self, iid: int, model: int, server: Server, rep: Replica) -> None:
        self.iid, self.model, self.server, self.rep = iid, model, server, rep
        self.ready = False
        self.last_used = 0.0
        self.draining = False


def tier_on(s: Server, m: int, key: str) -> dict[str, Tier]:
    """{model key: fastest tier holding model `m` on `s`} (empty: nowhere on it)."""
    if any(i.model == m and i.ready and not i.rep.busy for i in s.instances):
        return {key: Tier.GPU}
    if m in s.dram:
        return {key: Tier.DRAM}
    if m in s.ssd:
        return {key: Tier.SSD}
    return {}


def server_states(
    servers: Mapping[str, Server],
    m: int,
    key: str,
    *,
    now: float,
    removals: Mapping[str, deque[float]],
    params: ServerlessParams,
    specs: Sequence[ModelSpec],
    reqs: Requests,
) -> list[ServerState]:
    """What the placement policy sees of every server when model `m` (named `key`) wants an
    instance. Prunes `removals` older than the risk window."""
    out = []
    for s in servers.values():
        recent = removals.get(s.zone, deque())
        while recent and recent[0] < now - RISK_WINDOW_S:
            recent.popleft()
        zone_nodes = sum(1 for x in servers.values() if x.zone == s.zone)
        running = tuple(
            RunningInstance(
                str(i.iid),
                specs[i.model],
                tuple(reqs.prompt[r] + reqs.gen[r] for r in i.rep.batch),
            )
            for i in sorted(s.instances, key=lambda i: i.iid)
        )
        out.append(
            ServerState(
                s.name,
                s.free,
                tier_on(s, m, key),
                params.bandwidth,
                max(0.0, s.queue_until - now),
                running,
                s.noticed,
                zone_risk(len(recent), zone_nodes),
                params.spot_usd_per_gpu_hour,
            )
        )
    return out
