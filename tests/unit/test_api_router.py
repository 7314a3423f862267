"""The router over the real controller and real engines (in-process instances, no Ray):
scale from zero, bounded queue, least-loaded choice, aborts, the request journal, and tokens
identical to the in-process engine's."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from serving_support import serving

from ember import LLM, SamplingParams
from ember.controller.types import DeploymentSpec, StreamDelta
from ember.errors import QueueFullError, RequestError
from ember.store.factory import make_model

pytestmark = pytest.mark.anyio

PROMPTS = ["Hello there", "The number of people", "a b c d e f", "What is it?"]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
LONG = SamplingParams(max_tokens=1500, temperature=0.0, ignore_eos=True)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("model") / "tiny", "llama", "tiny", "fp32", seed=0)


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> dict[str, list[int]]:
    llm = LLM(str(model_dir), max_num_seqs=8)
    try:
        outs = llm.generate(PROMPTS, GREEDY)
    finally:
        llm.close()
    return {p: list(o.token_ids) for p, o in zip(PROMPTS, outs, strict=True)}


def _spec(model_dir: Path, **kw: Any) -> DeploymentSpec:
    return DeploymentSpec(name="tiny", source=str(model_dir), **kw)


async def _collect(stream: AsyncIterator[StreamDelta]) -> list[StreamDelta]:
    return [d async for d in stream]


async def _until(cond: Any, timeout_s: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not cond():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


async def test_scale_from_zero_serves_every_waiting_request_with_engine_tokens(
    tmp_path: Path, model_dir: Path, cache_root: Path, reference: dict[str, list[int]]
) -> None:
    async with serving(tmp_path, (_spec(model_dir),), cache_root=cache_root) as s:
        router = s.app.state.router
        assert s.controller.ready_instances("tiny") == []
        results = await asyncio.gather(
            *(_collect(router.generate("tiny", f"r{i}", p, GREEDY)) for i, p in enumerate(PROMPTS))
        )
        for i, (prompt, deltas) in enumerate(zip(PROMPTS, results, strict=True)):
            tokens = [t for d in deltas for t in d.new_token_ids]
            assert tokens == reference[prompt]
            assert deltas[-1].finished and deltas[-1].finish_reason == "length"
            entry = router.journal.get(f"r{i}")
            assert entry.token_ids == tokens and entry.finished
            assert entry.text == "".join(d.new_text for d in deltas)
        assert next(s.cluster.launched) == 1  # four waiting requests woke one instance
        assert router.load("tiny") == (0, 0)
        metrics = (await s.client.get("/metrics")).text
        assert 'ember_cold_starts_total{model="tiny"} 1.0' in metrics


async def test_queue_is_fifo_bounded_and_reported_to_the_controller(
    tmp_path: Path, model_dir: Path, cache_root: Path
) -> None:
    spec = _spec(model_dir, min_instances=1, max_num_seqs=1, max_queue=1)
    async with serving(tmp_path, (spec,), cache_root=cache_root) as s:
        router = s.app.state.router
        await s.controller.wait_for_instance("tiny", 60)
        first = router.generate("tiny", "hold", "Hello there", LONG)
        await anext(first)  # holds the instance's only slot
        assert router.load("tiny") == (0, 1)
        second = asyncio.ensure_future(_collect(router.generate("tiny", "next", "a b", GREEDY)))
        await _until(lambda: router.load("tiny") == (1, 1))
        assert s.controller._load_source("tiny") == (1, 1)  # what the autoscaler reads
        with pytest.raises(QueueFullError, match="max_queue=1"):
            await anext(router.generate("tiny", "third", "x", GREEDY))
        assert not second.done()
        await first.aclose()  # frees the slot: the queued request runs
        deltas = await asyncio.wait_for(second, 60)
        assert deltas[-1].finished
        await router.drain_background()
        assert router.journal.get("hold").finish_reason == "abort"
        assert router.load("tiny") == (0, 0)


async def test_least_loaded_instance_takes_the_next_request(
    tmp_path: Path, model_dir: Path, cache_root: Path
) -> None:
    spec = _spec(model_dir, min_instances=2, max_instances=2)
    async with serving(tmp_path, (spec,), cache_root=cache_root) as s:
        router = s.app.state.router
        await _until(lambda: len(s.controller.ready_instances("tiny")) == 2, 120)
        streams = [router.generate("tiny", f"h{i}", "Hello", LONG) for i in range(4)]
        for st in streams:
            await anext(st)
        placed = [router.journal.get(f"h{i}").instance_id for i in range(4)]
        assert sorted(placed.count(i) for i in set(placed)) == [2, 2]
        for st in streams:
            await st.aclose()
        await router.drain_background()
        assert router.load("tiny") == (0, 0)


async def test_closing_a_stream_aborts_the_request_on_its_instance(
    tmp_path: Path, model_dir: Path, cache_root: Path
) -> None:
    async with serving(tmp_path, (_spec(model_dir, min_instances=1),), cache_root=cache_root) as s:
        router = s.app.state.router
        stream = router.generate("tiny", "gone", "Hello there", LONG)
        got = [await anext(stream), await anext(stream)]
        await stream.aclose()
        await router.drain_background()
        [handle] = s.cluster.handles.values()
        assert "gone" in handle.aborted
        await _until(lambda: handle.runner.stats()["unfinished"] == 0)
        entry = router.journal.get("gone")
        assert entry.finish_reason == "abort"
        assert entry.token_ids[: sum(len(d.new_token_ids) for d in got)] == [
            t for d in got for t in d.new_token_ids
        ]


async def test_engine_request_error_reaches_the_caller(
    tmp_path: Path, model_dir: Path, cache_root: Path
) -> None:
    spec = _spec(model_dir, min_instances=1, max_model_len=64)
    async with serving(tmp_path, (spec,), cache_root=cache_root) as s:
        router = s.app.state.router
        with pytest.raises(RequestError):
            await anext(router.generate("tiny", "big", [5] * 200, GREEDY))
        resp = await s.client.post(
            "/v1/completions", json={"model": "tiny", "prompt": [5] * 200, "max_tokens": 4}
        )
        assert resp.status_code == 400, resp.text
        assert router.load("tiny") == (0, 0)
