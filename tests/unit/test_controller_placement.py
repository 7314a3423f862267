"""Placement: the soonest start by the policy core's estimate (the node's loading queue, then
the checkpoint's bytes over its fastest tier there: DRAM, disk, remote), else replicas spread
and the freest node; None when full."""

from __future__ import annotations

from typing import Any

import pytest

from ember.controller.placement import (
    BANDWIDTH_BPS,
    DISK,
    DRAM,
    NodeLosses,
    Placement,
    choose_node,
    node_price,
)
from ember.controller.types import NodeInfo
from ember.policy.startup import Tier

GB = 10**9


def node(
    node_id: str, free: float, alive: bool = True, spot: bool = False, zone: str = ""
) -> NodeInfo:
    labels = tuple(sorted({"spot": str(spot).lower(), **({"zone": zone} if zone else {})}.items()))
    return NodeInfo(node_id, "127.0.0.1", alive, labels, 4.0, free)


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


def test_a_gpu_instance_needs_a_free_gpu_too() -> None:
    gpu_busy = NodeInfo("a", "127.0.0.1", True, (), 4.0, 4.0, gpus_total=1.0, gpus_available=0.0)
    gpu_free = NodeInfo("b", "127.0.0.1", True, (), 4.0, 1.0, gpus_total=1.0, gpus_available=1.0)
    assert chosen([gpu_busy, gpu_free], {"a": DRAM}, need_cpus=1.0, need_gpus=1.0) == "b"
    assert choose_node([gpu_busy], {}, need_cpus=1.0, need_gpus=1.0) is None
    assert chosen([gpu_busy], {}, need_cpus=1.0) == "a"  # a CPU instance does not care


def test_dead_nodes_and_full_cluster_give_none() -> None:
    assert choose_node([node("a", 4.0, alive=False), node("b", 0.0)], {}, need_cpus=1.0) is None


def test_ties_break_on_node_id() -> None:
    assert chosen([node("b", 2.0), node("a", 2.0)], {}, need_cpus=1.0) == "a"


def test_measured_rates_replace_the_assumed_bandwidths_per_node() -> None:
    """A node whose store measured a slow S3 link (0.1 GB/s) loses to one that measured a
    faster one (1 GB/s); a slow disk (0.2 GB/s) makes S3 at 1 GB/s the sooner start for 2 GB."""
    nodes = [node("a", 4.0), node("b", 1.0)]
    slow_link = {"a": {"remote": 0.1 * GB}, "b": {"remote": 1 * GB}}
    p = choose_node(nodes, {}, need_cpus=1.0, model_bytes=2 * GB, rates=slow_link)
    assert p == Placement("b", pytest.approx(2.0), "remote")
    p = choose_node(nodes, {}, need_cpus=1.0, model_bytes=2 * GB, rates={"a": {"remote": 4 * GB}})
    assert p == Placement("a", pytest.approx(0.5), "remote")  # measured faster than assumed
    slow_disk = {"b": {"ssd": 0.2 * GB}}
    p = choose_node(nodes, {"b": DISK}, need_cpus=1.0, model_bytes=2 * GB, rates=slow_disk)
    assert p == Placement("a", pytest.approx(2.0), "remote")
    p = choose_node(nodes, {"b": DISK}, need_cpus=1.0, model_bytes=2 * GB)  # 2 GB/s assumed
    assert p == Placement("b", pytest.approx(1.0), "ssd")


def test_a_node_that_never_fetched_from_s3_expects_the_fleets_median_link() -> None:
    """All nodes fetch from one remote store: a node with no measurement of its own takes the
    median of those measured, not the assumed 1 GB/s; its own measurement, once made, wins."""
    nodes = [node("a", 0.0), node("b", 0.0), node("c", 4.0)]  # busy: c has the room
    rates = {"a": {"remote": 0.1 * GB}, "b": {"remote": 0.3 * GB, "ssd": 1 * GB}}
    p = choose_node(nodes, {}, need_cpus=1.0, model_bytes=2 * GB, rates=rates)
    assert p == Placement("c", pytest.approx(10.0), "remote")  # 2 GB at the median 0.2 GB/s
    # Only the remote link is shared: c's disk keeps the assumed 2 GB/s, not b's 1 GB/s.
    p = choose_node(nodes, {"c": DISK}, need_cpus=1.0, model_bytes=2 * GB, rates=rates)
    assert p == Placement("c", pytest.approx(1.0), "ssd")
    rates["c"] = {"remote": 2 * GB}
    p = choose_node(nodes, {}, need_cpus=1.0, model_bytes=2 * GB, rates=rates)
    assert p == Placement("c", pytest.approx(1.0), "remote")
    # Nobody measured: the assumption.
    assert choose_node(nodes, {}, need_cpus=1.0, model_bytes=2 * GB) == Placement(
        "c", pytest.approx(2.0), "remote"
    )


def test_a_node_without_a_copy_fetches_a_remote_checkpoint_from_a_peer_that_has_one() -> None:
    """With peers (an s3:// checkpoint), a node lacking the copy another node holds expects it
    at its peer rate: measured (or the fleet's median peer rate), else the assumed 2 GB/s,
    against S3's 1 GB/s. The holder's own copy still wins when it has room; a node with no
    peer holding it goes to S3; without `peers` (a local model) nothing changes."""
    nodes = [node("a", 0.0), node("b", 4.0)]  # a holds it on disk but is full
    p = choose_node(nodes, {"a": DISK}, need_cpus=1.0, model_bytes=2 * GB, peers=True)
    assert p == Placement("b", pytest.approx(2 * GB / BANDWIDTH_BPS[Tier.PEER]), "peer")
    p = choose_node(nodes, {"a": DISK}, need_cpus=1.0, model_bytes=2 * GB)
    assert p == Placement("b", pytest.approx(2.0), "remote")
    rates = {"a": {"peer": 4 * GB}}  # a measured its peers: b takes the fleet's median
    p = choose_node(nodes, {"a": DRAM}, need_cpus=1.0, model_bytes=2 * GB, rates=rates, peers=True)
    assert p == Placement("b", pytest.approx(0.5), "peer")
    p = choose_node(nodes, {}, need_cpus=1.0, model_bytes=2 * GB, peers=True)
    assert p == Placement("b", pytest.approx(2.0), "remote")  # nobody holds it
    # A holder with room starts from its own copy; a peer fetch loses to a slow disk.
    nodes = [node("a", 1.0), node("b", 4.0)]
    p = choose_node(nodes, {"a": DISK}, need_cpus=1.0, model_bytes=2 * GB, peers=True)
    assert p == Placement("a", pytest.approx(1.0), "ssd")
    slow = {"a": {"ssd": 0.2 * GB}}
    p = choose_node(nodes, {"a": DISK}, need_cpus=1.0, model_bytes=2 * GB, rates=slow, peers=True)
    assert p == Placement("b", pytest.approx(1.0), "peer")


def test_bytes_still_arriving_at_a_node_delay_its_start_at_its_remote_bandwidth() -> None:
    """A fetch in flight into a's SSD with 1.8 of 2 GB to come at a's measured 0.5 GB/s: a
    start there waits 3.6 s, then reads its disk (1 s), so b's complete SSD copy wins; with
    nothing pending the tie goes to the freer a. Against a fetch from S3 (b: 4 s at the fleet's
    0.5 GB/s), a with 1 GB to come (2 s + 1 s) still wins."""
    nodes = [node("a", 4.0), node("b", 1.0)]
    both = {"a": DISK, "b": DISK}
    rates = {"a": {"remote": 0.5 * GB}}
    kw: dict[str, Any] = {"need_cpus": 1.0, "model_bytes": 2 * GB, "rates": rates}
    p = choose_node(nodes, both, pending={"a": 1.8 * GB}, **kw)
    assert p == Placement("b", pytest.approx(1.0), "ssd")
    assert choose_node(nodes, both, **kw) == Placement("a", pytest.approx(1.0), "ssd")
    p = choose_node(nodes, {"a": DISK}, pending={"a": 1.0 * GB}, **kw)
    assert p == Placement("a", pytest.approx(3.0), "ssd")
    # Pending bytes where the node holds nothing (no fetch there) change nothing.
    p = choose_node(nodes, {}, pending={"a": 1.8 * GB}, **kw)
    assert p == Placement("a", pytest.approx(4.0), "remote")


def test_a_price_label_costs_a_second_per_dollar_an_hour() -> None:
    """b ($0.90/h) is picked over a ($3/h) when both fetch from S3; a's DRAM copy (0.1 s
    instead of 2 s) still wins against a $1 difference, not against a $2.10 one. Unlabelled
    or unreadable prices cost nothing."""

    def priced(node_id: str, price: str) -> NodeInfo:
        return NodeInfo(node_id, "127.0.0.1", True, (("price", price),), 4.0, 4.0)

    two = [priced("a", "3.0"), priced("b", "0.9")]
    assert chosen(two, {}, need_cpus=1.0, model_bytes=2 * GB) == "b"
    assert chosen(two, {"a": DRAM}, need_cpus=1.0, model_bytes=2 * GB) == "b"  # 3.1 vs 2.9 s
    cheaper = [priced("a", "1.9"), priced("b", "0.9")]
    assert chosen(cheaper, {"a": DRAM}, need_cpus=1.0, model_bytes=2 * GB) == "a"  # 2.0 vs 2.9
    bad = [priced("a", "lots"), priced("b", "-1"), node("c", 1.0)]
    assert chosen(bad, {}, need_cpus=1.0) == "a"  # all cost 0: the freest, then the node id
    assert node_price(bad[0]) == node_price(bad[1]) == node_price(bad[2]) == 0.0


def test_a_risky_spot_node_loses_its_dram_advantage() -> None:
    """ember's score: 60 s per unit of preemption risk. A spot node in a zone that just lost
    half its nodes (risk 0.5) is passed over for a safe node that must fetch from S3."""
    nodes = [node("a", 3.0, spot=True), node("b", 3.0)]
    p = choose_node(nodes, {"a": DRAM}, need_cpus=1.0, model_bytes=2 * GB, risk={"a": 0.5})
    assert p == Placement("b", pytest.approx(2.0), "remote", 0.0)
    p = choose_node(nodes, {"a": DRAM}, need_cpus=1.0, model_bytes=2 * GB, risk={"a": 0.01})
    assert p is not None and (p.node_id, p.risk) == ("a", 0.01)  # 0.6 s: DRAM still wins


def test_node_losses_make_a_spot_zone_risky_for_an_hour() -> None:
    losses = NodeLosses()
    zone_a = [node("a1", 4, spot=True, zone="a"), node("a2", 4, spot=True, zone="a")]
    others = [node("b1", 4, spot=True, zone="b"), node("od", 4, zone="a")]  # od: on-demand
    assert losses.observe([*zone_a, *others], now=0.0) == []
    assert losses.risk([*zone_a, *others], now=0.0) == {}
    now = [zone_a[0], *others]  # a2 was preempted
    assert losses.observe(now, now=10.0) == ["a2"]
    # zone a: 1 loss over its 2 alive nodes (a1 and the on-demand one); only spot nodes pay
    assert losses.risk(now, now=10.0) == {"a1": 0.5}
    dead = [zone_a[0], node("b1", 4, alive=False, spot=True, zone="b"), others[1]]
    assert losses.observe(dead, now=20.0) == ["b1"]
    assert losses.risk(dead, now=20.0) == {"a1": 0.5}  # b1 is gone: no alive node to rate
    assert losses.risk(dead, now=3620.0) == {}  # an hour later the losses no longer count
