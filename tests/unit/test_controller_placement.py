"""Placement: the node with the checkpoint in DRAM first, then on disk, else the freest node;
None when full."""

from __future__ import annotations

from ember.controller.placement import DISK, DRAM, choose_node
from ember.controller.types import NodeInfo


def node(node_id: str, free: float, alive: bool = True) -> NodeInfo:
    return NodeInfo(node_id, "127.0.0.1", alive, (), 4.0, free)


def test_node_with_checkpoint_wins_over_freer_node() -> None:
    nodes = [node("a", 4.0), node("b", 1.0)]
    assert choose_node(nodes, {"b": DISK}, need_cpus=1.0) == "b"


def test_dram_copy_wins_over_disk_copy_and_freer_node() -> None:
    nodes = [node("a", 4.0), node("b", 3.0), node("c", 1.0)]
    assert choose_node(nodes, {"b": DISK, "c": DRAM}, need_cpus=1.0) == "c"


def test_checkpoint_node_without_room_is_skipped() -> None:
    nodes = [node("a", 2.0), node("b", 0.5)]
    assert choose_node(nodes, {"b": DRAM}, need_cpus=1.0) == "a"


def test_without_checkpoint_the_freest_node_wins() -> None:
    assert choose_node([node("a", 1.0), node("b", 3.0)], {}, need_cpus=1.0) == "b"


def test_replicas_spread_over_nodes_that_hold_the_checkpoint_alike() -> None:
    nodes = [node("a", 3.0), node("b", 3.0)]
    assert choose_node(nodes, {"a": DISK, "b": DISK}, need_cpus=1.0, taken=["a"]) == "b"
    assert choose_node(nodes, {"a": DRAM, "b": DISK}, need_cpus=1.0, taken=["a"]) == "a"


def test_dead_nodes_and_full_cluster_give_none() -> None:
    assert choose_node([node("a", 4.0, alive=False), node("b", 0.0)], {}, need_cpus=1.0) is None


def test_ties_break_on_node_id() -> None:
    assert choose_node([node("b", 2.0), node("a", 2.0)], {}, need_cpus=1.0) == "a"
