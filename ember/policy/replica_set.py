"""The replicas of a placement, as a reconfiguration sees them: which GPUs each old replica
holds, which old replicas may send weights, and the merged placement of kept and built replicas.

Replica numbers: `Placement` positions carry them; a reconfiguration numbers the new replicas
kept ones first (in old order), then built ones. Pure bookkeeping; no decision is made here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ember.policy.layout import Placement, Position
from ember.policy.optimizer import ParallelConfig


def old_replicas(old: Placement | None) -> dict[int, list[str]]:
    """Old replica -> its GPUs, in position order."""
    out: dict[int, list[str]] = {}
    if old is not None:
        for pos, g in old.assignment.items():
            out.setdefault(pos.replica, []).append(g)
    return out


@dataclass(frozen=True, slots=True)
class Senders:
    """The old replicas a migration may read from, renumbered 0..k-1 in `placement`."""

    placement: Placement
    renumber: Mapping[int, int]  # old replica -> its number in `placement`

    def renumber_kv(self, kv_stay: Mapping[int, int]) -> dict[int, int]:
        return {n: self.renumber[o] for n, o in kv_stay.items() if o in self.renumber}

    def renumber_bytes(self, per_replica: Mapping[int, int]) -> dict[int, int]:
        return {self.renumber[o]: b for o, b in per_replica.items() if o in self.renumber}


def senders(
    old: Placement | None,
    stop: Sequence[int],
    kept: Sequence[int],
    n_build: int,
    trim: bool,
) -> Senders | None:
    """Old replicas that may send: every one, or with `trim` the stopped ones plus up to
    max(1, `n_build`) untouched ones (the huge-fleet shortcut)."""
    if old is None:
        return None
    if trim:
        chosen = list(stop) + [r for r in kept[: max(1, n_build)] if r not in stop]
    else:
        chosen = sorted({*stop, *kept})
    renum = {r: k for k, r in enumerate(chosen)}
    assign = {
        Position(renum[p.replica], p.stage, p.shard): g
        for p, g in old.assignment.items()
        if p.replica in renum
    }
    return Senders(Placement(old.config.with_dp(len(chosen)), assign), renum)


def merge(
    new: ParallelConfig,
    old: Placement | None,
    keep: Mapping[int, int],
    build: Mapping[int, tuple[str, ...]],
) -> Placement:
    """The new placement: kept replicas where they are (renumbered), built ones on their GPUs."""
    assign: dict[Position, str] = {}
    renumber = {o: n for n, o in keep.items()}
    if old is not None:
        for pos, g in old.assignment.items():
            n = renumber.get(pos.replica)
            if n is not None:
                assign[Position(n, pos.stage, pos.shard)] = g
    for n, gpus in build.items():
        k = 0
        for p in range(new.pp):
            for m in range(new.tp):
                assign[Position(n, p, m)] = gpus[k]
                k += 1
    return Placement(new, assign)
