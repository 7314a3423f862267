"""Instances on a two-node local Ray cluster (`ray.cluster_utils.Cluster`, all on 127.0.0.1).

Each node has one logical CPU, so two instances must land on different nodes; node labels
(spot, zone) come through; a model comes back to the node that already converted it; a
tensor-parallel instance's actor is given every rank's GPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from ember import SamplingParams
from ember.cluster.cluster import ClusterConfig, RayCluster
from ember.cluster.runner import node_cache_dir
from ember.controller.controller import Controller
from ember.controller.types import DeploymentSpec, InstanceState
from ember.policy.clock import FakeClock

pytestmark = [pytest.mark.ray, pytest.mark.timeout(400)]

START_TIMEOUT_S = 120.0


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RayCluster, Path]]:
    """The cluster, joined by this process as a driver, and the per-node cache root."""
    from ray.cluster_utils import Cluster

    common = {"num_cpus": 1, "node_ip_address": "127.0.0.1"}
    ray_cluster = Cluster(
        initialize_head=True,
        head_node_args={
            **common,
            "include_dashboard": False,
            "labels": {"zone": "a", "spot": "false"},
        },
    )
    # Node b declares two logical GPUs (Ray hands out their ids without any device present).
    ray_cluster.add_node(**common, num_gpus=2, labels={"zone": "b", "spot": "true"})
    ray_cluster.wait_for_nodes()
    cache = tmp_path_factory.mktemp("multinode-cache")
    cluster = RayCluster(ClusterConfig(address=ray_cluster.address, cache_dir=str(cache)))
    try:
        yield cluster, cache
    finally:
        cluster.shutdown()
        import ray

        ray.shutdown()
        ray_cluster.shutdown()


def ready_nodes(controller: Controller, name: str) -> list[str | None]:
    return sorted(
        i.node_id
        for s in controller.status()
        if s.spec.name == name
        for i in s.instances
        if i.state is InstanceState.READY
    )


async def until(controller: Controller, pred: Callable[[], bool], timeout_s: float = 120.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not pred():
        assert loop.time() < deadline, "condition not reached in time"
        await controller.reconcile_once()
        await asyncio.sleep(0.05)


def test_ember_serve_joins_the_cluster_and_serves(
    two_nodes: tuple[RayCluster, Path], tmp_path: Path
) -> None:
    cluster, _ = two_nodes
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "ember", "serve", "--address", cluster.address, "--port",
           str(port), "--state-dir", str(tmp_path / "state"), "--cache-dir", str(tmp_path / "c")]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    with open(tmp_path / "serve.log", "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "ember serve did not come up"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.25)
        status = httpx.get(url + "/admin/status", timeout=10).json()
        assert sorted(n["labels"]["zone"] for n in status["nodes"]) == ["a", "b"]
        body = {"model": "ember-demo", "prompt": "hi", "max_tokens": 4}
        r = httpx.post(url + "/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 4
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            assert proc.wait(60) == 0
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
    # Leaving does not stop the cluster, and the server's instance went with it.
    assert len(cluster.nodes()) == 2 and cluster.actor_names() == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_nodes_carry_spot_and_zone_labels(two_nodes: tuple[RayCluster, Path]) -> None:
    cluster, _ = two_nodes
    nodes = cluster.nodes()
    assert sorted(dict(n.labels)["zone"] for n in nodes) == ["a", "b"]
    assert {dict(n.labels)["zone"]: n.label("spot") for n in nodes} == {"a": "false", "b": "true"}
    assert all(n.alive and n.cpus_total == 1.0 for n in nodes)


def test_a_tensor_parallel_instance_actor_sees_every_rank_gpu(
    two_nodes: tuple[RayCluster, Path],
) -> None:
    """Its rank processes inherit the actor's CUDA_VISIBLE_DEVICES and rank r uses cuda:r, so
    the actor must hold all tp GPUs (with one bundle per rank it saw only bundle 0's)."""
    import ray

    from ember.cluster.adapter import RayAdapter

    class GpuProbe:  # stands in for an instance actor (defined here: shipped by value)
        def visible(self) -> tuple[list[str], str | None]:
            return [str(i) for i in ray.get_gpu_ids()], os.environ.get("CUDA_VISIBLE_DEVICES")

    adapter = RayAdapter.attach()
    ref = adapter.create_actor(
        GpuProbe, "ember-instance:gpu-probe", (), cpus=0.5, gpus=1, node_id=None, ranks=2
    )
    try:
        ids, visible = ray.get(ref.actor.visible.remote(), timeout=60)
        assert sorted(ids) == ["0", "1"]
        assert visible is not None and sorted(visible.split(",")) == ["0", "1"]
    finally:
        asyncio.run(adapter.kill(ref, graceful_s=1.0))
    assert two_nodes[0].actor_names() == []


def test_two_instances_are_placed_on_two_nodes_and_both_serve(
    two_nodes: tuple[RayCluster, Path], model_factory: Callable[..., Path], tmp_path: Path
) -> None:
    cluster, cache = two_nodes
    model = model_factory("llama", "tiny", "fp32", seed=0)
    all_nodes = sorted(n.node_id for n in cluster.nodes())

    async def main() -> None:
        controller = Controller(cluster, tmp_path / "e.db", FakeClock(), reconcile_interval_s=0.05)
        await controller.start()
        try:
            controller.deploy(DeploymentSpec("m", str(model), min_instances=2, max_instances=2))
            await until(controller, lambda: len(ready_nodes(controller, "m")) == 2)
            assert ready_nodes(controller, "m") == all_nodes
            params = SamplingParams(max_tokens=5, temperature=0.0)
            outs = []
            for h in controller.ready_instances("m"):
                outs.append(
                    [t async for d in h.generate("r", "hi", params) for t in d.new_token_ids]
                )
            assert outs[0] == outs[1] and len(outs[0]) == 5  # same weights, same greedy tokens
            # The nodes share this machine, and so its cache: the checkpoint was converted once
            # (the conversion lock) into the directory named after the host.
            assert len(list((node_cache_dir(cache) / "checkpoints").glob("*/index.json"))) == 1
        finally:
            await controller.stop()
        assert cluster.actor_names() == []

    asyncio.run(main())


def test_instance_returns_to_the_node_that_has_its_checkpoint(
    two_nodes: tuple[RayCluster, Path], model_factory: Callable[..., Path], tmp_path: Path
) -> None:
    cluster, _ = two_nodes
    model_a = model_factory("llama", "tiny", "fp32", seed=1)
    model_b = model_factory("llama", "tiny", "fp32", seed=2)
    clock = FakeClock()

    async def main() -> None:
        controller = Controller(cluster, tmp_path / "e.db", clock, reconcile_interval_s=0.05)
        await controller.start()
        try:
            controller.deploy(DeploymentSpec("a", str(model_a), min_instances=1))
            await until(controller, lambda: len(ready_nodes(controller, "a")) == 1)
            # "b" can only go to the other node: it is the only one with a free CPU.
            controller.deploy(DeploymentSpec("b", str(model_b), keep_alive_s=10.0))
            controller.wake("b")
            await controller.wait_for_instance("b", START_TIMEOUT_S)
            [node_a], [node_b] = ready_nodes(controller, "a"), ready_nodes(controller, "b")
            assert node_a != node_b
            # Free both nodes, then wake "b": with both free, its checkpoint decides.
            controller.delete("a")
            clock.advance(11.0)
            await until(controller, lambda: cluster.actor_names() == [])
            await until(controller, lambda: sum(n.cpus_available for n in cluster.nodes()) == 2)
            controller.wake("b")
            await controller.wait_for_instance("b", START_TIMEOUT_S)
            assert ready_nodes(controller, "b") == [node_b]
            assert [s.cached_on for s in controller.status()] == [(node_b,)]
        finally:
            await controller.stop()

    asyncio.run(main())


def test_a_busy_instance_gets_its_model_onto_the_other_node_before_a_scale_out(
    two_nodes: tuple[RayCluster, Path], model_factory: Callable[..., Path], tmp_path: Path
) -> None:
    """The scale-out prefetch on Ray: one instance of a local model carries 3 of the 4 requests
    it is sized for and has no room beside it (one CPU per node), so the next instance would
    start on the other node. That node's store loads the model into its DRAM tier
    (`prefetch: dram`) while no instance runs there, before the load asks for one."""
    cluster, _ = two_nodes
    model = model_factory("llama", "tiny", "fp32", seed=53)

    async def main() -> None:
        controller = Controller(cluster, tmp_path / "e.db", FakeClock(), reconcile_interval_s=0.05)
        await controller.start()
        tasks: list[asyncio.Task[list[int]]] = []
        try:
            spec = DeploymentSpec(
                "busy", str(model), min_instances=1, max_instances=2, target_concurrency=4,
                prefetch="dram",
            )  # fmt: skip
            controller.deploy(spec)
            await until(controller, lambda: len(ready_nodes(controller, "busy")) == 1)
            [home] = ready_nodes(controller, "busy")
            [other] = [n.node_id for n in cluster.nodes() if n.node_id != home]

            async def in_other_dram() -> bool:
                # This model's conversion (named after its folder): node stores reuse this
                # machine's tier slots across clusters, so the other node's DRAM tier may hold
                # what earlier tests loaded.
                rows = (await controller.checkpoints()).get(other, [])
                return any(
                    Path(r["key"]).name.startswith(f"{model.name}-")
                    and r["tier"] == "dram" and r.get("fetched") is None
                    for r in rows
                )  # fmt: skip

            assert not await in_other_dram()
            [handle] = controller.ready_instances("busy")
            params = SamplingParams(max_tokens=1500, temperature=0.0, ignore_eos=True)

            async def run(rid: str) -> list[int]:
                return [
                    t async for d in handle.generate(rid, "hi", params) for t in d.new_token_ids
                ]

            tasks = [asyncio.create_task(run(f"r{i}")) for i in range(3)]
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60
            while not await in_other_dram():
                assert loop.time() < deadline, await controller.checkpoints()
                await controller.reconcile_once()
                await asyncio.sleep(0.1)
            assert ready_nodes(controller, "busy") == [home]  # the load asked for no second one
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await controller.stop()
        assert cluster.actor_names() == []

    asyncio.run(main())


def test_a_notice_moves_streams_to_an_instance_on_the_other_node(
    two_nodes: tuple[RayCluster, Path], model_factory: Callable[..., Path], tmp_path: Path
) -> None:
    """Over real Ray actors on two nodes: a preemption notice for the node of the only
    instance starts its replacement on the other node and moves both streams there live (a
    ticket to the source's K/V over a Ray call, the bytes pulled by the target from the source,
    the held copy and the rounds over the output channel); the
    tokens are the undisturbed ones and the drained instance stops."""
    from ember import LLM
    from ember.api.router import Router
    from ember.migration.transfer import KvMode, MoveLink

    cluster, _ = two_nodes
    # Eight layers, not two: the source must still be running the requests when its
    # replacement is up and asks for their K/V (with two, a fast machine finished all 1,900
    # tokens in the 2 s the replacement took, and the moves recomputed instead).
    model = model_factory("llama", "tiny", "fp32", seed=4, num_hidden_layers=8)
    cases = {
        "g": ("the water of time", SamplingParams(max_tokens=1900, temperature=0.0, ignore_eos=True)),
        "s": ("people would", SamplingParams(max_tokens=1900, temperature=0.8, seed=3, ignore_eos=True)),
    }  # fmt: skip
    llm = LLM(str(model))
    try:
        want = {rid: llm.generate([p], sp)[0].token_ids for rid, (p, sp) in cases.items()}
    finally:
        llm.close()

    async def main() -> None:
        controller = Controller(cluster, tmp_path / "n.db", FakeClock(), reconcile_interval_s=0.05)
        await controller.start()
        moved: list[int] = []  # K/V tokens each move sent
        router = Router(
            controller,
            on_migrate=lambda _model, kv_tokens: moved.append(kv_tokens),
            link=MoveLink(KvMode.ALWAYS),
        )
        try:
            controller.deploy(DeploymentSpec("m", str(model), min_instances=1, max_instances=1))
            await until(controller, lambda: len(ready_nodes(controller, "m")) == 1)
            [source] = controller.ready_instances("m")
            got: dict[str, list[int]] = {rid: [] for rid in cases}
            started = asyncio.Event()
            reading = asyncio.Event()
            reading.set()

            async def one(rid: str) -> None:
                prompt, params = cases[rid]
                async for delta in router.generate("m", rid, prompt, params):
                    got[rid] += delta.new_token_ids
                    if all(len(v) >= 10 for v in got.values()):
                        started.set()
                    await reading.wait()

            tasks = [asyncio.create_task(one(rid)) for rid in cases]
            await asyncio.wait_for(started.wait(), 120)
            # The clients stop reading while the replacement starts (the tiny model would finish
            # 1,900 tokens before it is up): the journal, what the clients have, stays put, and
            # the source's tokens beyond it are dropped at the switch and computed again.
            reading.clear()
            assert source.node_id is not None
            answer = controller.notice(source.node_id, 60.0)
            assert answer["draining"] == [source.instance_id] and answer["moving"] == 2
            flights = list(router._flights[source.instance_id].values())

            def caught_up() -> bool:
                return all(f.move is not None and f.move.ready for f in flights)

            await until(controller, caught_up)
            reading.set()
            await asyncio.wait_for(asyncio.gather(*tasks), 300)
            assert got == {rid: list(ids) for rid, ids in want.items()}
            assert len(moved) == 2 and min(moved) > 10, moved
            for rid in cases:
                entry = router.journal.get(rid)
                assert entry is not None and entry.instance_id != source.instance_id
            await until(controller, lambda: ready_nodes(controller, "m") != [source.node_id])
            [target] = controller.ready_instances("m")
            assert target.node_id != source.node_id
            stats = await target.stats()  # the K/V came from the source, not recomputed
            assert (stats["kv_pulls"], stats["kv_pull_failures"]) == (2, 0), stats
            await until(controller, lambda: source.instance_id not in {
                i.instance_id for s in controller.status() for i in s.instances
                if i.state is not InstanceState.STOPPED
            })  # fmt: skip
        finally:
            await router.drain_background()
            await controller.stop()
        assert cluster.actor_names() == []

    asyncio.run(main())
