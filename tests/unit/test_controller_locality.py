"""Checkpoint locality in the controller: an `s3://` deployment is prefetched into one node's
store when it is created, and an instance goes to the node whose store holds the checkpoint in
the fastest tier (DRAM, then SSD), as the stores list it.

The cluster is serving_support's in-process one with two nodes and no room to run an
instance (they stay starting): these tests see where the controller launches, not engines.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import pytest
from serving_support import LocalCluster

from ember.controller.controller import Controller
from ember.controller.placement import DISK
from ember.controller.types import DeploymentSpec, NodeInfo
from ember.errors import ConfigError, StoreCapacityError
from ember.policy.clock import FakeClock
from ember.store.node_store import CachedCheckpoint

URL = "s3://models/m"


class TwoNodes(LocalCluster):
    """Node "a" is freer than "b"; stores list `self.rows`; prefetches are recorded."""

    def __init__(self, cache_root: Path) -> None:
        super().__init__(cache_root, cpus=0.0)  # instances never finish starting
        self.rows: dict[str, list[dict[str, Any]]] = {}
        self.prefetched: list[tuple[str, str, str]] = []
        self.prepared: list[tuple[str, str, str]] = []  # local models converted ahead
        self.link_rates: dict[str, dict[str, float]] = {}  # what the stores measured
        self.launched_on: list[tuple[str, str | None]] = []  # (deployment, node)
        self.node_list = [
            NodeInfo("a", "127.0.0.1", True, (), 4.0, 4.0),
            NodeInfo("b", "127.0.0.1", True, (), 4.0, 2.0),
        ]

    def nodes(self) -> list[NodeInfo]:
        return list(self.node_list)

    def launch(self, spec: DeploymentSpec, instance_id: str, node_id: str | None) -> Any:
        self.launched_on.append((spec.name, node_id))
        return super().launch(spec, instance_id, node_id)

    async def checkpoints(self) -> dict[str, list[dict[str, Any]]]:
        return self.rows

    async def rates(self) -> dict[str, dict[str, float]]:
        return self.link_rates

    def prefetch(self, source: str, node_id: str, tier: str) -> None:
        self.prefetched.append((source, node_id, tier))

    def prepare(self, spec: DeploymentSpec, node_id: str, tier: str) -> None:
        self.prepared.append((spec.source, node_id, tier))

    async def evict(self, source: str, node_id: str, tier: str) -> bool:
        rows = self.rows.get(node_id, [])
        hit = [r for r in rows if r["key"] == source and r["tier"] == tier]
        if any(r["pins"] for r in hit):
            raise StoreCapacityError(f"/dram/{node_id}", f"cannot evict from {tier}: in use")
        self.rows[node_id] = [r for r in rows if r not in hit]
        return bool(hit)


def row(
    source: str, tier: str, pins: int = 0, nbytes: int = 1, fetched: float | None = None
) -> dict[str, Any]:
    """One row of a node store's listing, as `RayCluster.checkpoints` gives it (`fetched`: the
    share a fetch in flight has written)."""
    return asdict(
        CachedCheckpoint(source, tier, nbytes=nbytes, pins=pins, last_used=0.0, fetched=fetched)
    )


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
        c.deploy(DeploymentSpec("n1", "s3://models/n1", min_instances=1))  # its start fetches
        assert cluster.prefetched == [(URL, "a", "ssd")]
        # A local folder is converted on that node ahead of its first start (and, for "dram",
        # loaded into its DRAM tier); the conversion stays on the node's disk.
        (tmp_path / "x").mkdir()
        (tmp_path / "y").mkdir()
        c.deploy(DeploymentSpec("local", str(tmp_path)))
        c.deploy(DeploymentSpec("local-none", str(tmp_path / "x"), prefetch="none"))
        c.deploy(DeploymentSpec("local-dram", str(tmp_path / "y"), prefetch="dram"))
        assert cluster.prepared == [(str(tmp_path), "a", "ssd"), (str(tmp_path / "y"), "a", "dram")]
        assert cached_on(c, "local") == ("a",)
        c.deploy(DeploymentSpec("local", str(tmp_path), max_num_seqs=4))  # converted already
        assert len(cluster.prepared) == 2
        c.deploy(DeploymentSpec("m", URL, prefetch="dram"))  # a faster tier is asked for
        assert cluster.prefetched[1:] == [(URL, "a", "dram")]
        # A second deployment of a source already held: the stores have it, no new fetch.
        c.deploy(DeploymentSpec("m2", URL))
        assert len(cluster.prefetched) == 2
        c.wake("m")
        await until(lambda: ("m", "a") in cluster.launched_on)

    run(tmp_path, body)


def test_the_instance_goes_where_the_stores_hold_the_checkpoint_fastest(tmp_path: Path) -> None:
    src = str(tmp_path)

    async def body(c: Controller, cluster: TwoNodes) -> None:
        c.deploy(DeploymentSpec("m", src, max_instances=2, target_concurrency=1))
        cluster.rows = {"a": [row(src, "ssd")], "b": [row(src, "ssd"), row(src, "dram")]}
        await until(lambda: cached_on(c, "m") == ("a", "b"))
        c.wake("m")
        await until(lambda: cluster.launched_on == [("m", "b")])  # DRAM beats a freer SSD
        cluster.rows = {"a": [row(src, "ssd")]}  # evicted from b entirely
        await until(lambda: cached_on(c, "m") == ("a",))  # the next refresh drops b

    run(tmp_path, body)


def test_a_fetch_in_flight_counts_with_the_bytes_it_still_has_to_bring(tmp_path: Path) -> None:
    """a's store is 10% into fetching the 2 GiB checkpoint to SSD at 0.1 GB/s (19 s to go); b
    holds a complete SSD copy: the instance goes to b (counted as a finished copy, a's fetch
    tied with b's and the freer a won). A complete SSD copy beside a DRAM fetch in flight is
    an SSD copy, not a DRAM one."""
    gib = 1 << 30

    async def body(c: Controller, cluster: TwoNodes) -> None:
        c.deploy(DeploymentSpec("m", URL, prefetch="none"))
        cluster.link_rates = {"a": {"remote": 1e8}}
        cluster.rows = {
            "a": [row(URL, "ssd", nbytes=2 * gib, fetched=0.1)],
            "b": [row(URL, "ssd", nbytes=2 * gib)],
        }
        await until(lambda: "a" in c.rates() and cached_on(c, "m") == ("a", "b"))
        assert c._pending == {URL: {"a": pytest.approx(0.9 * 2 * gib)}}
        c.wake("m")
        await until(lambda: cluster.launched_on == [("m", "b")])
        cluster.rows["a"] = [row(URL, "ssd", nbytes=2 * gib), row(URL, "dram", 0, 2 * gib, 0.5)]
        await until(lambda: c._pending == {})
        assert c._stored[URL] == {"a": DISK, "b": DISK}

    run(tmp_path, body)


def test_prefetch_and_evict_on_demand_through_the_admin_api(tmp_path: Path) -> None:
    """`ember prefetch|evict` reach the controller through these routes."""
    import httpx

    from ember.api.app import create_app
    from ember.api.config import ApiConfig

    async def body(c: Controller, cluster: TwoNodes) -> None:
        c.deploy(DeploymentSpec("m", URL, prefetch="none"))
        c.deploy(DeploymentSpec("local", str(tmp_path)))
        app = create_app(c, ApiConfig())
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://ember.test") as http:
            r = await http.post("/admin/deployments/m/prefetch", json={"tier": "dram"})
            assert r.status_code == 200, r.text
            assert r.json() == {"deployment": "m", "source": URL, "tier": "dram", "node": "a"}
            r = await http.post("/admin/deployments/m/prefetch", json={"node": "b"})
            assert r.json()["node"] == "b" and r.json()["tier"] == "ssd"  # the default tier
            assert cluster.prefetched == [(URL, "a", "dram"), (URL, "b", "ssd")]
            cluster.rows = {"a": [row(URL, "dram", pins=1)], "b": [row(URL, "dram")]}
            r = await http.post("/admin/deployments/m/evict")  # every node: a's copy is in use
            assert r.status_code == 409 and r.json()["error"]["code"] == "in_use", r.text
            assert "in use in dram on node a; evicted from b" in r.json()["error"]["message"]
            assert cluster.rows == {"a": [row(URL, "dram", pins=1)], "b": []}  # a's stays
            cluster.rows["b"] = [row(URL, "dram")]
            r = await http.post("/admin/deployments/m/evict", json={"node": "b"})
            assert r.json()["nodes"] == ["b"]  # evicted from DRAM (the default) on b only
            cluster.rows["a"] = [row(URL, "dram")]
            r = await http.post("/admin/deployments/m/evict", json={"tier": "dram"})
            assert r.json()["nodes"] == ["a"]
            r = await http.post("/admin/deployments/m/evict", json={"tier": "ssd"})
            assert r.json()["nodes"] == []  # no node holds it there
            for path, body, status, param in [
                ("/admin/deployments/local/evict", {}, 400, "source"),
                ("/admin/deployments/m/prefetch", {"tier": "gpu"}, 400, "tier"),
                ("/admin/deployments/m/prefetch", {"node": "z"}, 400, "node"),
                ("/admin/deployments/m/evict", {"bogus": 1}, 400, None),
                ("/admin/deployments/nope/prefetch", {}, 404, "model"),
            ]:
                r = await http.post(path, json=body)
                assert r.status_code == status, (path, body, r.text)
                assert r.json()["error"]["param"] == param, r.text
        with pytest.raises(ConfigError, match="only s3:// checkpoints can be evicted"):
            await c.evict("local")
        assert len(cluster.prefetched) == 2
        # `ember prefetch` of a local model: converted there, and loaded into DRAM.
        assert c.prefetch("local", "dram", "b") == "b"
        assert cluster.prepared[-1] == (str(tmp_path), "b", "dram")

    run(tmp_path, body)


def test_a_deleted_s3_deployment_leaves_dram_once_unpinned_unless_another_serves_it(
    tmp_path: Path,
) -> None:
    async def body(c: Controller, cluster: TwoNodes) -> None:
        other = "s3://models/other"
        for name, source in (("m", URL), ("m2", URL), ("o", other)):
            c.deploy(DeploymentSpec(name, source, prefetch="none"))
        cluster.rows = {
            "a": [row(URL, "dram"), row(URL, "ssd"), row(other, "dram")],
            "b": [row(other, "dram", pins=1)],  # an instance still maps it
        }
        c.delete("m")  # m2 serves the same checkpoint: it stays
        await asyncio.sleep(0.1)
        assert len(cluster.rows["a"]) == 3
        c.delete("m2")
        await until(lambda: cluster.rows["a"] == [row(URL, "ssd"), row(other, "dram")])
        c.delete("o")
        await until(lambda: cluster.rows["a"] == [row(URL, "ssd")])
        await asyncio.sleep(0.6)  # b's copy is pinned: tried again, left in place
        assert cluster.rows["b"] == [row(other, "dram", pins=1)]
        cluster.rows["b"] = [row(other, "dram")]  # the instance process exited
        await until(lambda: cluster.rows["b"] == [])

    run(tmp_path, body)


def test_a_start_goes_where_no_load_is_already_running(tmp_path: Path) -> None:
    """ServerlessLLM's loading queue: both nodes hold the 4 GB checkpoint on SSD (2 s each);
    a second start of it goes to the node that is not already loading it."""
    src = str(tmp_path)

    async def body(c: Controller, cluster: TwoNodes) -> None:
        big = 4 * 10**9
        cluster.rows = {n: [row(src, "ssd", nbytes=big)] for n in ("a", "b")}
        c.deploy(DeploymentSpec("m1", src))
        c.deploy(DeploymentSpec("m2", src))
        await until(lambda: cached_on(c, "m1") == ("a", "b"))
        c.wake("m1")
        await until(lambda: cluster.launched_on == [("m1", "a")])  # the freer node
        c.wake("m2")
        await until(lambda: cluster.launched_on == [("m1", "a"), ("m2", "b")])

    run(tmp_path, body)


def test_a_spot_zone_that_loses_a_node_gets_no_new_instance_while_safe_nodes_have_room(
    tmp_path: Path,
) -> None:
    """SpotServe meets ServerlessLLM: "a" holds the checkpoint in DRAM but is a spot node in
    zone z1. While z1 is quiet a start goes there; once z1's other spot node is preempted
    (risk 1/2: 30 s added to a's score), the next start goes to on-demand "b", from S3."""
    src = str(tmp_path)
    spot_z1 = (("spot", "true"), ("zone", "z1"))

    async def body(c: Controller, cluster: TwoNodes) -> None:
        a, b = cluster.node_list
        a = replace(a, labels=spot_z1)
        cluster.node_list = [a, b, NodeInfo("c", "127.0.0.1", True, spot_z1, 4.0, 0.0)]
        cluster.rows = {"a": [row(src, "dram", nbytes=2 * 10**9)]}
        c.deploy(DeploymentSpec("m1", src))
        c.deploy(DeploymentSpec("m2", src))
        await until(lambda: cached_on(c, "m1") == ("a",))
        c.wake("m1")
        await until(lambda: cluster.launched_on == [("m1", "a")])  # from DRAM: 0.1 s
        cluster.node_list = [a, b]  # c preempted (the next node listing notes the loss)
        c.wake("m2")
        await until(lambda: cluster.launched_on == [("m1", "a"), ("m2", "b")])

    run(tmp_path, body)


def test_a_node_without_a_copy_expects_it_from_the_node_that_has_one_if_stores_fetch_from_peers(
    tmp_path: Path,
) -> None:
    """ "a" holds the 1 GiB checkpoint in DRAM but has no room; "b" starts it, expecting it from
    a's copy at the assumed peer rate (2 GB/s), and with the stores' peer fetches off, from S3
    (1 GB/s assumed)."""

    async def body(c: Controller, cluster: TwoNodes) -> None:
        cluster.node_list[0] = replace(cluster.node_list[0], cpus_available=0.0)
        cluster.rows = {"a": [row(URL, "dram", nbytes=2**30)]}
        c.deploy(DeploymentSpec("m", URL, prefetch="none"))
        await until(lambda: cached_on(c, "m") == ("a",))
        c.wake("m")
        await until(lambda: cluster.launched_on == [("m", "b")])
        [inst] = next(s.instances for s in c.status() if s.spec.name == "m")
        assert inst.estimated_load_s == pytest.approx(2**30 / 2e9)
        cluster.peer_fetch = False
        c.deploy(DeploymentSpec("n", "s3://models/n", prefetch="none"))
        cluster.rows = {
            "a": [row(URL, "dram", nbytes=2**30), row("s3://models/n", "dram", nbytes=2**30)]
        }
        await until(lambda: cached_on(c, "n") == ("a",))
        c.wake("n")
        await until(lambda: cluster.launched_on[1:] == [("n", "b")])
        [inst] = next(s.instances for s in c.status() if s.spec.name == "n")
        assert inst.estimated_load_s == pytest.approx(2**30 / 1e9)

    run(tmp_path, body)


def test_a_node_whose_store_measured_a_slow_s3_link_is_passed_over(tmp_path: Path) -> None:
    """Node "a" is the freer, but its store measured 50 MB/s from S3 (a 1 GB checkpoint: 20 s)
    where "b" measured 2 GB/s: the start goes to "b", and status reports both rates."""

    async def body(c: Controller, cluster: TwoNodes) -> None:
        c.deploy(DeploymentSpec("m", URL, prefetch="none"))
        cluster.link_rates = {"a": {"remote": 50e6, "ssd": 3e9}, "b": {"remote": 2e9}}
        await until(lambda: c.rates() == cluster.link_rates)
        c.wake("m")
        await until(lambda: cluster.launched_on == [("m", "b")])
        [inst] = next(s.instances for s in c.status() if s.spec.name == "m")
        assert inst.estimated_load_s == pytest.approx((1 << 30) / 2e9)  # 1 GiB at b's rate
        cluster.link_rates = {}  # measured nothing: a is the freer node again
        await until(lambda: c.rates() == {})
        c.deploy(DeploymentSpec("n", "s3://models/n", prefetch="none"))
        c.wake("n")
        await until(lambda: cluster.launched_on[1:] == [("n", "a")])

    run(tmp_path, body)


def test_a_busy_deployment_gets_its_checkpoint_onto_the_node_its_next_instance_starts_on(
    tmp_path: Path,
) -> None:
    """Scale-out prefetch: above half of what its instances are sized for, a deployment that
    may still grow has its checkpoint brought to the node its next instance would start on
    (once), so that instance does not download while requests queue for it."""
    load = {"m": (0, 0)}

    async def ticks(c: Controller, n: int = 5) -> None:
        for _ in range(n):
            await c.reconcile_once()

    async def body(c: Controller, cluster: TwoNodes) -> None:
        c.set_load_source(lambda name: load.get(name, (0, 0)))
        c.deploy(DeploymentSpec("m", URL, min_instances=1, max_instances=2))
        await until(lambda: cluster.launched_on == [("m", "a")])
        cluster.rows = {"a": [row(URL, "dram", pins=1, nbytes=2**30)]}
        # The first instance never finishes loading here, which queues a second one on "a"
        # behind it: "b" is made clearly worse (its store measured slow links to S3 and to
        # its peers, which it would fetch a's copy from).
        cluster.link_rates = {"b": {"remote": 1e6, "peer": 1e6}}
        await until(lambda: cached_on(c, "m") == ("a",) and "b" in c.rates())
        # "a" has room for the next instance beside its DRAM copy: nothing to fetch.
        load["m"] = (1, 2)  # 3 of 4
        await ticks(c)
        assert cluster.prefetched == []
        # "a" is full now: the next instance would go to "b", which holds nothing.
        cluster.node_list[0] = replace(cluster.node_list[0], cpus_available=0.0)
        load["m"] = (0, 2)  # half: not yet
        c._deployments["m"].ahead_checked_at = float("-inf")
        await ticks(c)
        assert cluster.prefetched == []
        load["m"] = (0, 3)
        c._deployments["m"].ahead_checked_at = float("-inf")
        await ticks(c)
        assert cluster.prefetched == [(URL, "b", "ssd")]
        c._deployments["m"].ahead_checked_at = float("-inf")
        await ticks(c)
        assert cluster.prefetched == [(URL, "b", "ssd")]  # believed there now: once
        # A local model is converted there; none when the deployment is at its maximum or
        # prefetches nothing.
        for name, spec in [
            ("local", DeploymentSpec("local", str(tmp_path), min_instances=1, max_instances=2)),
            ("full", DeploymentSpec("full", "s3://models/full", min_instances=1)),
            ("off", DeploymentSpec("off", "s3://models/off", min_instances=1, max_instances=3,
                                   prefetch="none")),
        ]:  # fmt: skip
            cluster.node_list[0] = replace(cluster.node_list[0], cpus_available=4.0)
            c.deploy(spec)
            await until(lambda n=name: any(d == n for d, _ in cluster.launched_on))  # type: ignore[misc]
            cluster.node_list[0] = replace(cluster.node_list[0], cpus_available=0.0)
            load[name] = (0, 4)
            await ticks(c)
        assert cluster.prepared == [(str(tmp_path), "b", "ssd")]
        assert cluster.prefetched == [(URL, "b", "ssd")]

    run(tmp_path, body)
