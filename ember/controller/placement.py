"""Where a new instance goes: a node that already holds the checkpoint, else any with room.

Pure function over `NodeInfo` values (no Ray). The full start-up-time scheduler (DRAM / SSD /
remote tiers, migration) replaces this later; until then the rule is the issue's:
1. among alive nodes with enough free CPUs, prefer those that already converted the checkpoint;
2. among equals, prefer a node holding fewer instances of this deployment (spread replicas),
   then the one with the most free CPUs, then the node id (deterministic);
3. no node has room: None, and the cluster queues the actor until one has.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from ember.controller.types import NodeInfo


def choose_node(
    nodes: Sequence[NodeInfo],
    checkpoint_nodes: Iterable[str],
    *,
    need_cpus: float,
    taken: Sequence[str] = (),
) -> str | None:
    """The node id for a new instance, or None when no alive node has `need_cpus` free."""
    have = set(checkpoint_nodes)
    fits = [n for n in nodes if n.alive and n.cpus_available + 1e-9 >= need_cpus]
    if not fits:
        return None

    def rank(n: NodeInfo) -> tuple[int, int, float, str]:
        return (0 if n.node_id in have else 1, taken.count(n.node_id), -n.cpus_available, n.node_id)

    return min(fits, key=rank).node_id
