"""Node store actors and pre-started workers on a two-node local Ray cluster (127.0.0.1), with
checkpoints in a real S3-compatible server: each node fetches only what it serves, a pooled
worker loads from its node's DRAM tier and serves the same tokens as a local engine, an
instance's pin on its checkpoint goes away when its process does, and a node fetches a
checkpoint another node holds from that node."""

from __future__ import annotations

import asyncio
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from s3_support import moto_server, remote_config

from ember import LLM, SamplingParams
from ember.controller.types import DeploymentSpec, StreamDelta
from ember.store import convert
from ember.store.node_store import NodeStoreConfig
from ember.store.remote import RemoteStore, parse_s3_url

pytestmark = [pytest.mark.ray, pytest.mark.s3, pytest.mark.timeout(400)]

PROMPT = [1, 5, 9, 13, 17]
PARAMS = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def world(
    model_factory: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    import ray
    from ray.cluster_utils import Cluster

    from ember.cluster.node_store_actor import start_node_store
    from ember.cluster.worker_pool import WorkerPool

    root = tmp_path_factory.mktemp("ns-ray")
    shm = Path("/dev/shm") / f"ember-test-ray-{uuid.uuid4().hex[:8]}"
    with moto_server() as endpoint:
        remote = RemoteStore(remote_config(endpoint))
        remote.ensure_bucket("models")
        hf = {n: model_factory("llama", "tiny", "fp32", seed=s) for n, s in (("a", 10), ("b", 11))}
        urls, checkpoints = {}, {}
        for name, folder in hf.items():
            urls[name] = f"s3://models/{name}"
            checkpoints[name] = convert(folder, root / name, progress=False)
            remote.upload_checkpoint(checkpoints[name], parse_s3_url(urls[name]))
        common = {"num_cpus": 1, "node_ip_address": "127.0.0.1"}
        cluster = Cluster(
            initialize_head=True, head_node_args={**common, "include_dashboard": False}
        )
        cluster.add_node(**common)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, namespace="ember")
        pool: WorkerPool | None = None
        try:
            nodes = sorted(n["NodeID"] for n in ray.nodes() if n["Alive"])
            stores = {}
            for i, node in enumerate(nodes):
                cfg = NodeStoreConfig(
                    dram_dir=str(shm / f"n{i}"), ssd_dir=str(root / f"ssd{i}"),
                    chunk_bytes=4 << 20, fetch_threads=2, remote=remote_config(endpoint),
                )  # fmt: skip
                stores[node] = start_node_store(node, cfg)
            pool = WorkerPool(1, str(root / "cache"), env={"OMP_NUM_THREADS": "1"})
            pool.sync(nodes)
            yield {
                "nodes": nodes, "stores": stores, "pool": pool, "urls": urls, "hf": hf,
                "checkpoints": checkpoints,
            }  # fmt: skip
        finally:
            if pool is not None:
                pool.shutdown()
            ray.shutdown()
            cluster.shutdown()
            shutil.rmtree(shm, ignore_errors=True)


async def first_tokens(actor: Any, spec: DeploymentSpec) -> tuple[list[int], Any]:
    await actor.assign.remote(spec, f"test-{spec.name}")
    ready = await actor.start.remote()
    tokens: list[int] = []
    gen = actor.generate.options(num_returns="streaming").remote("r1", PROMPT, PARAMS)
    async for ref in gen:
        delta = await ref
        assert isinstance(delta, StreamDelta), delta
        tokens += delta.new_token_ids
        if delta.finished:
            break
    return tokens, ready


def test_each_node_fetches_only_what_it_serves_and_pins_while_in_use(
    world: dict[str, Any],
) -> None:
    import ray

    nodes, stores, pool, urls = world["nodes"], world["stores"], world["pool"], world["urls"]
    served = {}
    actors = {}
    for node, name in zip(nodes, ("a", "b"), strict=True):
        ref = pool.take(node, refill=False)
        assert ref is not None
        spec = DeploymentSpec(name=name, source=urls[name], max_model_len=64, max_num_seqs=2)
        tokens, ready = asyncio.run(first_tokens(ref.actor, spec))
        assert ready.node_id == node
        assert "/dev/shm/" in ready.checkpoint_path
        served[name], actors[name] = tokens, ref.actor
    for name in ("a", "b"):
        llm = LLM(str(world["hf"][name]), max_model_len=64)
        assert served[name] == llm.generate(PROMPT, PARAMS)[0].token_ids
        llm.close()
    for node, name in zip(nodes, ("a", "b"), strict=True):
        rows = ray.get(stores[node].status.remote())
        assert sorted((r.tier, r.key, r.pins) for r in rows) == [
            ("dram", urls[name], 1), ("ssd", urls[name], 0),
        ]  # fmt: skip
    ray.kill(actors["a"], no_restart=True)
    deadline = time.monotonic() + 30
    while True:
        rows = ray.get(stores[nodes[0]].status.remote())
        if [r.pins for r in rows if r.tier == "dram"] == [0]:
            break
        assert time.monotonic() < deadline, rows
        time.sleep(0.2)
    assert ray.get(stores[nodes[0]].evict.remote(urls["a"], "dram"))
    ray.kill(actors["b"], no_restart=True)


def test_a_node_fetches_a_checkpoint_another_node_holds_from_that_node(
    world: dict[str, Any],
) -> None:
    """Node 1's store asks the other stores over Ray, and node 0 (which fetched "a" from S3 in
    the test above, its DRAM copy since evicted: its SSD copy remains) streams it over its peer
    server: node 1 gets the same bytes without reading them from the remote store."""
    import ray

    from ember.store import load
    from ember.store.node_store import checkpoint_key

    nodes, stores, urls = world["nodes"], world["stores"], world["urls"]
    key = checkpoint_key(urls["a"])
    offer = ray.get(stores[nodes[0]].peer_offer.remote(key))
    assert offer is not None and offer.host == "127.0.0.1" and offer.tier == "ssd"
    assert ray.get(stores[nodes[1]].peer_offer.remote(key)) is None  # node 1 has none yet
    report = ray.get(stores[nodes[1]].ensure.remote(urls["a"]))
    assert report.served_from == "peer"
    want = load(world["checkpoints"]["a"])
    got = load(report.path)
    assert set(got) == set(want) and all(got[n].equal(want[n]) for n in want)
    # An instance's start on node 0 (streaming acquire, as a pooled worker does) of "b",
    # which node 1 holds in DRAM: reported as coming from the peer.
    pid = os.getpid()
    report = ray.get(stores[nodes[0]].acquire.remote(urls["b"], pid, True))
    assert report.served_from == "peer", report
    ray.get(stores[nodes[0]].release.remote(urls["b"], pid))
