"""Where a new instance goes: the node holding its checkpoint in the fastest tier, else any
node with room.

Pure function over `NodeInfo` values (no Ray), ServerlessLLM's locality rule on the tiers
ember has:
1. among alive nodes with enough free CPUs, prefer the checkpoint in a node store's DRAM tier
   (`DRAM`), then on that node's disk (`DISK`: its SSD tier, or a local model it converted),
   then nowhere (fetched from the remote tier, or converted, at start);
2. among equals, prefer a node holding fewer instances of this deployment (spread replicas),
   then the one with the most free CPUs, then the node id (deterministic);
3. no node has room: None, and the cluster queues the actor until one has.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ember.controller.types import NodeInfo

DRAM, DISK, NOWHERE = 0, 1, 2  # locality ranks: lower starts faster
TIER_RANK = {"dram": DRAM, "ssd": DISK}


def choose_node(
    nodes: Sequence[NodeInfo],
    locality: Mapping[str, int],
    *,
    need_cpus: float,
    taken: Sequence[str] = (),
) -> str | None:
    """The node id for a new instance, or None when no alive node has `need_cpus` free.

    locality: node id -> where that node holds the checkpoint (`DRAM` or `DISK`); nodes
    missing from it hold no copy."""
    fits = [n for n in nodes if n.alive and n.cpus_available + 1e-9 >= need_cpus]
    if not fits:
        return None

    def rank(n: NodeInfo) -> tuple[int, int, float, str]:
        where = locality.get(n.node_id, NOWHERE)
        return (where, taken.count(n.node_id), -n.cpus_available, n.node_id)

    return min(fits, key=rank).node_id
