"""Checkpoint locality in the controller: an `s3://` deployment is prefetched into one node's
store when it is created, and an instance goes to the node whose store holds the checkpoint in
the fastest tier (DRAM, then SSD), as the stores list it.

The cluster is serving_support's in-process one with two nodes and no room to run an
instance (they stay starting): these tests see where the controller launches, not engines.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from serving_support import LocalCluster

from ember.controller.controller import Controller
from ember.controller.types import DeploymentSpec, NodeInfo
from ember.policy.clock import FakeClock
from ember.store.node_store import CachedCheckpoint

URL = "s3://models/m"


class TwoNodes(LocalCluster):
    """Node "a" is freer than "b"; stores list `self.rows`; prefetches are recorded."""

    def __init__(self, cache_root: Path) -> None:
        super().__init__(cache_root, cpus=0.0)  # instances never finish starting
        self.rows: dict[str, list[dict[str, Any]]] = {}
        self.prefetched: list[tuple[str, str, str]] = []
        self.launched_on: list[str | None] = []

    def nodes(self) -> list[NodeInfo]:
        return [
            NodeInfo("a", "127.0.0.1", True, (), 4.0, 4.0),
            NodeInfo("b", "127.0.0.1", True, (), 4.0, 2.0),
        ]

    def launch(self, spec: DeploymentSpec, instance_id: str, node_id: str | None) -> Any:
        self.launched_on.append(node_id)
        return super().launch(spec, instance_id, node_id)

    async def checkpoints(self) -> dict[str, list[dict[str, Any]]]:
        return self.rows

    def prefetch(self, source: str, node_id: str, tier: str) -> None:
        self.prefetched.append((source, node_id, tier))


def row(source: str, tier: str) -> dict[str, Any]:
    """One row of a node store's listing, as `RayCluster.checkpoints` gives it."""
    return asdict(CachedCheckpoint(source, tier, nbytes=1, pins=0, last_used=0.0))


def run(tmp_path: Path, body: Callable[[Controller, TwoNodes], Awaitable[None]]) -> None:
    async def main() -> None:
        cluster = TwoNodes(tmp_path / "cache")
        controller = Controller(
            cluster, tmp_path / "e.db", FakeClock(100.0), reconcile_interval_s=0.01,
            probe_interval_s=0.01,
        )  # fmt: skip
        await controller.start()
        try:
            await body(controller, cluster)
        finally:
            await controller.stop()

    asyncio.run(main())


async def until(pred: Callable[[], bool], timeout_s: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not pred():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def cached_on(c: Controller, name: str) -> tuple[str, ...]:
    return next(s.cached_on for s in c.status() if s.spec.name == name)


def test_an_s3_deployment_is_prefetched_once_to_the_node_it_would_start_on(
    tmp_path: Path,
) -> None:
    async def body(c: Controller, cluster: TwoNodes) -> None:
        c.deploy(DeploymentSpec("m", URL))
        assert cluster.prefetched == [(URL, "a", "ssd")]  # the freer node
        assert cached_on(c, "m") == ("a",)
        c.deploy(DeploymentSpec("m", URL, max_num_seqs=4))  # same source: nothing to fetch
        c.deploy(DeploymentSpec("n", "s3://models/n", prefetch="none"))
        c.deploy(DeploymentSpec("local", str(tmp_path)))  # local folders are converted at start
        assert cluster.prefetched == [(URL, "a", "ssd")]
        c.deploy(DeploymentSpec("m", URL, prefetch="dram"))  # a faster tier is asked for
        assert cluster.prefetched[1:] == [(URL, "a", "dram")]
        # A second deployment of a source already held: the stores have it, no new fetch.
        c.deploy(DeploymentSpec("m2", URL))
        assert len(cluster.prefetched) == 2
        c.wake("m")
        await until(lambda: cluster.launched_on == ["a"])

    run(tmp_path, body)


def test_the_instance_goes_where_the_stores_hold_the_checkpoint_fastest(tmp_path: Path) -> None:
    src = str(tmp_path)

    async def body(c: Controller, cluster: TwoNodes) -> None:
        c.deploy(DeploymentSpec("m", src, max_instances=2, target_concurrency=1))
        cluster.rows = {"a": [row(src, "ssd")], "b": [row(src, "ssd"), row(src, "dram")]}
        await until(lambda: cached_on(c, "m") == ("a", "b"))
        c.wake("m")
        await until(lambda: cluster.launched_on == ["b"])  # DRAM beats the freer node's SSD
        cluster.rows = {"a": [row(src, "ssd")]}  # evicted from b entirely
        await asyncio.sleep(0.05)  # a refresh or two
        assert cached_on(c, "m") == ("a",)

    run(tmp_path, body)
