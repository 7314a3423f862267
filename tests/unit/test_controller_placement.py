"""Placement: the soonest start by the policy core's estimate (the node's loading queue, then
the checkpoint's bytes over its fastest tier there: DRAM, disk, remote), else replicas spread
and the freest node; None when full."""

from __future__ import annotations

import pytest

from ember.controller.placement import BANDWIDTH_BPS, DISK, DRAM, Placement, choose_node
from ember.controller.types import NodeInfo
from ember.policy.startup import Tier

GB = 10**9


def node(node_id: str, free: float, alive: bool = True) -> NodeInfo:
    return NodeInfo(node_id, "127.0.0.1", alive, (), 4.0, free)


def chosen(*args: object, **kw: object) -> str | None:
    p = choose_node(*args, **kw)  # type: ignore[arg-type]
    return None if p is None else p.node_id


def test_node_with_checkpoint_wins_over_freer_node() -> None:
    nodes = [node("a", 4.0), node("b", 1.0)]
    assert chosen(nodes, {"b": DISK}, need_cpus=1.0) == "b"


def test_dram_copy_wins_over_disk_copy_and_freer_node_and_says_so() -> None:
    nodes = [node("a", 4.0), node("b", 3.0), node("c", 1.0)]
    p = choose_node(nodes, {"b": DISK, "c": DRAM}, need_cpus=1.0, model_bytes=2 * GB)
    assert p == Placement("c", pytest.approx(2 * GB / BANDWIDTH_BPS[Tier.DRAM]), "dram")


def test_a_busy_loader_sends_the_start_to_a_slower_tier_that_is_free() -> None:
    """ServerlessLLM's loading queue: b's DRAM copy waits 1 s behind loads already running
    there; a's SSD copy of a 2 GB checkpoint is read in 1 s at 2 GB/s."""
    nodes = [node("a", 3.0), node("b", 3.0)]
    where = {"a": DISK, "b": DRAM}
    assert chosen(nodes, where, need_cpus=1.0, model_bytes=2 * GB, queue_s={"b": 0.5}) == "b"
    assert chosen(nodes, where, need_cpus=1.0, model_bytes=2 * GB, queue_s={"b": 1.5}) == "a"
    p = choose_node(nodes, {}, need_cpus=1.0, model_bytes=2 * GB, queue_s={"a": 1.0})
    assert p == Placement("b", pytest.approx(2.0), "remote")


def test_checkpoint_node_without_room_is_skipped() -> None:
    nodes = [node("a", 2.0), node("b", 0.5)]
    assert chosen(nodes, {"b": DRAM}, need_cpus=1.0) == "a"


def test_without_checkpoint_the_freest_node_wins() -> None:
    assert chosen([node("a", 1.0), node("b", 3.0)], {}, need_cpus=1.0) == "b"


def test_a_tiny_model_still_prefers_its_copy() -> None:
    """1 MB: the tiers' times tie to the millisecond; the faster tier still decides."""
    nodes = [node("a", 4.0), node("b", 1.0)]
    assert chosen(nodes, {"b": DISK}, need_cpus=1.0, model_bytes=1 << 20) == "b"


def test_replicas_spread_over_nodes_that_hold_the_checkpoint_alike() -> None:
    nodes = [node("a", 3.0), node("b", 3.0)]
    assert chosen(nodes, {"a": DISK, "b": DISK}, need_cpus=1.0, taken=["a"]) == "b"
    assert chosen(nodes, {"a": DRAM, "b": DISK}, need_cpus=1.0, taken=["a"]) == "a"


def test_dead_nodes_and_full_cluster_give_none() -> None:
    assert choose_node([node("a", 4.0, alive=False), node("b", 0.0)], {}, need_cpus=1.0) is None


def test_ties_break_on_node_id() -> None:
    assert chosen([node("b", 2.0), node("a", 2.0)], {}, need_cpus=1.0) == "a"
