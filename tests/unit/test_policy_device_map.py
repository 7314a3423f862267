"""Device mapper: a hand-worked 3x3 matching, host-local TP groups, and invariants."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ember.errors import PolicyError
from ember.policy import (
    Gpu,
    MappingStrategy,
    ModelShape,
    ParallelConfig,
    Placement,
    Position,
    map_devices,
    positions,
    weight_matrix,
)

SHAPE6 = ModelShape(layers=6, layer_bytes=1)


def _three_by_three() -> tuple[Placement, list[Gpu]]:
    # Old: 2 replicas x 2 stages (layers 0-2 | 3-5). GPU d (replica 1, stage 1) is lost.
    old = Placement(
        ParallelConfig(2, 1, 2, 1),
        {
            Position(0, 0, 0): "a",
            Position(0, 1, 0): "b",
            Position(1, 0, 0): "c",
            Position(1, 1, 0): "d",
        },
    )
    return old, [Gpu("a", "h0"), Gpu("b", "h1"), Gpu("c", "h2")]


def test_three_by_three_weights_are_the_hand_computed_bytes() -> None:
    old, gpus = _three_by_three()
    new = ParallelConfig(1, 1, 3, 1)  # stages hold layers 0-1 | 2-3 | 4-5
    w = weight_matrix(gpus, list(positions(new)), new, old, SHAPE6, {0: 1}, {1: 10})
    # a: old layers 0-2; b: 3-5; c: 0-2 with replica 1's KV (10 bytes per layer), inherited.
    assert w.tolist() == [[2, 1, 0], [0, 1, 2], [22, 11, 0]]


def test_three_by_three_matching_keeps_the_inherited_kv_in_place() -> None:
    old, gpus = _three_by_three()
    m = map_devices(
        ParallelConfig(1, 1, 3, 1), gpus, SHAPE6, old=old, kv_stay={0: 1}, kv_layer_bytes={1: 10}
    )
    # Greedy would give stage 0 to a (2) or c (22) first; the optimum is c->0, a->1, b->2 = 25.
    assert dict(m.placement.assignment) == {
        Position(0, 0, 0): "c",
        Position(0, 1, 0): "a",
        Position(0, 2, 0): "b",
    }
    assert m.kept_bytes == 25


def test_plain_strategy_fills_positions_in_host_order() -> None:
    old, gpus = _three_by_three()
    m = map_devices(
        ParallelConfig(1, 1, 3, 1), gpus, SHAPE6, old=old, strategy=MappingStrategy.PLAIN
    )
    assert list(m.placement.assignment.values()) == ["a", "b", "c"]
    assert m.kept_bytes == 2 + 1 + 0


def test_tensor_parallel_groups_stay_within_a_host() -> None:
    gpus = [Gpu(f"h{h}g{i}", f"h{h}") for h in range(4) for i in range(4)]
    shape = ModelShape.gpt(8, 256)
    for tp in (2, 4):
        m = map_devices(ParallelConfig(16 // (tp * 2), tp, 2, 1), gpus, shape)
        assert m.cross_host_groups == 0
        host = {g.gpu_id: g.host_id for g in gpus}
        groups: dict[tuple[int, int], set[str]] = {}
        for pos, g in m.placement.assignment.items():
            groups.setdefault((pos.replica, pos.stage), set()).add(host[g])
        assert all(len(h) == 1 for h in groups.values())


def test_shrinking_keeps_survivors_on_their_own_layers() -> None:
    gpus = [Gpu(f"h{h}g{i}", f"h{h}") for h in range(4) for i in range(2)]
    shape = ModelShape.gpt(8, 256)
    old = map_devices(ParallelConfig(2, 2, 2, 1), gpus, shape).placement
    survivors = [g for g in gpus if g.host_id != "h0"]  # one host lost
    m = map_devices(ParallelConfig(1, 2, 2, 1), survivors, shape, old=old)
    # A full replica is among the survivors, so every position keeps its own bytes.
    per_position = (4 * shape.layer_bytes + shape.embed_bytes) // 2
    assert m.kept_bytes == pytest.approx(4 * per_position, rel=1e-6)


def test_too_few_gpus_is_an_error() -> None:
    with pytest.raises(PolicyError, match="positions need"):
        map_devices(ParallelConfig(2, 2, 1, 1), [Gpu("a", "h")], SHAPE6)


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[ParallelConfig, list[Gpu], Placement, ParallelConfig]:
    per_host = draw(st.sampled_from([1, 2, 4]))
    hosts = draw(st.integers(2, 6))
    gpus = [Gpu(f"h{h}g{i}", f"h{h}") for h in range(hosts) for i in range(per_host)]
    n = len(gpus)
    tp_o = draw(st.sampled_from([t for t in (1, 2, 4) if t <= n]))
    pp_o = draw(st.sampled_from([p for p in (1, 2, 3) if p * tp_o <= n]))
    old_cfg = ParallelConfig(n // (tp_o * pp_o), tp_o, pp_o, 1)
    old = map_devices(old_cfg, gpus, ModelShape.gpt(6, 64)).placement
    lost = draw(st.sets(st.sampled_from([g.gpu_id for g in gpus]), max_size=n - 1))
    fresh = draw(st.integers(0, 3))
    avail = [g for g in gpus if g.gpu_id not in lost] + [
        Gpu(f"new{i}", f"n{i // 2}") for i in range(fresh)
    ]
    m = len(avail)
    tp_n = draw(st.sampled_from([t for t in (1, 2, 4) if t <= m]))
    pp_n = draw(st.sampled_from([p for p in (1, 2, 3) if p * tp_n <= m]))
    new_cfg = ParallelConfig(draw(st.integers(1, m // (tp_n * pp_n))), tp_n, pp_n, 1)
    return old_cfg, avail, old, new_cfg


@settings(max_examples=60, deadline=None)
@given(scenarios(), st.booleans())
def test_every_position_is_filled_once_by_a_distinct_usable_gpu(
    sc: tuple[ParallelConfig, list[Gpu], Placement, ParallelConfig], kv: bool
) -> None:
    _, avail, old, new_cfg = sc
    shape = ModelShape.gpt(6, 64)
    kv_args = {"kv_stay": {0: 0}, "kv_layer_bytes": {0: 1000}} if kv else {}
    m = map_devices(new_cfg, avail, shape, old=old, **kv_args)  # type: ignore[arg-type]
    assert set(m.placement.assignment) == set(positions(new_cfg))
    used = list(m.placement.assignment.values())
    assert len(used) == len(set(used))
    assert set(used) <= {g.gpu_id for g in avail}
    again = map_devices(new_cfg, avail, shape, old=old, **kv_args)  # type: ignore[arg-type]
    assert again == m  # deterministic
    plain = map_devices(
        new_cfg,
        avail,
        shape,
        old=old,
        strategy=MappingStrategy.PLAIN,
        group_by_host=False,
        **kv_args,
    )  # type: ignore[arg-type]
    flat = map_devices(new_cfg, avail, shape, old=old, group_by_host=False, **kv_args)  # type: ignore[arg-type]
    assert flat.kept_bytes >= plain.kept_bytes  # one-level KM is optimal over all assignments
    assert flat.kept_bytes >= m.kept_bytes
    w = weight_matrix(avail, list(positions(new_cfg)), new_cfg, old, shape, **kv_args)  # type: ignore[arg-type]
    assert np.all(w >= 0)
