"""Where a new instance goes: the node where it starts soonest, by ServerlessLLM's start-up-time
estimate, among the nodes with room.

Pure function over `NodeInfo` values (no Ray). The estimate is `ember.policy.startup.load_s`,
the policy core's: a node's loading queue (the loads already running there) plus the
checkpoint's bytes over the bandwidth of the fastest tier that node holds it in: its node
store's DRAM tier (`DRAM`), its disk (`DISK`: the SSD tier, or a local model it converted),
else another node's copy (an `s3://` checkpoint another node holds: its store streams it,
`ember.store.peer`), else the remote store. The rule:
1. among alive nodes with enough free CPUs, the lowest score: estimated start-up time plus the
   risk term (to 1 ms);
2. among equals (a small model's tiers differ by less), the faster tier, then a node holding
   fewer instances of this deployment (spread replicas), then the one with the most free CPUs,
   then the node id (deterministic);
3. no node has room (the CPUs, and GPUs for a GPU instance): None, and the cluster queues the
   actor until one has.
The size is the checkpoint's when known; otherwise `DEFAULT_MODEL_BYTES`, with which the tiers'
order still decides. The bandwidths are each node's measured ones where its node store has
measured them (`ember.store.rates`: every fetch from S3, every read of its disk); a node that
has not fetched from the remote store yet takes the median of the nodes that have (they all
fetch from the same store); else the assumed `BANDWIDTH_BPS`: a node with a slow link to the
remote store, or a slow disk, loses to one that fetches faster. The score adds ember's preemption-risk term (`SCORE`): a spot node's
risk is its zone's recent node losses over its alive nodes (`NodeLosses`); and its price: a
node labelled `price=<$ per hour>` (per GPU on a GPU node) costs `SCORE.price_weight_s` seconds
per dollar, so between nodes that start a model about as soon the cheaper one wins, and a
dearer node must start it that much sooner (unlabelled nodes cost 0; an unreadable label is
logged once and counts as 0). Not (yet) from the policy core: live-migrating running instances to make room
(`policy.startup.place`).
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from ember.controller.types import NodeInfo
from ember.policy.startup import (
    RISK_WINDOW_S,
    ModelSpec,
    PlacementConfig,
    ServerState,
    Tier,
    load_s,
    score,
    zone_risk,
)

logger = logging.getLogger(__name__)

DRAM, DISK, NOWHERE = 0, 1, 2  # locality ranks: lower starts faster
TIER_RANK = {"dram": DRAM, "ssd": DISK}
DEFAULT_MODEL_BYTES = 1 << 30
# Bytes per second a start reads its weights at, by where they are. DRAM: the pooled worker maps
# the tier's shared memory (0.05 s of weights for the 1 GB 0.5b model on the dev VM); SSD: a
# cold read (2.5-4.4 GB/s there, 2 GB/s assumed); peer: another node's copy over the cluster's
# network (`ember.store.peer`; a 25 Gbit/s link carries ~3 GB/s, 2 assumed); remote: S3 into
# one node, an assumption (the loopback moto server of the benchmarks is far slower, 0.14 GB/s).
BANDWIDTH_BPS: Mapping[Tier, float] = {
    Tier.DRAM: 20e9, Tier.SSD: 2e9, Tier.PEER: 2e9, Tier.REMOTE: 1e9,
}  # fmt: skip
_TIER = {DRAM: Tier.DRAM, DISK: Tier.SSD}
# a node store's rates -> tiers
_MEASURED = {"remote": Tier.REMOTE, "ssd": Tier.SSD, "peer": Tier.PEER}
# ember's score: start-up + 60 s per unit of preemption risk + 1 s per $/hour (the policy
# core's defaults).
SCORE = replace(PlacementConfig.ember(), migrate=False)


@dataclass(frozen=True, slots=True)
class Placement:
    node_id: str
    startup_s: float  # estimated: the node's loading queue + this load
    tier: str  # "dram", "ssd", "peer" or "remote": where the weights will come from
    risk: float = 0.0  # the node's preemption risk (spot nodes in a zone losing nodes)


def choose_node(
    nodes: Sequence[NodeInfo],
    locality: Mapping[str, int],
    *,
    need_cpus: float,
    need_gpus: float = 0.0,
    taken: Sequence[str] = (),
    model_bytes: int | None = None,
    queue_s: Mapping[str, float] | None = None,
    risk: Mapping[str, float] | None = None,
    rates: Mapping[str, Mapping[str, float]] | None = None,
    pending: Mapping[str, float] | None = None,
    peers: bool = False,
) -> Placement | None:
    """Where a new instance starts soonest, or None when no alive node has `need_cpus` CPUs
    and `need_gpus` GPUs free.

    locality: node id -> where that node holds the checkpoint (`DRAM` or `DISK`); nodes missing
    from it hold no copy. queue_s: node id -> seconds of loads already running there. risk:
    node id -> preemption risk (0-1), which costs `SCORE.risk_penalty_s` seconds per unit.
    rates: node id -> its store's measured bytes/s by "remote" and "ssd"
    (`NodeStore.rates`), in place of the assumed `BANDWIDTH_BPS`. pending: node id -> bytes of
    the checkpoint still on their way from the remote store into the tier `locality` names
    (a fetch in flight there, a prefetch say): a start there waits for them, at the node's
    remote bandwidth. peers: a node without a copy fetches it from a node that has one (an
    `s3://` checkpoint: the node stores fetch from their peers), at its "peer" rate."""
    fits = [
        n for n in nodes
        if n.alive and n.cpus_available + 1e-9 >= need_cpus
        and n.gpus_available + 1e-9 >= need_gpus
    ]  # fmt: skip
    if not fits:
        return None
    model = ModelSpec("checkpoint", model_bytes or DEFAULT_MODEL_BYTES)
    queue_s, risk, rates, pending = queue_s or {}, risk or {}, rates or {}, pending or {}

    # Every node fetches from the same remote store: one that has not fetched from it yet is
    # expected to reach it as the nodes that have (their median), not at the assumed constant
    # (1 GB/s, against 0.10 GB/s measured from moto here: a 10x error in a new node's estimate).
    fleet = {}
    for kind in ("remote", "peer"):  # the peers' links: alike too, as a first guess
        fetched = [r[kind] for r in rates.values() if r.get(kind, 0.0) > 0]
        if fetched:
            fleet[kind] = statistics.median(fetched)
    holders = {node_id for node_id, rank in locality.items() if rank in _TIER} if peers else set()

    def bandwidth(node_id: str) -> Mapping[Tier, float]:
        measured = {**fleet, **(rates.get(node_id) or {})}
        out = dict(BANDWIDTH_BPS)
        out.update({_MEASURED[k]: v for k, v in measured.items() if k in _MEASURED and v > 0})
        return out

    def estimate(n: NodeInfo) -> Placement:
        where = locality.get(n.node_id, NOWHERE)
        bw = bandwidth(n.node_id)
        arriving = pending.get(n.node_id, 0.0) / bw[Tier.REMOTE] if where in _TIER else 0.0
        if where in _TIER:
            held = _TIER[where]
        elif holders - {n.node_id}:
            held = Tier.PEER
        else:
            held = Tier.REMOTE
        server = ServerState(
            n.node_id, free_gpus=1, bandwidth_Bps=bw,
            tiers={model.model_id: held} if held is not Tier.REMOTE else {},
            queue_s=queue_s.get(n.node_id, 0.0) + arriving,
            preemption_risk=risk.get(n.node_id, 0.0),
            price_per_gpu_hour=node_price(n),
        )  # fmt: skip
        startup = load_s(server, model, [server])
        scores[n.node_id] = score(server, model, startup, SCORE)
        return Placement(n.node_id, startup, held.value, server.preemption_risk)

    scores: dict[str, float] = {}
    options = {n.node_id: estimate(n) for n in fits}

    def rank(n: NodeInfo) -> tuple[float, int, int, float, str]:
        return (
            round(scores[n.node_id], 3), locality.get(n.node_id, NOWHERE),
            taken.count(n.node_id), -n.cpus_available, n.node_id,
        )  # fmt: skip

    return options[min(fits, key=rank).node_id]


def node_price(n: NodeInfo) -> float:
    """The node's `price` label: $ per hour (per GPU on a GPU node); 0 if absent or bad."""
    text = n.label("price")
    if not text:
        return 0.0
    try:
        price = float(text)
    except ValueError:
        price = -1.0
    if not (math.isfinite(price) and price >= 0):
        if (n.node_id, text) not in _BAD_PRICES:  # once, not at every placement
            _BAD_PRICES.add((n.node_id, text))
            logger.warning("node %s: label price=%r is not $ per hour; using 0", n.node_id, text)
        return 0.0
    return price


_BAD_PRICES: set[tuple[str, str]] = set()


class NodeLosses:
    """The node losses the controller saw, by zone: a spot node's preemption risk is the share
    of its zone's nodes lost in the last hour (`policy.startup.zone_risk`, as the simulator
    computes it from the spot traces). On-demand nodes (label spot != "true") have none."""

    def __init__(self, window_s: float = RISK_WINDOW_S) -> None:
        self.window_s = window_s
        self._alive: dict[str, str] = {}  # node id -> zone, alive at the last look
        self._losses: deque[tuple[float, str]] = deque()  # (time, zone)

    def observe(self, nodes: Sequence[NodeInfo], now: float) -> list[str]:
        """Note which nodes alive at the last look are gone or dead now; returns their ids."""
        alive = {n.node_id: n.label("zone") or "" for n in nodes if n.alive}
        lost = [node_id for node_id in self._alive if node_id not in alive]
        self._losses.extend((now, self._alive[node_id]) for node_id in lost)
        self._alive = alive
        return lost

    def risk(self, nodes: Sequence[NodeInfo], now: float) -> dict[str, float]:
        """Node id -> preemption risk, for the alive spot nodes."""
        while self._losses and self._losses[0][0] < now - self.window_s:
            self._losses.popleft()
        out = {}
        for n in nodes:
            if n.alive and n.label("spot") == "true":
                zone = n.label("zone") or ""
                lost = sum(1 for _, z in self._losses if z == zone)
                if lost:
                    in_zone = sum(1 for m in nodes if m.alive and (m.label("zone") or "") == zone)
                    out[n.node_id] = zone_risk(lost, in_zone)
        return out
