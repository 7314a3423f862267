"""The reconcile loop's decisions over a cluster without Ray (tests/unit/serving_support.py).

`LocalCluster(cpus=0)` has no room, so instances stay pending/starting forever: these tests see
the controller's scaling decisions without loading any engine. Time is a FakeClock.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

from serving_support import LocalCluster

from ember.controller.controller import Controller
from ember.controller.types import DeploymentSpec, InstanceState
from ember.policy.clock import FakeClock

S = InstanceState


def run(
    tmp_path: Path,
    body: Callable[[Controller, LocalCluster, FakeClock, list[tuple[int, int]]], Awaitable[None]],
    cpus: float = 0.0,
) -> None:
    async def main() -> None:
        clock = FakeClock(100.0)
        cluster = LocalCluster(tmp_path / "cache", cpus=cpus)
        # A long interval: only the test's own reconcile_once calls act.
        controller = Controller(cluster, tmp_path / "e.db", clock, reconcile_interval_s=3600)
        load = [(0, 0)]
        controller.set_load_source(lambda name: load[0])
        await controller.start()
        try:
            await body(controller, cluster, clock, load)
        finally:
            await controller.stop()

    asyncio.run(main())


def states(controller: Controller, name: str) -> list[S]:
    return sorted(i.state for s in controller.status() if s.spec.name == name for i in s.instances)


def test_load_scales_up_to_ceil_of_load_over_target_within_max(tmp_path: Path) -> None:
    async def body(c: Controller, cluster: LocalCluster, clock: FakeClock, load: list) -> None:
        c.deploy(DeploymentSpec("m", str(tmp_path), max_instances=5, target_concurrency=4))
        load[0] = (9, 0)  # ceil(9 / 4) = 3
        await c.reconcile_once()
        assert states(c, "m") == [S.STARTING] * 3
        await c.reconcile_once()  # idempotent: the same load launches nothing more
        assert len(cluster.handles) == 3
        load[0] = (10, 20)  # ceil(30 / 4) = 8, capped at 5
        await c.reconcile_once()
        assert states(c, "m") == [S.STARTING] * 5
        assert c.status()[0].desired == 5

    run(tmp_path, body)


def test_idle_deployment_keeps_instances_for_keep_alive_then_drops_to_min(tmp_path: Path) -> None:
    async def body(c: Controller, cluster: LocalCluster, clock: FakeClock, load: list) -> None:
        spec = DeploymentSpec("m", str(tmp_path), min_instances=1, max_instances=3,
                              target_concurrency=1, keep_alive_s=10.0)  # fmt: skip
        c.deploy(spec)
        load[0] = (3, 0)
        await c.reconcile_once()
        assert states(c, "m") == [S.STARTING] * 3
        load[0] = (0, 0)
        clock.advance(9.9)
        await c.reconcile_once()
        assert states(c, "m") == [S.STARTING] * 3  # within keep-alive: nothing stops
        clock.advance(0.2)
        await c.reconcile_once()
        await asyncio.sleep(0.05)  # the stop tasks run
        await c.reconcile_once()  # and stopped records are dropped
        assert states(c, "m") == [S.STARTING]
        assert len(cluster.stopped) == 2

    run(tmp_path, body)


def test_wake_starts_one_instance_even_before_the_router_counts_the_request(
    tmp_path: Path,
) -> None:
    async def body(c: Controller, cluster: LocalCluster, clock: FakeClock, load: list) -> None:
        c.deploy(DeploymentSpec("m", str(tmp_path)))
        await c.reconcile_once()
        assert states(c, "m") == []  # min 0, no load: scaled to zero
        c.wake("m")
        await c.reconcile_once()
        assert states(c, "m") == [S.STARTING]

    run(tmp_path, body)


def test_failed_start_backs_off_in_clock_time_then_retries(tmp_path: Path) -> None:
    empty = tmp_path / "not-a-model"
    empty.mkdir()

    async def body(c: Controller, cluster: LocalCluster, clock: FakeClock, load: list) -> None:
        c.deploy(DeploymentSpec("bad", str(empty)))
        load[0] = (1, 0)
        await c.reconcile_once()
        for _ in range(3000):  # the start fails once it looks at the folder (after imports)
            await asyncio.sleep(0.01)
            if states(c, "bad") == [S.FAILED]:
                break
        assert states(c, "bad") == [S.FAILED]
        assert "neither an ember checkpoint" in (c.status()[0].instances[0].error or "")
        await asyncio.sleep(0.05)  # the failed instance's cleanup runs

        def launched() -> int:  # every launch is either still held or was stopped
            return len(cluster.handles) + len(cluster.stopped)

        await c.reconcile_once()
        clock.advance(1.9)  # the first back-off is 2 s
        await c.reconcile_once()
        assert launched() == 1
        clock.advance(0.2)
        await c.reconcile_once()
        assert launched() == 2
        await c.reconcile_once()
        assert launched() == 2

    run(tmp_path, body, cpus=8.0)


def test_delete_stops_every_instance_and_forgets_the_deployment(tmp_path: Path) -> None:
    async def body(c: Controller, cluster: LocalCluster, clock: FakeClock, load: list) -> None:
        c.deploy(DeploymentSpec("m", str(tmp_path), min_instances=2, max_instances=2))
        await c.reconcile_once()
        assert states(c, "m") == [S.STARTING] * 2
        c.delete("m")
        await asyncio.sleep(0.05)
        await c.reconcile_once()
        assert c.status() == [] and c.list_deployments() == []
        assert sorted(cluster.stopped) == ["m-1", "m-2"] and cluster.handles == {}

    run(tmp_path, body)
