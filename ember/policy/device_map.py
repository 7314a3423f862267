"""Device mapper (SpotServe §2b): fill the new configuration's positions with usable GPUs,
keeping in place as many bytes of weights and KV cache as possible.

Weight of (GPU u, position v) = bytes u already holds that v needs:
  layer_overlap(u's old stage, v's stage) * shard_overlap(u's old slice, v's slice) * layer_bytes
  + the embedding / LM-head slice overlap when both are first / last stages
  + layer_overlap * shard_overlap * kv_layer_bytes[old replica of u], only when the new replica
    of v inherits u's old replica's requests (`kv_stay[new replica] == old replica`).
Two-level matching (`group_by_host=True`): GPUs are cut into host-local clusters of
k = min(M_new, gpus_per_host); an inner Kuhn–Munkres matches each cluster to each group of k
consecutive shards of a (replica, stage), and its value weighs the outer matching of clusters
to groups, so a tensor-parallel group never spans hosts when the hosts allow it. Clusters are
cut from GPUs sorted by id within a host; leftovers are pooled into cross-host clusters only
when there are not enough host-local ones. `MappingStrategy.PLAIN` (the no-KM ablation) fills
positions in order with GPUs sorted by (host, id). Equal weights (fresh GPUs, a first start)
go to clusters in (host, id) order, so replicas fill hosts contiguously; results are
deterministic for equal inputs.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.optimize import linear_sum_assignment

from ember.errors import PolicyError
from ember.policy.layout import (
    Gpu,
    ModelShape,
    Placement,
    Position,
    positions,
    shard_range,
    stage_layers,
)
from ember.policy.optimizer import ParallelConfig

_TIE_BIAS = 1e-7  # per unit of index distance; weights are bytes, so ties only


class MappingStrategy(str, enum.Enum):
    KM = "km"  # two-level Kuhn–Munkres (SpotServe, ember)
    PLAIN = "plain"  # positions in order (the no-device-mapper ablation, the baselines)


@dataclass(frozen=True, slots=True)
class DeviceMapping:
    """The new placement, the bytes it keeps in place, and TP groups that had to span hosts."""

    placement: Placement
    kept_bytes: int
    cross_host_groups: int


def weight_matrix(
    gpus: Sequence[Gpu],
    new_positions: Sequence[Position],
    new_config: ParallelConfig,
    old: Placement | None,
    shape: ModelShape,
    kv_stay: Mapping[int, int] | None = None,
    kv_layer_bytes: Mapping[int, int] | None = None,
) -> np.ndarray:
    """[len(gpus), len(new_positions)] bytes each GPU already holds that each position needs."""
    w = np.zeros((len(gpus), len(new_positions)), dtype=np.float64)
    if old is None or not new_positions:
        return w
    by_gpu = old.by_gpu()
    rows = [i for i, g in enumerate(gpus) if g.gpu_id in by_gpu]
    if not rows:
        return w
    oc, nc, L = old.config, new_config, shape.layers
    olds = [by_gpu[gpus[i].gpu_id] for i in rows]

    def spans(ps: Sequence[Position], cfg: ParallelConfig) -> tuple[np.ndarray, ...]:
        lo, hi = zip(*(stage_layers(p.stage, cfg.pp, L) for p in ps), strict=True)
        s_lo, s_hi = zip(*(shard_range(p.shard, cfg.tp) for p in ps), strict=True)
        first = [p.stage == 0 for p in ps]
        last = [p.stage == cfg.pp - 1 for p in ps]
        return tuple(np.asarray(x) for x in (lo, hi, s_lo, s_hi, first, last))

    olo, ohi, oslo, oshi, ofirst, olast = (a[:, None] for a in spans(olds, oc))
    nlo, nhi, nslo, nshi, nfirst, nlast = (a[None, :] for a in spans(new_positions, nc))
    layers = np.clip(np.minimum(ohi, nhi) - np.maximum(olo, nlo), 0, None)
    frac = np.clip(np.minimum(oshi, nshi) - np.maximum(oslo, nslo), 0.0, None)
    sub = layers * frac * shape.layer_bytes
    sub = (
        sub
        + frac * (ofirst & nfirst) * shape.embed_bytes
        + frac * (olast & nlast) * shape.head_bytes
    )
    if kv_stay and kv_layer_bytes:
        old_rep = np.asarray([p.replica for p in olds])[:, None]
        inherit = np.asarray([kv_stay.get(p.replica, -1) for p in new_positions])[None, :]
        kv = np.asarray([kv_layer_bytes.get(p.replica, 0) for p in olds], dtype=np.float64)
        sub = sub + (old_rep == inherit) * layers * frac * kv[:, None]
    w[rows, :] = sub
    return w


def _clusters(gpus: Sequence[Gpu], k: int) -> tuple[list[list[int]], int]:
    """Host-local clusters of k GPU indices, then cross-host ones from leftovers."""
    by_host: dict[str, list[int]] = {}
    for i in sorted(range(len(gpus)), key=lambda i: (gpus[i].host_id, gpus[i].gpu_id)):
        by_host.setdefault(gpus[i].host_id, []).append(i)
    local: list[list[int]] = []
    left: list[int] = []
    for idx in by_host.values():
        full = len(idx) // k * k
        local.extend(idx[j : j + k] for j in range(0, full, k))
        left.extend(idx[full:])
    cross = [left[j : j + k] for j in range(0, len(left) // k * k, k)]
    return local + cross, len(local)


def _inner_values(w: np.ndarray, clusters: list[list[int]], k: int, n_slots: int) -> np.ndarray:
    """[clusters, slots] best assignment value of each cluster onto each group of k shards."""
    blocks = w[np.asarray(clusters)]  # [C, k, slots * k]
    blocks = blocks.reshape(len(clusters), k, n_slots, k)  # [C, gpu i, slot, shard j]
    if k <= 4:
        best = np.zeros((len(clusters), n_slots))
        for perm in itertools.permutations(range(k)):
            best = np.maximum(best, sum(blocks[:, i, :, perm[i]] for i in range(k)))
        return best
    out = np.zeros((len(clusters), n_slots))
    live = np.argwhere(blocks.reshape(len(clusters), k * n_slots * k).any(axis=1)).ravel()
    for c in live:
        for s in range(n_slots):
            sub = blocks[c, :, s, :]
            if sub.any():
                r, col = linear_sum_assignment(sub, maximize=True)
                out[c, s] = sub[r, col].sum()
    return out


def map_devices(
    new_config: ParallelConfig,
    gpus: Sequence[Gpu],
    shape: ModelShape,
    *,
    old: Placement | None = None,
    kv_stay: Mapping[int, int] | None = None,
    kv_layer_bytes: Mapping[int, int] | None = None,
    strategy: MappingStrategy = MappingStrategy.KM,
    group_by_host: bool = True,
    gpus_per_host: int | None = None,
) -> DeviceMapping:
    """Place `new_config` on `gpus` (survivors and newly acquired; none under notice).

    `old` is the current placement (None at first start); `kv_stay` maps a new replica to the
    old replica whose running requests (and KV cache) it takes over; `kv_layer_bytes` gives,
    per old replica, the KV bytes of one layer over all shards. Raises PolicyError when there
    are fewer GPUs than positions or two GPUs share an id.
    """
    pos = list(positions(new_config))
    per_host = gpus_per_host or max(
        (sum(1 for g in gpus if g.host_id == h) for h in {g.host_id for g in gpus}), default=1
    )
    if len({g.gpu_id for g in gpus}) != len(gpus):
        raise PolicyError("gpus must have distinct gpu_id values")
    if len(gpus) < len(pos):
        raise PolicyError(f"{len(pos)} positions need {len(pos)} GPUs, only {len(gpus)} given")
    if strategy is MappingStrategy.PLAIN:
        order = sorted(gpus, key=lambda g: (g.host_id, g.gpu_id))
        plain = {p: g.gpu_id for p, g in zip(pos, order, strict=False)}
        wp = weight_matrix(gpus, pos, new_config, old, shape, kv_stay, kv_layer_bytes)
        index = {g.gpu_id: i for i, g in enumerate(gpus)}
        held = sum(float(wp[index[plain[p]], j]) for j, p in enumerate(pos))
        return DeviceMapping(
            Placement(new_config, plain),
            int(round(held)),
            _cross(plain, gpus, new_config.tp, per_host),
        )
    k = min(new_config.tp, per_host) if group_by_host else 1
    while new_config.tp % k:
        k -= 1
    w = weight_matrix(gpus, pos, new_config, old, shape, kv_stay, kv_layer_bytes)
    clusters, _ = _clusters(gpus, k)
    n_slots = len(pos) // k
    if len(clusters) < n_slots:
        # Host-local groups of k do not cover the configuration: give up locality.
        k, clusters = 1, [[i] for i in range(len(gpus))]
        n_slots = len(pos)
    if k == 1:
        values = w[np.asarray([c[0] for c in clusters])]
    else:
        values = _inner_values(w, clusters, k, n_slots)
    # Among equal weights (fresh GPUs, a first start), prefer cluster c for slot c, so replicas
    # fill hosts in order instead of scattering; the bias is far below one byte.
    c_idx = np.arange(values.shape[0])[:, None]
    s_idx = np.arange(values.shape[1])[None, :]
    rows, cols = linear_sum_assignment(values - _TIE_BIAS * np.abs(c_idx - s_idx), maximize=True)
    assign: dict[Position, str] = {}
    kept = 0.0
    for c, s in zip(rows, cols, strict=True):
        members = clusters[c]
        sub = w[np.ix_(members, range(s * k, (s + 1) * k))]
        r, j = linear_sum_assignment(sub, maximize=True)
        for ri, ji in zip(r, j, strict=True):
            assign[pos[s * k + ji]] = gpus[members[ri]].gpu_id
        kept += float(sub[r, j].sum())
    return DeviceMapping(
        Placement(new_config, assign),
        int(round(kept)),
        _cross(assign, gpus, new_config.tp, per_host),
    )


def _cross(assign: Mapping[Position, str], gpus: Sequence[Gpu], tp: int, per_host: int) -> int:
    """Tensor-parallel groups (replica, stage) spread over more hosts than their size needs."""
    host = {g.gpu_id: g.host_id for g in gpus}
    groups: dict[tuple[int, int], set[str]] = {}
    for p, g in assign.items():
        groups.setdefault((p.replica, p.stage), set()).add(host[g])
    need = -(-tp // max(1, per_host))
    return sum(1 for hs in groups.values() if len(hs) > need)
