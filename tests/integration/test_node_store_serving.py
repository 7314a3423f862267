"""The node store inside serving: the controller deploys `s3://` models on a private Ray whose
node runs a store actor and a pool of one pre-started worker (moto S3 server on 127.0.0.1).
The instance comes from the pool, loads from the DRAM tier (zero copy) and serves the same
greedy tokens as a local engine; status shows the checkpoint's tiers and pin; deleting the
deployment unpins it and leaves no instance behind; evict and prefetch move it between tiers."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from s3_support import CREDENTIALS, moto_server, remote_config

from ember import LLM, SamplingParams
from ember.cli.status import render
from ember.cluster.cluster import ClusterConfig, RayCluster
from ember.cluster.worker_pool import POOL_PREFIX
from ember.controller.controller import Controller
from ember.controller.types import DeploymentSpec
from ember.errors import StoreCapacityError
from ember.policy.clock import FakeClock
from ember.store import convert
from ember.store.remote import RemoteStore, parse_s3_url

pytestmark = [pytest.mark.ray, pytest.mark.s3, pytest.mark.timeout(300)]

URL = "s3://served/tiny"
PARAMS = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def served(
    model_factory: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[RayCluster, Path]]:
    hf = model_factory("llama", "tiny", "fp32", seed=21)
    root = tmp_path_factory.mktemp("ns-serving")
    shm = Path("/dev/shm") / f"ember-test-serving-{uuid.uuid4().hex[:8]}"
    env = {
        "EMBER_WORKER_POOL_SIZE": "1",
        "EMBER_DRAM_DIR": str(shm),
        "EMBER_SSD_DIR": str(root / "ssd"),
        "EMBER_RATE_MIN_BYTES": "1",  # count the tiny model's fetches in the measured rates
        "AWS_ACCESS_KEY_ID": CREDENTIALS["access_key_id"],
        "AWS_SECRET_ACCESS_KEY": CREDENTIALS["secret_access_key"],
    }
    with moto_server() as endpoint, pytest.MonkeyPatch.context() as mp:
        for k, v in {**env, "EMBER_S3_ENDPOINT_URL": endpoint}.items():
            mp.setenv(k, v)
        remote = RemoteStore(remote_config(endpoint))
        remote.ensure_bucket("served")
        remote.upload_checkpoint(convert(hf, root / "ck", progress=False), parse_s3_url(URL))
        cluster = RayCluster(ClusterConfig(num_cpus=4, cache_dir=str(root / "cache")))
        try:
            yield cluster, hf
        finally:
            cluster.shutdown()
            shutil.rmtree(shm, ignore_errors=True)


@contextlib.asynccontextmanager
async def running(cluster: RayCluster, db: Path, **kw: Any) -> AsyncIterator[Controller]:
    """A started controller over `cluster` (its state in `db`), stopped on the way out."""
    controller = Controller(cluster, db, FakeClock(1000.0), reconcile_interval_s=0.05, **kw)
    await controller.start()
    try:
        yield controller
    finally:
        await controller.stop()


def test_s3_deployment_wakes_in_a_pooled_worker_from_the_dram_tier(
    tmp_path: Path, served: tuple[RayCluster, Path]
) -> None:
    cluster, hf = served
    want = LLM(str(hf), max_model_len=64).generate([3, 1, 4, 1, 5], PARAMS)[0].token_ids

    import ray

    async def body() -> None:
        async with running(cluster, tmp_path / "ember.db", probe_interval_s=0.5) as controller:
            loop = asyncio.get_running_loop()
            # The controller's start brought up the node's store and its pool of one, before
            # any deployment or request (the first request finds a warm worker).
            deadline = loop.time() + 60
            while not [
                a for a in ray.util.list_named_actors(all_namespaces=True)
                if a["name"].startswith(POOL_PREFIX)
            ]:  # fmt: skip
                assert loop.time() < deadline
                await asyncio.sleep(0.1)
            controller.deploy(
                DeploymentSpec("s3m", URL, min_instances=1, max_model_len=64, prefetch="none")
            )
            await controller.wait_for_instance("s3m", 120.0)
            [handle] = controller.ready_instances("s3m")
            assert [n for n in cluster.actor_names() if n.startswith(POOL_PREFIX)] != []
            [status] = controller.status()
            assert [i.tier for i in status.instances] == ["remote"]  # S3 -> SSD -> DRAM
            tokens = [
                t async for d in handle.generate("r", [3, 1, 4, 1, 5], PARAMS)
                for t in d.new_token_ids
            ]  # fmt: skip
            assert tokens == want
            [(node, rows)] = (await controller.checkpoints()).items()
            assert sorted((r["tier"], r["key"], r["pins"]) for r in rows) == [
                ("dram", URL, 1), ("ssd", URL, 0),
            ]  # fmt: skip
            text = render({"deployments": [], "checkpoints": {node: rows}})
            assert f"{node[:12]}" in text and "dram" in text and URL in text
            # The fetch measured the node's S3 link; placement reads it at the next refresh.
            while not controller.rates().get(node, {}).get("remote"):
                assert loop.time() < deadline, controller.rates()
                await asyncio.sleep(0.1)
            with pytest.raises(StoreCapacityError, match="in use in dram"):
                await controller.evict("s3m", "dram")  # the instance maps that copy
            controller.delete("s3m")
            deadline = loop.time() + 60
            while cluster.actor_names() or any(
                r["pins"] for r in (await controller.checkpoints())[node]
            ):
                assert loop.time() < deadline, cluster.actor_names()
                await controller.reconcile_once()
                await asyncio.sleep(0.1)
            # Deleted and unpinned: the DRAM copy is freed, the SSD copy stays.
            while {r["tier"] for r in (await controller.checkpoints())[node]} != {"ssd"}:
                assert loop.time() < deadline
                await asyncio.sleep(0.1)
            # `ember prefetch|evict` (a deployment of the checkpoint with no instance).
            controller.deploy(DeploymentSpec("idle", URL, prefetch="none"))
            assert controller.prefetch("idle", "dram", node[:12]) == node
            while {r["tier"] for r in (await controller.checkpoints())[node]} != {"ssd", "dram"}:
                assert loop.time() < deadline
                await asyncio.sleep(0.1)
            assert await controller.evict("idle", "dram") == [node]
            assert {r["tier"] for r in (await controller.checkpoints())[node]} == {"ssd"}

    asyncio.run(body())


def test_a_new_deployment_is_prefetched_to_ssd_and_wakes_from_there(
    tmp_path: Path, served: tuple[RayCluster, Path]
) -> None:
    """`ember deploy` of an s3:// model with no instance: the controller has one node's store
    fetch it to SSD at once, so the first request's instance reads SSD, not S3."""
    cluster, hf = served
    url = "s3://served/prefetched"
    remote = RemoteStore(remote_config(os.environ["EMBER_S3_ENDPOINT_URL"]))
    remote.upload_checkpoint(convert(hf, tmp_path / "ck", progress=False), parse_s3_url(url))
    want = LLM(str(hf), max_model_len=64).generate([2, 7, 1, 8], PARAMS)[0].token_ids

    async def body() -> None:
        async with running(cluster, tmp_path / "ember.db", probe_interval_s=0.1) as controller:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60

            async def tiers() -> set[str]:
                rows = (await controller.checkpoints()).get(node, [])
                return {r["tier"] for r in rows if r["key"] == url}

            [node] = [n.node_id for n in cluster.nodes() if n.alive]
            controller.deploy(DeploymentSpec("pre", url, max_model_len=64))  # min_instances 0
            while await tiers() != {"ssd"}:  # on SSD only: the prefetch tier
                assert loop.time() < deadline
                await asyncio.sleep(0.1)
            assert controller.ready_instances("pre") == []
            assert [s.cached_on for s in controller.status()] == [(node,)]
            controller.wake("pre")  # a request came
            await controller.wait_for_instance("pre", 120.0)
            [status] = controller.status()
            assert [i.tier for i in status.instances] == ["ssd"]
            [handle] = controller.ready_instances("pre")
            tokens = [
                t async for d in handle.generate("r", [2, 7, 1, 8], PARAMS)
                for t in d.new_token_ids
            ]  # fmt: skip
            assert tokens == want
            controller.delete("pre")
            while cluster.actor_names():
                assert loop.time() < deadline, cluster.actor_names()
                await controller.reconcile_once()
                await asyncio.sleep(0.1)

    asyncio.run(body())


def test_the_pool_refills_after_a_start_and_serves_two_starts_at_once(
    tmp_path: Path, served: tuple[RayCluster, Path]
) -> None:
    """The replacement a start owes the pool begins only REFILL_DELAY_S after that start has
    ended (its imports would compete with the first requests); two instances starting together
    on the node both come from the pool (the second takes a replacement started for it at
    once), and the pool is full again after."""
    from ember.cluster.node_services import REFILL_DELAY_S

    cluster, _ = served
    services = cluster.services

    async def body() -> None:
        # The probe (which also tops the pool up) stays out of the way: one per minute.
        async with running(cluster, tmp_path / "ember.db", probe_interval_s=60.0) as controller:
            loop = asyncio.get_running_loop()
            [node] = [n.node_id for n in cluster.nodes() if n.alive]
            deadline = loop.time() + 200

            async def until(pred: Callable[[], bool]) -> None:
                while not pred():
                    assert loop.time() < deadline, (services.idle(), cluster.actor_names())
                    await controller.reconcile_once()
                    await asyncio.sleep(0.05)

            def pooled() -> list[str]:
                return [n for n in cluster.actor_names() if n.startswith(POOL_PREFIX)]

            await until(lambda: services.idle().get(node) == 1)
            spec = DeploymentSpec("one", URL, min_instances=1, max_model_len=64, prefetch="none")
            controller.deploy(spec)
            await controller.wait_for_instance("one", 120.0)
            t_ready = loop.time()
            assert len(pooled()) == 1
            assert services.idle()[node] == 0  # not yet: the instance's first requests run
            await asyncio.sleep(max(0.0, t_ready + REFILL_DELAY_S + 0.5 - loop.time()))
            assert services.idle()[node] == 1
            controller.delete("one")
            await until(lambda: not cluster.actor_names())
            controller.deploy(replace(spec, name="two", min_instances=2, max_instances=2))
            await until(lambda: len(controller.ready_instances("two")) == 2)
            assert len(pooled()) == 2, cluster.actor_names()  # both from the pool
            await until(lambda: services.idle()[node] == 1)  # and it fills up again
            controller.delete("two")
            await until(lambda: not cluster.actor_names())

    asyncio.run(body())


def test_deploying_an_s3_source_that_holds_no_checkpoint_is_refused_naming_it(
    tmp_path: Path, served: tuple[RayCluster, Path]
) -> None:
    """A wrong bucket, prefix or object fails at `ember deploy` (HTTP 400 naming `source` and
    the object), not at the first request; nothing is deployed."""
    import httpx

    from ember.api.app import create_app
    from ember.api.config import ApiConfig

    cluster, _ = served
    remote = RemoteStore(remote_config(os.environ["EMBER_S3_ENDPOINT_URL"]))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "index.json").write_text('{"format": "something-else"}')
    remote.upload_checkpoint(bad, parse_s3_url("s3://served/not-ember"))

    async def body() -> None:
        async with running(cluster, tmp_path / "ember.db") as controller:
            app = create_app(controller, ApiConfig())
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
                for source, what in [
                    ("s3://served/nope", "s3://served/nope/index.json: no such object"),
                    ("s3://no-such-bucket/m", "s3://no-such-bucket/m/index.json: no such"),
                    ("s3://served/not-ember", "not-ember/index.json: not an ember-checkpoint"),
                ]:
                    r = await http.post("/admin/deployments", json={"name": "x", "source": source})
                    assert r.status_code == 400, r.text
                    err = r.json()["error"]
                    assert err["param"] == "source" and what in err["message"], err
                assert controller.list_deployments() == []
                r = await http.post("/admin/deployments", json={"name": "ok", "source": URL})
                assert r.status_code == 201, r.text

    asyncio.run(body())


def test_a_crashed_node_store_comes_back_with_its_checkpoints_and_pins(
    tmp_path: Path, served: tuple[RayCluster, Path]
) -> None:
    """The store actor dies (OOM killer, a bug) while an instance maps its DRAM copy: Ray
    restarts it on its node, it claims its slot again, finds the checkpoint in DRAM and on SSD,
    pins the copy the running instance maps again (from /proc/<pid>/maps), and the next
    instance loads from DRAM with nothing fetched; the pins go when the instances do."""
    import ray

    from ember.cluster.node_store_actor import node_store_handle

    cluster, hf = served
    [node] = [n.node_id for n in cluster.nodes() if n.alive]
    store = node_store_handle(node)
    assert store is not None
    want = LLM(str(hf), max_model_len=64).generate([1, 2, 3], PARAMS)[0].token_ids

    def pid() -> int:
        return int(ray.get(store.__ray_call__.remote(lambda _: os.getpid()), timeout=10))

    def dram_pins() -> int | None:
        rows = ray.get(store.status.remote(), timeout=10)
        return next((r.pins for r in rows if r.key == URL and r.tier == "dram"), None)

    async def tokens(controller: Controller, name: str) -> list[int]:
        [handle] = controller.ready_instances(name)
        return [t async for d in handle.generate("r", [1, 2, 3], PARAMS) for t in d.new_token_ids]

    async def body() -> None:
        async with running(cluster, tmp_path / "ember.db") as controller:
            loop = asyncio.get_running_loop()
            ray.get(store.ensure.remote(URL, "dram"), timeout=60)  # in DRAM before the start
            controller.deploy(DeploymentSpec("one", URL, min_instances=1, max_model_len=64))
            await controller.wait_for_instance("one", 120.0)
            assert dram_pins() == 1
            old_pid = pid()
            ray.kill(store, no_restart=False)  # a crash: Ray restarts it (max_restarts=-1)
            deadline = loop.time() + 60
            while True:  # until the restarted actor answers
                try:
                    if pid() != old_pid:
                        break
                except (
                    ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError,
                    ray.exceptions.GetTimeoutError,
                ):  # fmt: skip
                    pass
                assert loop.time() < deadline
                await asyncio.sleep(0.2)
            assert dram_pins() == 1  # the running instance's pin, adopted by the new store
            rows = ray.get(store.status.remote(), timeout=10)
            assert {r.tier for r in rows if r.key == URL} == {"dram", "ssd"}
            assert await tokens(controller, "one") == want  # it kept serving
            controller.deploy(DeploymentSpec("two", URL, min_instances=1, max_model_len=64))
            await controller.wait_for_instance("two", 120.0)
            two = next(s for s in controller.status() if s.spec.name == "two")
            assert [i.tier for i in two.instances] == ["dram"]
            assert await tokens(controller, "two") == want
            assert dram_pins() == 2
        deadline = time.monotonic() + 60
        while dram_pins():  # both instances' processes exited: their pins were released
            assert time.monotonic() < deadline
            await asyncio.sleep(0.2)

    asyncio.run(body())


def test_a_model_pushed_again_rolls_out_on_the_next_deploy(
    tmp_path: Path, served: tuple[RayCluster, Path], model_factory: Callable[..., Path]
) -> None:
    """`ember push` of a new version to the same prefix, then `ember deploy` of the same spec:
    the instance running the old weights keeps serving while the new one fetches the new
    version beside it (the node's copies of the old one are stale, retired while mapped) and
    serves its tokens; then the old one retires."""
    import httpx

    from ember.api.app import create_app
    from ember.api.config import ApiConfig

    cluster, _ = served
    v1, v2 = (model_factory("llama", "tiny", "fp32", seed=s) for s in (41, 42))
    want = {
        v: LLM(str(v), max_model_len=64).generate([4, 5, 6], PARAMS)[0].token_ids for v in (v1, v2)
    }
    assert want[v1] != want[v2]
    url = "s3://served/rolled"
    remote = RemoteStore(remote_config(os.environ["EMBER_S3_ENDPOINT_URL"]))
    remote.upload_checkpoint(convert(v1, tmp_path / "ck1", progress=False), parse_s3_url(url))

    async def body() -> None:
        async with running(cluster, tmp_path / "ember.db") as controller:
            app = create_app(controller, ApiConfig())
            spec = {"name": "rolled", "source": url, "min_instances": 1, "max_model_len": 64}
            loop = asyncio.get_running_loop()

            async def serving_tokens(not_id: str | None = None) -> tuple[str, list[int]]:
                deadline = loop.time() + 120
                while True:
                    handles = [
                        h for h in controller.ready_instances("rolled") if h.instance_id != not_id
                    ]
                    if handles:
                        break
                    assert loop.time() < deadline, controller.status()
                    await asyncio.sleep(0.1)
                [h] = handles
                return h.instance_id, [
                    t async for d in h.generate("r", [4, 5, 6], PARAMS) for t in d.new_token_ids
                ]

            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
                assert (await http.post("/admin/deployments", json=spec)).status_code == 201
                first, tokens = await serving_tokens()
                assert tokens == want[v1]
                remote.upload_checkpoint(
                    convert(v2, tmp_path / "ck2", progress=False), parse_s3_url(url)
                )
                assert (await http.post("/admin/deployments", json=spec)).status_code == 200
                # A rolling update: the old instance serves (v1) until the new one is ready.
                assert [h.instance_id for h in controller.ready_instances("rolled")] == [first]
                second, tokens = await serving_tokens(not_id=first)
                assert tokens == want[v2]  # the store fetched v2 beside the mapped v1 copy
                # The pooled worker was handed the DRAM copy (v1) unchecked, built its engine,
                # learnt it was stale and fetched v2 from S3.
                [status] = controller.status()
                assert [i.tier for i in status.instances if i.instance_id == second] == ["remote"]
                deadline = loop.time() + 60
                while [h.instance_id for h in controller.ready_instances("rolled")] != [second]:
                    assert loop.time() < deadline, controller.status()
                    await asyncio.sleep(0.1)

                async def dram_pins() -> list[int]:
                    rows = [r for rs in (await controller.checkpoints()).values() for r in rs]
                    return [r["pins"] for r in rows if r["key"] == url and r["tier"] == "dram"]

                while await dram_pins() != [1]:  # the new copy, pinned by the new instance
                    assert loop.time() < deadline, await dram_pins()
                    await asyncio.sleep(0.1)

    asyncio.run(body())


def test_a_restarted_cluster_finds_the_checkpoint_still_in_dram_and_on_ssd(
    tmp_path: Path, served: tuple[RayCluster, Path]
) -> None:
    """What `ember serve` run again does: a new private Ray (a new node id) on the same
    machine. Its store claims the slot the first one held and finds the checkpoint in DRAM and
    on SSD, with nothing fetched. Before slots, each node id had tier directories of its own:
    the DRAM copy stayed behind in /dev/shm with no store to use or free it."""
    cluster, _ = served

    async def tiers(c: RayCluster) -> tuple[str, list[tuple[str, str]]]:
        while not (answer := await c.checkpoints()):  # the store actor is still starting
            await asyncio.sleep(0.05)
        [(node, rows)] = answer.items()
        return node, sorted((r["tier"], r["key"]) for r in rows if r["key"] == URL)

    [node] = [n.node_id for n in cluster.nodes() if n.alive]
    cluster.services.prefetch(URL, node, "dram")
    deadline = time.monotonic() + 60
    while asyncio.run(tiers(cluster))[1] != [("dram", URL), ("ssd", URL)]:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    cluster.shutdown()  # the server stopping: its store actor ends with it
    again = RayCluster(ClusterConfig(num_cpus=4, cache_dir=cluster.config.cache_dir))

    async def body() -> None:
        new_node, rows = await asyncio.wait_for(tiers(again), 60)
        assert new_node != node
        assert rows == [("dram", URL), ("ssd", URL)]
        async with running(again, tmp_path / "ember.db") as controller:
            # and an instance started there loads it from DRAM
            controller.deploy(DeploymentSpec("s3m", URL, min_instances=1, max_model_len=64))
            await controller.wait_for_instance("s3m", 120.0)
            [status] = controller.status()
            assert [i.tier for i in status.instances] == ["dram"]

    try:
        again.nodes()  # starts the new node's store actor
        asyncio.run(body())
    finally:
        again.shutdown()
