"""The controller driving real instances on a private local Ray (one per module, 4 logical CPUs).

Scale from zero on `wake`, scale to zero after keep-alive (fake clock), restart from SQLite,
delete without leaked actors, errors that keep their type across Ray, loopback-only sockets.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import psutil
import pytest

from ember import SamplingParams
from ember.cluster.adapter import alive_actor_classes
from ember.cluster.cluster import ClusterConfig, RayCluster
from ember.cluster.instance import InstanceHandle
from ember.controller.controller import Controller
from ember.controller.types import DeploymentSpec, InstanceState, StreamDelta
from ember.errors import DeploymentError, InstanceLostError, ModelNotFoundError, RequestError
from ember.policy.clock import FakeClock

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

START_TIMEOUT_S = 120.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayCluster]:
    cache = tmp_path_factory.mktemp("ember-cache")
    c = RayCluster(ClusterConfig(num_cpus=4, cache_dir=str(cache)))
    yield c
    c.shutdown()


@pytest.fixture(scope="module")
def model(model_factory: Callable[..., Path]) -> Path:
    return model_factory("llama", "tiny", "fp32", seed=0)


async def until(controller: Controller, pred: Callable[[], bool], timeout_s: float = 60.0) -> None:
    """Reconcile until `pred()` holds (the controller's loop also runs meanwhile)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not pred():
        assert loop.time() < deadline, "condition not reached in time"
        await controller.reconcile_once()
        await asyncio.sleep(0.05)


def states(controller: Controller, name: str) -> list[InstanceState]:
    return [i.state for s in controller.status() if s.spec.name == name for i in s.instances]


async def collect(
    handle: InstanceHandle, rid: str, prompt: str, params: SamplingParams
) -> list[StreamDelta]:
    return [d async for d in handle.generate(rid, prompt, params)]


def run(
    tmp_path: Path, cluster: RayCluster, body: Callable[[Controller, FakeClock], Awaitable[None]]
) -> None:
    async def main() -> None:
        clock = FakeClock(1000.0)
        controller = Controller(
            cluster, tmp_path / "ember.db", clock, reconcile_interval_s=0.05, probe_interval_s=0.2
        )
        await controller.start()
        try:
            await body(controller, clock)
        finally:
            await controller.stop()

    asyncio.run(main())


def test_wake_from_zero_then_scale_to_zero_after_keep_alive(
    tmp_path: Path, cluster: RayCluster, model: Path
) -> None:
    greedy = SamplingParams(max_tokens=8, temperature=0.0)

    async def body(controller: Controller, clock: FakeClock) -> None:
        controller.deploy(DeploymentSpec("m", str(model), keep_alive_s=30.0))
        await until(controller, lambda: True)
        assert states(controller, "m") == []  # min 0 and no request: nothing runs

        controller.wake("m")
        await controller.wait_for_instance("m", START_TIMEOUT_S)
        [handle] = controller.ready_instances("m")
        deltas = await collect(handle, "r1", "hello there", greedy)
        assert deltas[-1].finished and deltas[-1].finish_reason == "length"
        assert sum(len(d.new_token_ids) for d in deltas) == 8
        assert all(d.prompt_tokens == deltas[0].prompt_tokens > 0 for d in deltas)

        clock.advance(29.0)  # within keep-alive: the instance stays
        for _ in range(3):
            await controller.reconcile_once()
        assert states(controller, "m") == [InstanceState.READY]

        clock.advance(2.0)  # past keep-alive: scale to zero, actor gone
        await until(controller, lambda: states(controller, "m") == [])
        assert cluster.actor_names() == []

        controller.wake("m")  # and back again
        await controller.wait_for_instance("m", START_TIMEOUT_S)
        [again] = controller.ready_instances("m")
        assert again.instance_id != handle.instance_id
        assert [d.new_token_ids for d in await collect(again, "r2", "hello there", greedy)]

    run(tmp_path, cluster, body)


def test_greedy_tokens_match_the_in_process_engine(
    tmp_path: Path, cluster: RayCluster, model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ember.engine.config import EngineConfig
    from ember.engine.engine import Engine

    monkeypatch.setenv("EMBER_CACHE_DIR", str(tmp_path / "local-cache"))
    params = SamplingParams(max_tokens=12, temperature=0.0)
    engine = Engine(EngineConfig(model=str(model), max_num_seqs=16))
    engine.add_request("x", "the quick brown fox", params)
    want: list[int] = []
    while engine.has_unfinished():
        for out in engine.step():
            want += out.new_token_ids
    engine.close()

    async def body(controller: Controller, clock: FakeClock) -> None:
        controller.deploy(DeploymentSpec("m", str(model), min_instances=1))
        await controller.wait_for_instance("m", START_TIMEOUT_S)
        [handle] = controller.ready_instances("m")
        got = await asyncio.gather(
            *(collect(handle, f"r{i}", "the quick brown fox", params) for i in range(4))
        )
        for deltas in got:
            assert [t for d in deltas for t in d.new_token_ids] == want
        assert handle.in_flight == 0

    run(tmp_path, cluster, body)


def test_restarted_controller_restores_deployments_and_acts_on_them(
    tmp_path: Path, cluster: RayCluster, model: Path
) -> None:
    async def first(controller: Controller, clock: FakeClock) -> None:
        controller.deploy(DeploymentSpec("kept", str(model), min_instances=1, max_instances=2))
        controller.deploy(DeploymentSpec("idle", str(model), keep_alive_s=5.0))
        controller.deploy(DeploymentSpec("gone", str(model)))
        controller.delete("gone")

    run(tmp_path, cluster, first)
    assert cluster.actor_names() == []  # stop() took the instances down

    async def second(controller: Controller, clock: FakeClock) -> None:
        assert [s.name for s in controller.list_deployments()] == ["idle", "kept"]
        assert controller.get("kept").max_instances == 2
        with pytest.raises(ModelNotFoundError):
            controller.get("gone")
        await controller.wait_for_instance("kept", START_TIMEOUT_S)
        assert states(controller, "idle") == []

    run(tmp_path, cluster, second)


def test_delete_stops_actors_and_frees_their_processes(
    tmp_path: Path, cluster: RayCluster, model: Path
) -> None:
    async def body(controller: Controller, clock: FakeClock) -> None:
        controller.deploy(DeploymentSpec("d", str(model), min_instances=2, max_instances=2))
        await until(controller, lambda: states(controller, "d") == [InstanceState.READY] * 2)
        handles = controller.ready_instances("d")
        pids = [(await h.stats())["pid"] for h in handles]
        assert len(set(pids)) == 2 and all(psutil.pid_exists(p) for p in pids)
        assert len(cluster.actor_names()) == 2

        assert alive_actor_classes().count("InstanceActor") == 2
        controller.delete("d")
        await until(controller, lambda: not controller.status() and not controller._instances)
        assert cluster.actor_names() == []  # ray.util.list_named_actors
        await until(controller, lambda: "InstanceActor" not in alive_actor_classes())  # GCS
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 30
        while any(_alive(p) for p in pids):  # the worker process exits, its memory with it
            assert loop.time() < deadline, f"instance processes {pids} still alive"
            await asyncio.sleep(0.2)
        # Every CPU is free again (the GCS's resource view lags the kill by a moment).
        await until(controller, lambda: sum(n.cpus_available for n in cluster.nodes()) == 4.0)

    run(tmp_path, cluster, body)


def test_engine_errors_keep_their_type_and_early_close_aborts(
    tmp_path: Path, cluster: RayCluster, model: Path
) -> None:
    async def body(controller: Controller, clock: FakeClock) -> None:
        controller.deploy(DeploymentSpec("e", str(model), min_instances=1, max_model_len=64))
        await controller.wait_for_instance("e", START_TIMEOUT_S)
        [handle] = controller.ready_instances("e")
        with pytest.raises(RequestError, match="max_model_len is 64"):
            await collect(handle, "long", "word " * 200, SamplingParams(max_tokens=4))

        stream = handle.generate("early", "hi", SamplingParams(max_tokens=60, ignore_eos=True))
        first = await stream.__anext__()
        assert not first.finished
        await stream.aclose()  # the client went away
        assert handle.in_flight == 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while (await handle.stats())["unfinished"] or (await handle.stats())["streams"]:
            assert loop.time() < deadline, "aborted request still on the engine"
            await asyncio.sleep(0.05)

    run(tmp_path, cluster, body)


def test_tensor_parallel_instance_reserves_its_ranks_and_matches_tp1(
    tmp_path: Path, cluster: RayCluster, model: Path
) -> None:
    params = SamplingParams(max_tokens=8, temperature=0.0)

    async def body(controller: Controller, clock: FakeClock) -> None:
        controller.deploy(DeploymentSpec("tp2", str(model), min_instances=1, tp=2))
        controller.deploy(DeploymentSpec("tp1", str(model), min_instances=1))
        await controller.wait_for_instance("tp2", START_TIMEOUT_S)
        await controller.wait_for_instance("tp1", START_TIMEOUT_S)
        # tp2's actor holds both ranks' CPUs, tp1's one: 1 of 4 left.
        assert [n.cpus_available for n in cluster.nodes()] == [1.0]
        [h2], [h1] = controller.ready_instances("tp2"), controller.ready_instances("tp1")
        got2 = [t for d in await collect(h2, "a", "hello world", params) for t in d.new_token_ids]
        got1 = [t for d in await collect(h1, "a", "hello world", params) for t in d.new_token_ids]
        assert got2 == got1 and len(got1) == 8
        controller.delete("tp2")
        controller.delete("tp1")
        await until(controller, lambda: cluster.actor_names() == [])
        await until(controller, lambda: [n.cpus_available for n in cluster.nodes()] == [4.0])

    run(tmp_path, cluster, body)


def test_an_engine_change_rolls_over_and_the_busy_old_instance_drains(
    tmp_path: Path, cluster: RayCluster, model: Path
) -> None:
    """A rolling update: the old instance serves until the new revision's is ready, then takes
    nothing new and finishes the request it runs."""

    async def body(controller: Controller, clock: FakeClock) -> None:
        controller.deploy(DeploymentSpec("u", str(model), min_instances=1))
        await controller.wait_for_instance("u", START_TIMEOUT_S)
        [old] = controller.ready_instances("u")
        stream = old.generate("long", "hi", SamplingParams(max_tokens=2000, ignore_eos=True))
        first = await stream.__anext__()
        rest_task = asyncio.ensure_future(collect_rest(stream))
        controller.deploy(DeploymentSpec("u", str(model), min_instances=1, max_num_seqs=8))
        assert controller.ready_instances("u") == [old]  # no gap while the new one starts

        def taken_over() -> bool:
            return [h.instance_id for h in controller.ready_instances("u")] not in (
                [], [old.instance_id],
            )  # fmt: skip

        await until(controller, taken_over, timeout_s=START_TIMEOUT_S)
        [new] = controller.ready_instances("u")  # the old one takes nothing new
        assert new.instance_id != old.instance_id
        [status] = controller.status()
        if not rest_task.done():  # still running its request: draining, not stopped
            old_state = next(i.state for i in status.instances if i.instance_id == old.instance_id)
            assert old_state is InstanceState.DRAINING
        rest = await rest_task  # the running request finishes on the old instance
        assert len(first.new_token_ids) + sum(len(d.new_token_ids) for d in rest) == 2000
        assert rest[-1].finish_reason == "length"
        await until(controller, lambda: states(controller, "u") == [InstanceState.READY])
        assert [i.revision for i in controller.status()[0].instances] == [1]

    run(tmp_path, cluster, body)


async def collect_rest(stream: AsyncIterator[StreamDelta]) -> list[StreamDelta]:
    return [d async for d in stream]


def test_killed_instance_is_found_and_replaced(
    tmp_path: Path, cluster: RayCluster, model: Path
) -> None:
    import ray

    async def body(controller: Controller, clock: FakeClock) -> None:
        controller.deploy(DeploymentSpec("k", str(model), min_instances=1))
        await controller.wait_for_instance("k", START_TIMEOUT_S)
        [victim] = controller.ready_instances("k")
        params = SamplingParams(max_tokens=1500, ignore_eos=True)
        stream = victim.generate("doomed", "hi", params)
        assert not (await stream.__anext__()).finished
        ray.kill(victim.actor_ref.actor)  # the process dies as on a crash; nobody tells ember
        with pytest.raises(InstanceLostError):
            async for _ in stream:
                pass
        assert victim.in_flight == 0
        await replaced_and_serving(controller, "k", victim)

    run(tmp_path, cluster, body)


async def replaced_and_serving(controller: Controller, name: str, victim: InstanceHandle) -> None:
    """Wait until `victim`, lost, has failed and its replacement serves."""

    def replaced() -> bool:
        ready = controller.ready_instances(name)
        return len(ready) == 1 and ready[0].instance_id != victim.instance_id

    await until(controller, replaced, timeout_s=START_TIMEOUT_S)
    [status] = [s for s in controller.status() if s.spec.name == name]
    failed = [i for i in status.instances if i.state is InstanceState.FAILED]
    assert [i.instance_id for i in failed] == [victim.instance_id]
    assert failed[0].error == "instance lost (its actor, node or engine failed)"
    [fresh] = controller.ready_instances(name)
    deltas = await collect(fresh, "after", "hi", SamplingParams(max_tokens=3))
    assert sum(len(d.new_token_ids) for d in deltas) == 3


def test_an_instance_whose_engine_fails_is_replaced_and_its_requests_hear_it_was_lost(
    tmp_path: Path, cluster: RayCluster, model: Path
) -> None:
    """A tensor-parallel rank process dies (killed, as the kernel's OOM killer would): the
    actor lives on, but the engine's next step fails. Its requests end with InstanceLostError
    (so the router resumes them elsewhere) instead of the raw error, and the instance, which
    would answer every later request with that error, is replaced."""

    async def body(controller: Controller, clock: FakeClock) -> None:
        controller.deploy(DeploymentSpec("rk", str(model), min_instances=1, tp=2))
        await controller.wait_for_instance("rk", START_TIMEOUT_S)
        [victim] = controller.ready_instances("rk")
        actor_pid = (await victim.stats())["pid"]
        params = SamplingParams(max_tokens=1500, ignore_eos=True)
        stream = victim.generate("doomed", "hi", params)
        assert not (await stream.__anext__()).finished
        ranks = [
            p for p in psutil.Process(actor_pid).children(recursive=True)
            if "spawn_main" in " ".join(p.cmdline())
        ]  # fmt: skip
        assert len(ranks) == 1, ranks
        ranks[0].kill()
        with pytest.raises(InstanceLostError, match="engine failed"):
            async for _ in stream:
                pass
        assert victim.lost and psutil.pid_exists(actor_pid)  # the actor itself is alive
        await replaced_and_serving(controller, "rk", victim)
        controller.delete("rk")
        await until(controller, lambda: cluster.actor_names() == [])

    run(tmp_path, cluster, body)


def test_bad_source_fails_the_start_and_waiters_hear_why(
    tmp_path: Path, cluster: RayCluster
) -> None:
    empty = tmp_path / "not-a-model"
    empty.mkdir()

    async def body(controller: Controller, clock: FakeClock) -> None:
        controller.deploy(DeploymentSpec("bad", str(empty)))
        controller.wake("bad")
        with pytest.raises(DeploymentError, match="neither an ember checkpoint"):
            await controller.wait_for_instance("bad", START_TIMEOUT_S)
        [status] = controller.status()
        assert [i.state for i in status.instances] == [InstanceState.FAILED]
        await until(controller, lambda: cluster.actor_names() == [])

    run(tmp_path, cluster, body)


def test_reconcile_loop_survives_a_failing_load_source(
    tmp_path: Path, cluster: RayCluster, model: Path
) -> None:
    calls = 0

    def broken(name: str) -> tuple[int, int]:
        nonlocal calls
        calls += 1
        raise RuntimeError("router bug")

    async def body(controller: Controller, clock: FakeClock) -> None:
        controller.set_load_source(broken)
        controller.deploy(DeploymentSpec("s", str(model)))
        await asyncio.sleep(0.5)
        assert calls >= 3  # the loop kept ticking through the errors
        controller.set_load_source(lambda name: (0, 0))
        await controller.reconcile_once()
        assert controller.status()[0].desired == 0

    run(tmp_path, cluster, body)


def test_private_ray_listens_only_on_loopback(
    tmp_path: Path, cluster: RayCluster, model: Path
) -> None:
    async def body(controller: Controller, clock: FakeClock) -> None:
        controller.deploy(DeploymentSpec("l", str(model), min_instances=1))
        await controller.wait_for_instance("l", START_TIMEOUT_S)
        ours = {os.getpid()} | {p.pid for p in psutil.Process().children(recursive=True)}
        listening = [
            c
            for c in psutil.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.pid in ours
        ]
        assert len(listening) >= 3  # GCS, raylet, workers: the check saw Ray's sockets
        exposed = [c.laddr for c in listening if not _loopback(c.laddr.ip)]
        assert exposed == []

    run(tmp_path, cluster, body)


def _loopback(ip: str) -> bool:
    return (
        ip.startswith("127.") or ip in ("::1", "::ffff:127.0.0.1") or ip.startswith("::ffff:127.")
    )


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
