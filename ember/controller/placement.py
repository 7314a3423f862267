"""Where a new instance goes: the node where it starts soonest, by ServerlessLLM's start-up-time
estimate, among the nodes with room.

Pure function over `NodeInfo` values (no Ray). The estimate is `ember.policy.startup.load_s`,
the policy core's: a node's loading queue (the loads already running there) plus the
checkpoint's bytes over the bandwidth of the fastest tier that node holds it in: its node
store's DRAM tier (`DRAM`), its disk (`DISK`: the SSD tier, or a local model it converted),
else the remote store. The rule:
1. among alive nodes with enough free CPUs, the smallest estimated start-up time (to 1 ms);
2. among equals (a small model's tiers differ by less), the faster tier, then a node holding
   fewer instances of this deployment (spread replicas), then the one with the most free CPUs,
   then the node id (deterministic);
3. no node has room: None, and the cluster queues the actor until one has.
The size is the checkpoint's when known; otherwise `DEFAULT_MODEL_BYTES`, with which the tiers'
order still decides. Not (yet) from the policy core: live-migrating running instances to make
room (`policy.startup.place`), peers' copies (a node fetches from the remote store, never from a
neighbour), preemption risk and price (no estimate of them in the live system).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ember.controller.types import NodeInfo
from ember.policy.startup import ModelSpec, ServerState, Tier, load_s

DRAM, DISK, NOWHERE = 0, 1, 2  # locality ranks: lower starts faster
TIER_RANK = {"dram": DRAM, "ssd": DISK}
DEFAULT_MODEL_BYTES = 1 << 30
# Bytes per second a start reads its weights at, by where they are. DRAM: the pooled worker maps
# the tier's shared memory (0.05 s of weights for the 1 GB 0.5b model on the dev VM); SSD: a
# cold read (2.5-4.4 GB/s there, 2 GB/s assumed); remote: S3 into one node, an assumption (the
# loopback moto server of the benchmarks is far slower, 0.14 GB/s).
BANDWIDTH_BPS: Mapping[Tier, float] = {
    Tier.DRAM: 20e9, Tier.SSD: 2e9, Tier.PEER: 1e9, Tier.REMOTE: 1e9,
}  # fmt: skip
_TIER = {DRAM: Tier.DRAM, DISK: Tier.SSD}


@dataclass(frozen=True, slots=True)
class Placement:
    node_id: str
    startup_s: float  # estimated: the node's loading queue + this load
    tier: str  # "dram", "ssd" or "remote": where the weights will come from


def choose_node(
    nodes: Sequence[NodeInfo],
    locality: Mapping[str, int],
    *,
    need_cpus: float,
    taken: Sequence[str] = (),
    model_bytes: int | None = None,
    queue_s: Mapping[str, float] | None = None,
) -> Placement | None:
    """Where a new instance starts soonest, or None when no alive node has `need_cpus` free.

    locality: node id -> where that node holds the checkpoint (`DRAM` or `DISK`); nodes missing
    from it hold no copy. queue_s: node id -> seconds of loads already running there."""
    fits = [n for n in nodes if n.alive and n.cpus_available + 1e-9 >= need_cpus]
    if not fits:
        return None
    model = ModelSpec("checkpoint", model_bytes or DEFAULT_MODEL_BYTES)
    queue_s = queue_s or {}

    def estimate(n: NodeInfo) -> Placement:
        where = locality.get(n.node_id, NOWHERE)
        server = ServerState(
            n.node_id, free_gpus=1, bandwidth_Bps=BANDWIDTH_BPS,
            tiers={model.model_id: _TIER[where]} if where in _TIER else {},
            queue_s=queue_s.get(n.node_id, 0.0),
        )  # fmt: skip
        tier = _TIER.get(where, Tier.REMOTE).value
        return Placement(n.node_id, load_s(server, model, [server]), tier)

    options = {n.node_id: estimate(n) for n in fits}

    def rank(n: NodeInfo) -> tuple[float, int, int, float, str]:
        return (
            round(options[n.node_id].startup_s, 3), locality.get(n.node_id, NOWHERE),
            taken.count(n.node_id), -n.cpus_available, n.node_id,
        )  # fmt: skip

    return options[min(fits, key=rank).node_id]
