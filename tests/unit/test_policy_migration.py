"""Migration planner: a hand-checked order, memory limits, storage fallback, estimates."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ember.policy import (
    Gpu,
    LinkBandwidth,
    ModelShape,
    ParallelConfig,
    Placement,
    Position,
    TransferKind,
    map_devices,
    plan_migration,
)
from ember.policy.layout import stage_layers

# 4 layers of 100 bytes; embedding and head 100 bytes each; KV 10 bytes per layer.
SHAPE = ModelShape(layers=4, layer_bytes=100, embed_bytes=100, head_bytes=100)
CFG = ParallelConfig(1, 1, 2, 1)
OLD = Placement(CFG, {Position(0, 0, 0): "a", Position(0, 1, 0): "b"})
NEW = Placement(CFG, {Position(0, 0, 0): "c", Position(0, 1, 0): "a"})  # a moves back; b dies
HOSTS = {"a": "h0", "c": "h0", "b": "h1"}
KV = {"kv_stay": {0: 0}, "kv_layer_bytes": {0: 10}}


def _seq(plan: object) -> list[tuple[str, int, str | None, str]]:
    return [(t.kind.value, t.layer, t.src, t.dst) for t in plan.transfers]  # type: ignore[attr-defined]


def test_order_is_kv_then_dying_sender_then_front_layers() -> None:
    plan = plan_migration(OLD, NEW, SHAPE, HOSTS, dying=["b"], **KV)  # type: ignore[arg-type]
    assert _seq(plan) == [
        ("kv", 0, "a", "c"),
        ("kv", 1, "a", "c"),
        ("kv", 2, "b", "a"),
        ("kv", 3, "b", "a"),
        ("weights", 2, "b", "a"),  # b is dying: its layers leave first
        ("weights", 3, "b", "a"),
        ("weights", 4, "b", "a"),  # LM head
        ("weights", -1, "a", "c"),  # then the rest, embedding first
        ("weights", 0, "a", "c"),
        ("weights", 1, "a", "c"),
    ]
    assert [t.prior for t in plan.transfers] == [False, False, True, True, True, True, True] + [
        False
    ] * 3
    # a holds embed + 2 layers + 2 KV (320) and receives 2 KV + 3 weights before freeing anything
    assert plan.peak_bytes["a"] == 620
    assert plan.moved_bytes == 640 and plan.loaded_bytes == 0


def test_memory_limit_reorders_layers_so_no_gpu_overflows() -> None:
    plan = plan_migration(OLD, NEW, SHAPE, HOSTS, dying=["b"], memory_limit_bytes=320, **KV)  # type: ignore[arg-type]
    assert [(t.kind.value, t.layer) for t in plan.transfers] == [
        ("kv", 0), ("kv", 1), ("kv", 2), ("kv", 3),
        ("weights", -1),  # a must send the embedding (and free it) before it can take layer 2
        ("weights", 2),
        ("weights", 0),
        ("weights", 3),
        ("weights", 1),
        ("weights", 4),
    ]  # fmt: skip
    assert max(plan.peak_bytes.values()) <= 320


def test_memory_limit_below_what_a_gpu_already_holds_gives_a_plan_marked_over_limit() -> None:
    plan = plan_migration(OLD, NEW, SHAPE, HOSTS, dying=["b"], memory_limit_bytes=300, **KV)  # type: ignore[arg-type]
    assert not plan.within_memory
    assert plan.moved_bytes == 640  # the same transfers as without a limit
    fits = plan_migration(OLD, NEW, SHAPE, HOSTS, dying=["b"], memory_limit_bytes=320, **KV)  # type: ignore[arg-type]
    assert fits.within_memory


def test_no_order_fits_takes_the_least_bad_layer_next() -> None:
    """SpotServe's rule when every remaining layer group overflows some GPU: the group with the
    smallest overflow goes next, front-most on ties."""
    shape = ModelShape(layers=2, layer_bytes=100, embed_bytes=10, head_bytes=40)
    old = Placement(ParallelConfig(1, 1, 1, 1), {Position(0, 0, 0): "x"})
    new = Placement(ParallelConfig(1, 1, 1, 1), {Position(0, 0, 0): "y"})
    plan = plan_migration(old, new, shape, {"x": "h0", "y": "h1"}, memory_limit_bytes=30)
    # y receives embed 10 (fits), then head 40 (over by 20) before layers of 100 (over by 100+)
    assert [t.layer for t in plan.transfers] == [-1, 2, 0, 1]
    assert not plan.within_memory
    assert plan.peak_bytes["y"] == 250


def test_estimate_adds_inter_host_intra_host_and_overhead() -> None:
    bw = LinkBandwidth(intra_host_Bps=100.0, inter_host_Bps=10.0, storage_Bps=1.0, overhead_s=0.5)
    plan = plan_migration(OLD, NEW, SHAPE, HOSTS, dying=["b"], bandwidth=bw, **KV)  # type: ignore[arg-type]
    # inter-host: b -> a, 20 KV + 300 weights; intra-host: a -> c, 20 KV + 300 weights
    assert plan.estimated_s == pytest.approx(0.5 + 320 / 10 + 320 / 100)
    assert plan.prefix_ready_s[-1] == pytest.approx(plan.estimated_s)
    assert list(plan.prefix_ready_s) == sorted(plan.prefix_ready_s)


def test_units_no_live_gpu_holds_are_loaded_from_storage() -> None:
    plan = plan_migration(OLD, NEW, SHAPE, HOSTS, lost=["b"])
    loads = [(t.layer, t.dst) for t in plan.transfers if t.kind is TransferKind.LOAD]
    assert loads == [(2, "a"), (3, "a"), (4, "a")]
    assert plan.loaded_bytes == 300


def test_unchanged_placement_needs_no_transfers() -> None:
    plan = plan_migration(OLD, OLD, SHAPE, HOSTS, **KV)  # type: ignore[arg-type]
    assert plan.transfers == () and plan.estimated_s == 0.0


@st.composite
def reconfigurations(draw: st.DrawFn) -> tuple[Placement, Placement, dict[str, str], list[str]]:
    gpus = [Gpu(f"h{h}g{i}", f"h{h}") for h in range(3) for i in range(2)]
    shape = ModelShape(layers=6, layer_bytes=100, embed_bytes=50, head_bytes=50)
    tp_o, pp_o = draw(st.sampled_from([(1, 1), (1, 2), (2, 1), (2, 3), (1, 3), (2, 2)]))
    old = map_devices(ParallelConfig(6 // (tp_o * pp_o), tp_o, pp_o, 1), gpus, shape).placement
    dying = draw(st.sets(st.sampled_from([g.gpu_id for g in gpus]), max_size=3))
    avail = [g for g in gpus if g.gpu_id not in dying] + [Gpu("x0", "hx"), Gpu("x1", "hx")]
    tp_n, pp_n = draw(st.sampled_from([(1, 1), (1, 2), (2, 1), (1, 3), (2, 2)]))
    dp_n = draw(st.integers(1, len(avail) // (tp_n * pp_n)))
    new = map_devices(ParallelConfig(dp_n, tp_n, pp_n, 1), avail, shape, old=old).placement
    hosts = {g.gpu_id: g.host_id for g in [*gpus, *avail]}
    return old, new, hosts, sorted(dying)


@settings(max_examples=60, deadline=None)
@given(reconfigurations(), st.sampled_from([None, 400, 800, 2000]))
def test_plan_delivers_every_needed_unit_within_memory_limits(
    sc: tuple[Placement, Placement, dict[str, str], list[str]], limit: int | None
) -> None:
    old, new, hosts, dying = sc
    shape = ModelShape(layers=6, layer_bytes=100, embed_bytes=50, head_bytes=50)
    plan = plan_migration(old, new, shape, hosts, dying=dying, memory_limit_bytes=limit)
    if limit is None or plan.within_memory:
        assert all(v <= (limit or math.inf) for v in plan.peak_bytes.values())
    else:
        assert max(plan.peak_bytes.values()) > limit  # flagged only when a GPU does overflow
    assert all(t.dst in new.gpus() for t in plan.transfers)
    assert all(
        t.prior == (t.src in dying) for t in plan.transfers if t.kind is TransferKind.WEIGHTS
    )
    frags = max(old.config.tp, new.config.tp)
    got: dict[str, set[tuple[int, int]]] = {}
    for t in plan.transfers:
        got.setdefault(t.dst, set()).add((t.layer, t.fragment))
    old_by = old.by_gpu()
    for pos, g in new.assignment.items():
        lo, hi = stage_layers(pos.stage, new.config.pp, shape.layers)
        layers = (
            [*range(lo, hi)]
            + ([-1] if pos.stage == 0 else [])
            + ([shape.layers] if pos.stage == new.config.pp - 1 else [])
        )
        per = frags // new.config.tp
        for ly in layers:
            for f in range(pos.shard * per, (pos.shard + 1) * per):
                had = g in old_by and _holds(old_by[g], old.config, ly, f, frags, shape.layers)
                assert had or (ly, f) in got.get(g, set()), (pos, g, ly, f)
    again = plan_migration(old, new, shape, hosts, dying=dying, memory_limit_bytes=limit)
    assert again == plan  # deterministic


def _holds(pos: Position, cfg: ParallelConfig, layer: int, frag: int, frags: int, n: int) -> bool:
    lo, hi = stage_layers(pos.stage, cfg.pp, n)
    in_stage = (
        lo <= layer < hi
        or (layer == -1 and pos.stage == 0)
        or (layer == n and pos.stage == cfg.pp - 1)
    )
    per = frags // cfg.tp
    return in_stage and pos.shard * per <= frag < (pos.shard + 1) * per
