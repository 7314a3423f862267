"""A model updated in place: deploying the same spec again after its source's contents changed
replaces the running instances (they hold the old weights); deploying it again unchanged does
not. Over serving_support's in-process cluster with real engines on a tiny factory model."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from serving_support import LocalCluster, serving

from ember import LLM, SamplingParams
from ember.controller.controller import Controller
from ember.controller.types import DeploymentSpec, InstanceState, NodeInfo

PARAMS = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
PROMPT = [5, 6, 7, 8]


def test_a_source_changed_in_place_replaces_the_instances_on_the_next_deploy(
    tmp_path: Path, model_factory: Callable[..., Path]
) -> None:
    v1, v2 = (model_factory("llama", "tiny", "fp32", seed=s) for s in (31, 32))
    folder = tmp_path / "model"
    shutil.copytree(v1, folder)
    want = {
        v: LLM(str(v), max_model_len=64).generate(PROMPT, PARAMS)[0].token_ids for v in (v1, v2)
    }
    assert want[v1] != want[v2]
    spec = DeploymentSpec("m", str(folder), min_instances=1, max_model_len=64)

    async def main() -> None:
        async with serving(tmp_path) as stack:
            c = stack.controller

            async def ready() -> tuple[str, list[int]]:
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 60
                while True:
                    insts = [i for s in c.status() for i in s.instances]
                    if [i.state for i in insts] == [InstanceState.READY]:
                        break
                    assert loop.time() < deadline, insts
                    await asyncio.sleep(0.05)
                [handle] = c.ready_instances("m")
                got = [
                    t async for d in handle.generate("r", PROMPT, PARAMS) for t in d.new_token_ids
                ]
                return handle.instance_id, got

            c.deploy(spec)
            first, tokens = await ready()
            assert tokens == want[v1]
            c.deploy(spec)  # unchanged: the instance stays
            assert await ready() == (first, want[v1])
            for f in v2.iterdir():  # new weights saved into the same folder
                shutil.copy2(f, folder / f.name)
            c.deploy(spec)  # the same spec, new contents
            await asyncio.sleep(0.1)
            second, tokens = await ready()
            assert second != first and tokens == want[v2]

    asyncio.run(main())


def test_an_update_rolls_instances_over_with_every_request_served(
    tmp_path: Path, model_factory: Callable[..., Path]
) -> None:
    """A new source (or engine change) is a new revision: the old instance keeps serving until
    its replacement is ready, then retires, so requests sent throughout are all answered, first
    by v1, then by v2. A revision that cannot start (a truncated weights file) leaves the
    running one serving, with the reason in status."""
    v1, v2 = (model_factory("llama", "tiny", "fp32", seed=s) for s in (33, 34))
    broken = tmp_path / "broken"
    shutil.copytree(v1, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    want = {LLM(str(v), max_model_len=64).generate(PROMPT, PARAMS)[0].text: v for v in (v1, v2)}
    assert len(want) == 2
    body = {"model": "m", "prompt": PROMPT, "max_tokens": 6, "temperature": 0}

    def spec(source: Path) -> DeploymentSpec:
        # Room to grow: an update must not leave the deployment larger than it was.
        return DeploymentSpec("m", str(source), min_instances=1, max_instances=3, max_model_len=64)

    async def main() -> None:
        async with serving(tmp_path) as stack:
            c = stack.controller

            async def served_by() -> Path:
                resp = await stack.client.post("/v1/completions", json=body)
                assert resp.status_code == 200, resp.text
                return want[resp.json()["choices"][0]["text"]]

            def states() -> list[tuple[int, InstanceState]]:
                return sorted(
                    (i.revision, i.state) for s in c.status() for i in s.instances
                    if i.state is not InstanceState.FAILED  # status keeps the last few
                )  # fmt: skip

            async def until(pred: Callable[[], bool]) -> None:
                loop = asyncio.get_running_loop()
                deadline = loop.time() + 60
                while not pred():
                    assert loop.time() < deadline, states()
                    await asyncio.sleep(0.05)

            c.deploy(spec(v1))
            assert await served_by() == v1
            [old] = c.ready_instances("m")
            c.deploy(spec(broken))  # revision 1 fails to start; revision 0 keeps serving
            await until(lambda: c.status()[0].last_error is not None)
            assert "model.safetensors" in str(c.status()[0].last_error)
            assert c.ready_instances("m") == [old] and await served_by() == v1
            c.deploy(spec(v2))  # revision 2
            assert c.ready_instances("m") == [old]  # no gap: the old one serves meanwhile
            seen = []
            while len(seen) < 3 or seen[-1] != v2:
                seen.append(await served_by())
                assert len(seen) < 2000, "the new revision never took over"
            assert seen[0] == v1 and seen[-1] == v2
            await until(lambda: states() == [(2, InstanceState.READY)])
            assert old.instance_id in stack.cluster.stopped
            assert (c.status()[0].revision, c.status()[0].last_error) == (2, None)

    asyncio.run(main())


class OneGpu(LocalCluster):
    """One node with one GPU that an instance holds from launch until it stops: a second
    instance waits for it, as Ray queues an actor until its GPU is free."""

    def nodes(self) -> list[NodeInfo]:
        [n] = super().nodes()
        return [NodeInfo(n.node_id, n.address, True, (), 8.0, 8.0, 1.0, 1.0 - len(self.handles))]

    def instance_gpus(self, spec: DeploymentSpec) -> float:
        return 1.0

    async def wait_started(self, handle: Any, timeout_s: float) -> Any:
        while next(iter(self.handles.values())) is not handle:  # the GPU is someone else's
            await asyncio.sleep(0.02)
        return await super().wait_started(handle, timeout_s)


def test_an_update_on_a_full_gpu_node_retires_the_old_instance_first(
    tmp_path: Path, model_factory: Callable[..., Path]
) -> None:
    """No room for old and new side by side (the only GPU is taken): the old instance goes
    first, then the new one starts; without counting GPUs the update would wait forever."""
    v1, v2 = (model_factory("llama", "tiny", "fp32", seed=s) for s in (35, 36))
    want = LLM(str(v2), max_model_len=64).generate(PROMPT, PARAMS)[0].token_ids

    async def main() -> None:
        cluster = OneGpu(tmp_path / "cache")
        c = Controller(cluster, tmp_path / "e.db", reconcile_interval_s=0.05)
        await c.start()
        try:
            c.deploy(DeploymentSpec("m", str(v1), min_instances=1, max_model_len=64))
            await c.wait_for_instance("m", 60)
            [old] = c.ready_instances("m")
            c.deploy(DeploymentSpec("m", str(v2), min_instances=1, max_model_len=64))
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60
            while [h.instance_id for h in c.ready_instances("m")] in ([], [old.instance_id]):
                assert loop.time() < deadline, c.status()
                await asyncio.sleep(0.05)
            [new] = c.ready_instances("m")
            assert old.instance_id in cluster.stopped
            got = [t async for d in new.generate("r", PROMPT, PARAMS) for t in d.new_token_ids]
            assert got == want
        finally:
            await c.stop()

    asyncio.run(main())


def test_an_idle_deployment_keeps_its_size_through_an_update(
    tmp_path: Path, model_factory: Callable[..., Path]
) -> None:
    """No load: the autoscaler keeps the current size through keep-alive. During the roll the
    new instance and the old one it replaces are one replica, not two."""
    model = model_factory("llama", "tiny", "fp32", seed=37)

    async def main() -> None:
        async with serving(tmp_path) as stack:
            c = stack.controller
            spec = DeploymentSpec("m", str(model), min_instances=1, max_instances=3)
            c.deploy(spec)
            await c.wait_for_instance("m", 60)
            [old] = c.ready_instances("m")
            c.deploy(replace(spec, max_num_seqs=8))
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60
            while [h.instance_id for h in c.ready_instances("m")] in ([], [old.instance_id]):
                assert loop.time() < deadline, c.status()
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)  # ten more reconcile passes
            live = [
                i for i in c.status()[0].instances
                if i.state not in (InstanceState.FAILED, InstanceState.STOPPED)
            ]  # fmt: skip
            assert [(i.revision, i.state) for i in live] == [(1, InstanceState.READY)]
            assert c.status()[0].desired == 1

    asyncio.run(main())
