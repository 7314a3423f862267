"""Migration planner (SpotServe §2c): the transfers that turn an old placement into a new one.

Unit of transfer: (layer, fragment), fragments being the hidden-dimension slices at granularity
F = max(M_old, M_new); layer -1 is the embedding (first stage), layer L the LM head (last stage).
For each unit a new GPU needs and does not hold, a sender is picked among the old holders that
are still reachable (same host first, then the least loaded, then by id: holders are grouped by
host and the cross-host choice comes from one heap per old (stage, shard) position, so a pick
costs O(log holders) instead of a scan of every holder); with no holder left
the unit is loaded from storage (`TransferKind.LOAD`), as is every missing unit when
`peer_copies=False` (the baselines). Tensor degrees must divide one another. KV cache units move only for new replicas
that inherit an old replica's requests (`kv_stay`).
Order: KV cache first; then "prior" transfers (sender or receiver dying), layer by layer front to
back; then the rest front to back, so the new configuration can compute the early layers while
later ones arrive. With a per-GPU memory limit, layer groups are taken front-most-first among
those that keep every receiving GPU under the limit (a GPU frees a unit it no longer needs once
its last send of it is done). When no remaining group fits, the least-bad one goes next (the
smallest overflow of any receiving GPU, front-most on ties), as SpotServe's planner does, and the
plan says so (`within_memory=False`); a GPU already over its limit before any transfer also
gives `within_memory=False`.
Time: max over hosts of inter-host bytes / inter-host bandwidth, plus the same for intra-host
and storage loads, plus a fixed overhead; per-layer readiness scales with bytes in plan order.
"""

from __future__ import annotations

import enum
import heapq
from collections import defaultdict
from collections.abc import Collection, Mapping
from dataclasses import dataclass

from ember.errors import ConfigError, PolicyError
from ember.policy.layout import ModelShape, Placement, Position, stage_layers

Unit = tuple[int, int]  # (layer, fragment)
Key = tuple[str, int, int, int]  # (kind "w" / "kv", old replica or -1, layer, fragment)


class TransferKind(str, enum.Enum):
    KV = "kv"
    WEIGHTS = "weights"
    LOAD = "load"  # no live holder: read from storage


@dataclass(frozen=True, slots=True)
class Transfer:
    kind: TransferKind
    layer: int  # -1 embedding, 0..L-1 decoder layers, L LM head
    fragment: int  # slice [fragment / fragments, (fragment + 1) / fragments) of the hidden dim
    fragments: int
    src: str | None  # GPU id; None for LOAD
    dst: str
    nbytes: int
    prior: bool  # a dying GPU sends or receives
    replica: int = -1  # KV: the old replica whose cache this is

    @property
    def key(self) -> Key:
        kind = "kv" if self.kind is TransferKind.KV else "w"
        return (kind, self.replica, self.layer, self.fragment)


@dataclass(frozen=True, slots=True)
class LinkBandwidth:
    """Bytes per second of each path, and a fixed per-migration overhead."""

    intra_host_Bps: float = 50e9 / 8  # noqa: N815  (SpotServe assumes 50 Gbps)
    inter_host_Bps: float = 50e9 / 8  # noqa: N815
    storage_Bps: float = 2e9  # noqa: N815
    overhead_s: float = 0.5

    def __post_init__(self) -> None:
        for name in ("intra_host_Bps", "inter_host_Bps", "storage_Bps"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.overhead_s < 0:
            raise ConfigError(f"overhead_s must be >= 0, got {self.overhead_s}")


@dataclass(frozen=True, slots=True)
class MigrationPlan:
    transfers: tuple[Transfer, ...]
    estimated_s: float
    prefix_ready_s: tuple[float, ...]  # [i]: layers -1..i-1 all arrived (i = 0 is embedding)
    peak_bytes: Mapping[str, int]  # per receiving GPU, the most it holds during the plan
    moved_bytes: int
    loaded_bytes: int
    within_memory: bool = True  # False: some GPU exceeds its limit (least-bad order taken)


def _units_of(pos: Position, pp: int, tp: int, shape: ModelShape, frags: int) -> list[Unit]:
    lo, hi = stage_layers(pos.stage, pp, shape.layers)
    layers = list(range(lo, hi))
    if pos.stage == 0:
        layers.insert(0, -1)
    if pos.stage == pp - 1:
        layers.append(shape.layers)
    per = frags // tp
    return [(ly, f) for ly in layers for f in range(pos.shard * per, (pos.shard + 1) * per)]


def _unit_bytes(layer: int, shape: ModelShape, frags: int) -> int:
    if layer == -1:
        return shape.embed_bytes // frags
    if layer == shape.layers:
        return shape.head_bytes // frags
    return shape.layer_bytes // frags


def plan_migration(
    old: Placement | None,
    new: Placement,
    shape: ModelShape,
    hosts: Mapping[str, str],
    *,
    dying: Collection[str] = (),
    lost: Collection[str] = (),
    kv_stay: Mapping[int, int] | None = None,
    kv_layer_bytes: Mapping[int, int] | None = None,
    memory_limit_bytes: int | Mapping[str, int] | None = None,
    bandwidth: LinkBandwidth | None = None,
    peer_copies: bool = True,
) -> MigrationPlan:
    """Transfers from `old` to `new` (see the module docstring for order and estimates).

    `hosts` maps every GPU id of both placements to its host; `dying` GPUs are under notice
    (they may send, and are absent from `new`); `lost` GPUs are gone (they cannot send).
    `peer_copies=False` loads every missing weight from storage (the baselines' behaviour).
    """
    bw = bandwidth or LinkBandwidth()
    oc, nc = (old.config if old else None), new.config
    frags = max(oc.tp if oc else 1, nc.tp)
    if frags % nc.tp or (oc is not None and frags % oc.tp):
        raise PolicyError(
            f"tensor degrees {oc.tp if oc else 1} and {nc.tp} must divide one another"
        )
    lost_set, dying_set = set(lost), set(dying)
    missing = sorted(g for g in [*new.gpus(), *(old.gpus() if old else ())] if g not in hosts)
    if missing:
        raise PolicyError(f"hosts has no entry for GPU(s) {missing[:5]}")
    senders = _Senders(hosts)
    held: dict[str, dict[Key, int]] = defaultdict(dict)  # gpu -> unit key -> bytes
    if old is not None and oc is not None:
        for g, pos in sorted(old.by_gpu().items()):
            units = _units_of(pos, oc.pp, oc.tp, shape, frags)
            for u in units:
                held[g][("w", -1, *u)] = _unit_bytes(u[0], shape, frags)
            if g not in lost_set:
                senders.add(g, (pos.stage, pos.shard), units)
            kv = (kv_layer_bytes or {}).get(pos.replica, 0)
            for ly, f in units:
                if kv and 0 <= ly < shape.layers:
                    held[g][("kv", pos.replica, ly, f)] = kv // frags
    raw: list[Transfer] = []
    needs: dict[str, set[Key]] = {}
    for pos, dst in new.assignment.items():
        mine = held.get(dst, {})
        units = _units_of(pos, nc.pp, nc.tp, shape, frags)
        needs[dst] = {("w", -1, *u) for u in units}
        for u in units:
            if ("w", -1, *u) in mine:
                continue
            nbytes = _unit_bytes(u[0], shape, frags)
            src = senders.pick(u, dst, nbytes) if peer_copies else None
            if src is None:
                raw.append(Transfer(TransferKind.LOAD, u[0], u[1], frags, None, dst, nbytes, False))
                continue
            prior = src in dying_set or dst in dying_set
            raw.append(Transfer(TransferKind.WEIGHTS, u[0], u[1], frags, src, dst, nbytes, prior))
        r_old = (kv_stay or {}).get(pos.replica)
        if old is None or oc is None or r_old is None or not (kv_layer_bytes or {}).get(r_old):
            continue
        kv_unit = (kv_layer_bytes or {})[r_old] // frags
        per_old = frags // oc.tp
        for ly, f in units:
            if not 0 <= ly < shape.layers:
                continue
            needs[dst].add(("kv", r_old, ly, f))
            p_old = next(p for p in range(oc.pp) if _in_stage(ly, p, oc.pp, shape.layers))
            kv_src = old.assignment.get(Position(r_old, p_old, f // per_old))
            if kv_src is None or kv_src == dst or kv_src in lost_set:
                continue
            prior = kv_src in dying_set
            raw.append(
                Transfer(TransferKind.KV, ly, f, frags, kv_src, dst, kv_unit, prior, replica=r_old)
            )
    limits = _limits(memory_limit_bytes, new)
    ordered, peak, fits = _order(raw, held, needs, limits)
    return _estimate(ordered, peak, fits, hosts, bw, shape)


class _Senders:
    """Live holders of each unit, grouped by host, with the bytes each has been given to send.

    Every unit is held by the GPUs of one old (stage, shard) position, one per old replica, and
    each GPU belongs to exactly one such group; so one heap of (bytes sent, GPU id) per group
    serves all of its units, and a pick from the heap only changes its own top. `pick` returns
    what a scan of every holder by (other host, bytes sent, GPU id) would: the least-loaded
    holder on the receiver's host if there is one (a host has few GPUs), else the heap's top;
    an entry left stale by a same-host pick is refreshed when it surfaces (loads only grow).
    """

    def __init__(self, hosts: Mapping[str, str]) -> None:
        self.hosts = hosts
        self.load: dict[str, int] = defaultdict(int)
        self.group_of: dict[Unit, tuple[int, int]] = {}
        self.by_host: dict[tuple[int, int], dict[str, list[str]]] = defaultdict(dict)
        self.heap: dict[tuple[int, int], list[tuple[int, str]]] = defaultdict(list)

    def add(self, g: str, group: tuple[int, int], units: list[Unit]) -> None:
        self.by_host[group].setdefault(self.hosts[g], []).append(g)
        heapq.heappush(self.heap[group], (0, g))
        for u in units:
            self.group_of[u] = group

    def pick(self, u: Unit, dst: str, nbytes: int) -> str | None:
        group = self.group_of.get(u)
        if group is None:
            return None
        local = self.by_host[group].get(self.hosts[dst])
        if local:
            src = min(local, key=lambda g: (self.load[g], g))
            self.load[src] += nbytes
            return src
        heap = self.heap[group]
        while heap[0][0] != self.load[heap[0][1]]:
            g = heap[0][1]
            heapq.heapreplace(heap, (self.load[g], g))
        src = heap[0][1]
        self.load[src] += nbytes
        heapq.heapreplace(heap, (self.load[src], src))
        return src


def _in_stage(layer: int, stage: int, pp: int, layers: int) -> bool:
    lo, hi = stage_layers(stage, pp, layers)
    return lo <= layer < hi


def _limits(limit: int | Mapping[str, int] | None, new: Placement) -> dict[str, float]:
    if limit is None:
        return {g: float("inf") for g in new.gpus()}
    if isinstance(limit, Mapping):
        return {g: float(limit.get(g, float("inf"))) for g in new.gpus()}
    return {g: float(limit) for g in new.gpus()}


def _phase(t: Transfer) -> int:
    return 0 if t.kind is TransferKind.KV else 1 if t.prior else 2


def _order(
    raw: list[Transfer],
    held: Mapping[str, Mapping[Key, int]],
    needs: Mapping[str, set[Key]],
    limits: Mapping[str, float],
) -> tuple[list[Transfer], dict[str, int], bool]:
    """Groups (phase, layer) in order, front-most group that fits the memory limits first, the
    least-bad group when none fits; also whether every GPU stayed within its limit."""
    groups: dict[tuple[int, int], list[Transfer]] = defaultdict(list)
    for t in raw:
        groups[(_phase(t), t.layer)].append(t)
    pending: dict[tuple[str, Key], int] = defaultdict(int)
    for t in raw:
        if t.src is not None:
            pending[(t.src, t.key)] += 1
    usage: dict[str, int] = {g: 0 for g in limits}
    for g in limits:
        for key, nbytes in held.get(g, {}).items():
            if key in needs.get(g, set()) or pending.get((g, key), 0):
                usage[g] += nbytes
    fits = all(u <= limits[g] for g, u in usage.items())
    peak = dict(usage)
    remaining = sorted(groups)
    out: list[Transfer] = []
    while remaining:
        pick, least_bad = None, (float("inf"), remaining[0])
        for gk in remaining:
            incoming: dict[str, int] = defaultdict(int)
            for t in groups[gk]:
                incoming[t.dst] += t.nbytes
            over = max(
                (usage.get(d, 0) + b - limits.get(d, float("inf")) for d, b in incoming.items()),
                default=0.0,
            )
            if over <= 0:
                pick = gk
                break
            least_bad = min(least_bad, (over, gk))
        if pick is None:
            pick, fits = least_bad[1], False
        remaining.remove(pick)
        batch = sorted(groups[pick], key=lambda t: (t.dst, t.fragment, t.src or "", t.kind.value))
        for t in batch:
            if t.dst in usage:
                usage[t.dst] += t.nbytes
                peak[t.dst] = max(peak[t.dst], usage[t.dst])
        for t in batch:
            if t.src is None:
                continue
            pending[(t.src, t.key)] -= 1
            if pending[(t.src, t.key)] == 0 and t.key not in needs.get(t.src, set()):
                if t.src in usage:
                    usage[t.src] -= held[t.src][t.key]
        out.extend(batch)
    return out, peak, fits


def _estimate(
    ordered: list[Transfer],
    peak: dict[str, int],
    fits: bool,
    hosts: Mapping[str, str],
    bw: LinkBandwidth,
    shape: ModelShape,
) -> MigrationPlan:
    inter_out: dict[str, int] = defaultdict(int)
    inter_in: dict[str, int] = defaultdict(int)
    intra: dict[str, int] = defaultdict(int)
    load: dict[str, int] = defaultdict(int)
    for t in ordered:
        hd = hosts[t.dst]
        if t.src is None:
            load[hd] += t.nbytes
        elif hosts[t.src] == hd:
            intra[hd] += t.nbytes
        else:
            inter_out[hosts[t.src]] += t.nbytes
            inter_in[hd] += t.nbytes
    inter = max([*inter_out.values(), *inter_in.values()], default=0)
    body = (
        inter / bw.inter_host_Bps
        + max(intra.values(), default=0) / bw.intra_host_Bps
        + max(load.values(), default=0) / bw.storage_Bps
    )
    total_bytes = sum(t.nbytes for t in ordered)
    last_done: dict[int, float] = {}
    done = 0
    for t in ordered:
        done += t.nbytes
        last_done[t.layer] = bw.overhead_s + (body * done / total_bytes if total_bytes else 0.0)
    prefix: list[float] = []
    running = bw.overhead_s if ordered else 0.0
    for layer in range(-1, shape.layers + 1):
        running = max(running, last_done.get(layer, 0.0))
        prefix.append(running)
    moved = sum(t.nbytes for t in ordered if t.src is not None)
    return MigrationPlan(
        transfers=tuple(ordered),
        estimated_s=(bw.overhead_s + body) if ordered else 0.0,
        prefix_ready_s=tuple(prefix),
        peak_bytes=dict(sorted(peak.items())),
        moved_bytes=moved,
        loaded_bytes=total_bytes - moved,
        within_memory=fits,
    )
