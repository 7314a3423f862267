"""The router over the real controller and real engines (in-process instances, no Ray):
scale from zero, bounded queue, least-loaded choice, aborts, the request journal, and tokens
identical to the in-process engine's."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import serving_support
from serving_support import serving

from ember import LLM, SamplingParams
from ember.api.config import ApiConfig
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


async def _two_streams(
    router: Any, greedy: SamplingParams, seeded: SamplingParams
) -> tuple[dict[str, AsyncIterator[StreamDelta]], dict[str, list[StreamDelta]]]:
    """Requests "g" (greedy) and "s" (seeded) streaming from deployment "tiny", each read until
    it has 10 tokens: (the streams, the deltas read)."""
    streams = {
        "g": router.generate("tiny", "g", "Hello there", greedy),
        "s": router.generate("tiny", "s", PROMPTS[1], seeded),
    }
    got: dict[str, list[StreamDelta]] = {rid: [await anext(st)] for rid, st in streams.items()}
    for rid, st in streams.items():
        while sum(len(d.new_token_ids) for d in got[rid]) < 10:
            got[rid].append(await anext(st))
    return streams, got


def _undisturbed(model_dir: Path, cases: dict[str, tuple[str, SamplingParams]]) -> dict[str, Any]:
    """Each case's output from the in-process engine, each request alone."""
    llm = LLM(str(model_dir))
    try:
        return {rid: llm.generate([p], sp)[0] for rid, (p, sp) in cases.items()}
    finally:
        llm.close()


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


SEEDED = SamplingParams(max_tokens=400, temperature=0.8, seed=11, ignore_eos=True)


async def test_requests_of_a_dead_instance_resume_elsewhere_with_the_same_tokens(
    tmp_path: Path, model_dir: Path, cache_root: Path
) -> None:
    """The instance dies mid-stream (its engine stops, nothing is exported): greedy, seeded and
    sampled-with-no-seed requests carry on on the other instance, the client's stream has exactly
    the tokens and text of an undisturbed run (the unseeded one's with the seed the router drew
    for it), and the dead instance is replaced."""
    greedy = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)
    unseeded = SamplingParams(max_tokens=400, temperature=0.8, ignore_eos=True)
    spec = _spec(model_dir, min_instances=2, max_instances=2)
    async with serving(tmp_path, (spec,), cache_root=cache_root) as s:
        router = s.app.state.router
        await _until(lambda: len(s.controller.ready_instances("tiny")) == 2, 120)
        streams, got = await _two_streams(router, greedy, SEEDED)
        victim = router.journal.get("g").instance_id
        assert router.journal.get("s").instance_id != victim  # one on each instance
        streams["u"] = router.generate("tiny", "u", PROMPTS[2], unseeded)
        got["u"] = [await anext(streams["u"])]
        seed = router.journal.get("u").params.seed
        assert seed is not None
        if router.journal.get("u").instance_id != victim:
            victim = router.journal.get("u").instance_id  # "u" must be one of those resumed
        s.cluster.handles[victim].crash()
        want = _undisturbed(
            model_dir,
            {
                "g": ("Hello there", greedy),
                "s": (PROMPTS[1], SEEDED),
                "u": (PROMPTS[2], dataclasses.replace(unseeded, seed=seed)),
            },
        )
        moved = {rid for rid in streams if router.journal.get(rid).instance_id == victim}
        assert "u" in moved and len(moved) == 2
        for rid, st in streams.items():
            got[rid] += await _collect(st)
            tokens = [t for d in got[rid] for t in d.new_token_ids]
            assert tokens == list(want[rid].token_ids), rid
            assert "".join(d.new_text for d in got[rid]) == want[rid].text
            assert got[rid][-1].finish_reason == "length"
            entry = router.journal.get(rid)
            assert entry.finished and entry.token_ids == tokens
            assert entry.instance_id != victim  # moved, or stayed where it was
        assert router.load("tiny") == (0, 0)
        metrics = (await s.client.get("/metrics")).text
        assert 'ember_requests_resumed_total{model="tiny"} 2.0' in metrics

        def replaced() -> bool:
            ready = s.controller.ready_instances("tiny")
            return len(ready) == 2 and victim not in {h.instance_id for h in ready}

        await _until(replaced, 120)
        for handle in s.controller.ready_instances("tiny"):
            assert handle.runner.stats()["unfinished"] == 0


async def test_the_only_instance_dies_and_its_request_waits_for_a_new_one(
    tmp_path: Path, model_dir: Path, cache_root: Path
) -> None:
    """Scale to zero: no other instance exists, so the request resumes after a cold start."""
    params = SamplingParams(max_tokens=300, temperature=0.0, ignore_eos=True)
    llm = LLM(str(model_dir))
    try:
        want = llm.generate([PROMPTS[0]], params)[0].token_ids
    finally:
        llm.close()
    async with serving(tmp_path, (_spec(model_dir),), cache_root=cache_root) as s:
        router = s.app.state.router
        stream = router.generate("tiny", "z", PROMPTS[0], params)
        first = [await anext(stream)]
        while sum(len(d.new_token_ids) for d in first) < 4:
            first.append(await anext(stream))
        [handle] = s.cluster.handles.values()
        handle.crash()
        rest = await _collect(stream)
        assert [t for d in first + rest for t in d.new_token_ids] == list(want)
        assert next(s.cluster.launched) == 2  # the lost instance and its replacement


async def test_a_request_lost_too_often_fails_with_instance_lost(
    tmp_path: Path, model_dir: Path, cache_root: Path
) -> None:
    """Every instance it reaches dies: after MAX_RESUMES resumes the error reaches the caller,
    and the router's counts return to zero."""
    from ember.api.router import MAX_RESUMES
    from ember.errors import InstanceLostError

    async with serving(tmp_path, (_spec(model_dir, min_instances=1),), cache_root=cache_root) as s:
        router = s.app.state.router
        stream = router.generate("tiny", "doomed", "Hello there", LONG)
        await anext(stream)
        crashed: set[str] = set()
        with pytest.raises(InstanceLostError):
            while True:
                for handle in list(s.cluster.handles.values()):
                    if handle.runner is not None and handle.instance_id not in crashed:
                        if handle.in_flight:
                            crashed.add(handle.instance_id)
                            handle.crash()
                await asyncio.wait_for(anext(stream), 60)
        assert len(crashed) == MAX_RESUMES + 1
        assert router.journal.get("doomed").finish_reason == "abort"
        assert router.load("tiny") == (0, 0)


async def test_a_request_that_kills_every_instance_is_quarantined_and_the_others_go_on(
    tmp_path: Path, model_dir: Path, cache_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A poison request (every instance it is given dies in its prefill) beside two others on
    the only instance: all three are lost twice; then they are suspects, and run one at a time
    until each passes where it was lost. The poison one, lost a third time as the only suspect
    there, ends with RequestQuarantinedError (HTTP 500 `request_quarantined`), and sent again it
    is refused at once with no instance lost; the other two end with their undisturbed tokens.
    Three instances died, not one per resume (or four, with the requests beside it failing
    too), and the router's counts return to zero."""
    from ember.api.router import QUARANTINE_S

    pill = "a poison pill"
    params = LONG  # long enough to be running still at each of the poison's instances' ends
    seeded = dataclasses.replace(SEEDED, max_tokens=LONG.max_tokens)
    want = _undisturbed(model_dir, {"a": (PROMPTS[0], params), "b": (PROMPTS[1], seeded)})
    spec = _spec(model_dir, min_instances=1, max_instances=1)
    serving_support.POISON.add(pill)
    try:
        async with serving(tmp_path, (spec,), cache_root=cache_root) as s:
            router = s.app.state.router
            await _until(lambda: len(s.controller.ready_instances("tiny")) == 1, 120)
            streams = {
                "a": router.generate("tiny", "a", PROMPTS[0], params),
                "b": router.generate("tiny", "b", PROMPTS[1], seeded),
            }
            got = {rid: [await anext(st)] for rid, st in streams.items()}
            innocent = [asyncio.ensure_future(_collect(st)) for st in streams.values()]
            body = {"model": "tiny", "prompt": pill, "max_tokens": 50, "temperature": 0}
            r = await asyncio.wait_for(s.client.post("/v1/completions", json=body), 300)
            assert r.status_code == 500, r.text
            err = r.json()["error"]
            assert err["code"] == "request_quarantined" and "3 times" in err["message"]
            rests = await asyncio.wait_for(asyncio.gather(*innocent), 300)
            for rid, rest in zip(streams, rests, strict=True):
                tokens = [t for d in got[rid] + rest for t in d.new_token_ids]
                assert tokens == list(want[rid].token_ids), rid
            crashed = [h.instance_id for h in s.cluster.every_handle if h.crashed]
            assert len(crashed) == 3, crashed
            suspects = {r.args[0] for r in caplog.records if "no other suspect" in r.getMessage()}
            assert {"a", "b"} <= suspects  # lost twice beside it, isolated, cleared
            assert router.journal.get("a").finish_reason == "length"

            # Sent again: refused at once, nothing crashes (a different request is not).
            r = await s.client.post("/v1/completions", json=body)
            assert r.status_code == 500, r.text
            err = r.json()["error"]
            assert err["code"] == "request_quarantined" and "made the engines" in err["message"]
            assert len([h for h in s.cluster.every_handle if h.crashed]) == 3
            assert router.load("tiny") == (0, 0) and router._suspects == {}
            metrics = (await s.client.get("/metrics")).text
            assert 'ember_requests_quarantined_total{model="tiny"} 1.0' in metrics
            # ... for QUARANTINE_S only (the clock is the router's)
            router._clock = _Later(router._clock, QUARANTINE_S)
            serving_support.POISON.discard(pill)
            r = await s.client.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["finish_reason"] == "length"
    finally:
        serving_support.POISON.discard(pill)


class _Later:
    """A clock `ahead_s` ahead of `clock`."""

    def __init__(self, clock: Any, ahead_s: float) -> None:
        self._clock, self._ahead_s = clock, ahead_s

    def now(self) -> float:
        return float(self._clock.now()) + self._ahead_s


async def test_a_request_of_a_deleted_deployment_is_not_resumed(
    tmp_path: Path, model_dir: Path, cache_root: Path
) -> None:
    """Deleting the deployment stops its instances under their requests: those end with the
    instance's error instead of waiting for an instance that will never come."""
    from ember.errors import InstanceLostError

    async with serving(tmp_path, (_spec(model_dir, min_instances=1),), cache_root=cache_root) as s:
        router = s.app.state.router
        stream = router.generate("tiny", "orphan", "Hello there", LONG)
        await anext(stream)
        s.controller.delete("tiny")
        with pytest.raises(InstanceLostError, match="stopped"):
            await asyncio.wait_for(_collect(stream), 60)
        assert router.load("tiny") == (0, 0)


@pytest.mark.parametrize("kv", ["always", "never"])
async def test_a_notice_moves_streaming_requests_live_with_the_same_tokens(
    tmp_path: Path, model_dir: Path, cache_root: Path, kv: str
) -> None:
    """A preemption notice for the node of the only instance: its replacement starts on the
    other node and both requests (greedy, seeded) move there in rounds while they stream, their
    K/V sent from the source (`kv="always"`) or recomputed on the target ("never"); the
    client's streams have the undisturbed tokens and text, nothing was resumed, the source
    drains and stops, and no engine keeps a request."""
    greedy = SamplingParams(max_tokens=600, temperature=0.0, ignore_eos=True)
    seeded = SamplingParams(max_tokens=600, temperature=0.8, seed=11, ignore_eos=True)
    want = _undisturbed(model_dir, {"g": ("Hello there", greedy), "s": (PROMPTS[1], seeded)})
    spec = _spec(model_dir, min_instances=1, max_instances=1)
    nodes = ("node-a000", "node-b000")
    config = ApiConfig(migration_kv=kv)
    async with serving(tmp_path, (spec,), config, cache_root=cache_root, nodes=nodes) as s:
        router = s.app.state.router
        await _until(lambda: len(s.controller.ready_instances("tiny")) == 1, 120)
        [source] = s.controller.ready_instances("tiny")
        streams, got = await _two_streams(router, greedy, seeded)
        r = await s.client.post(
            f"/admin/nodes/{source.node_id[:6]}/notice", json={"deadline_s": 60}
        )
        assert r.status_code == 200, r.text
        assert r.json()["draining"] == [source.instance_id] and r.json()["moving"] == 2
        assert s.controller.noticed().keys() == {source.node_id}
        rests = await asyncio.gather(*(_collect(st) for st in streams.values()))
        for rid, rest in zip(streams, rests, strict=True):
            got[rid] += rest
            assert [t for d in got[rid] for t in d.new_token_ids] == list(want[rid].token_ids)
            assert "".join(d.new_text for d in got[rid]) == want[rid].text
            assert router.journal.get(rid).instance_id != source.instance_id
        assert router.load("tiny") == (0, 0)
        metrics = (await s.client.get("/metrics")).text
        assert 'ember_requests_migrated_total{model="tiny"} 2.0' in metrics
        assert 'ember_requests_resumed_total{model="tiny"}' not in metrics  # none resumed
        sent = 'ember_migration_kv_tokens_total{model="tiny"}' in metrics
        assert sent == (kv == "always")
        assert sorted(source.exports) == (["g", "s"] if kv == "always" else [])
        await _until(lambda: source.instance_id in s.cluster.stopped, 30)
        [target] = s.controller.ready_instances("tiny")
        assert target.node_id == "node-b000"
        assert target.runner.stats()["unfinished"] == 0
        bad = await s.client.post("/admin/nodes/nosuch/notice", json={"deadline_s": 5})
        assert bad.status_code == 400 and "no alive node" in bad.json()["error"]["message"]
        bad = await s.client.post(f"/admin/nodes/{nodes[1]}/notice", json={"deadline_s": -1})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "deadline_s"


@contextlib.asynccontextmanager
async def _one_stream(
    tmp_path: Path,
    model_dir: Path,
    cache_root: Path,
    prompt: str,
    params: SamplingParams,
    config: ApiConfig | None = None,
) -> AsyncIterator[tuple[Any, Any, AsyncIterator[StreamDelta], list[StreamDelta]]]:
    """Deployment "tiny" with its one instance on node "na" of ("na", "nb"), streaming request
    "x": (the stack, the instance, the stream, its first delta in a list)."""
    spec = _spec(model_dir, min_instances=1, max_instances=1)
    async with serving(tmp_path, (spec,), config, cache_root=cache_root, nodes=("na", "nb")) as s:
        await _until(lambda: len(s.controller.ready_instances("tiny")) == 1, 120)
        [source] = s.controller.ready_instances("tiny")
        stream = s.app.state.router.generate("tiny", "x", prompt, params)
        yield s, source, stream, [await anext(stream)]


async def _check_end(s: Any, source: Any, got: list[StreamDelta], want: Any, moved: bool) -> str:
    """Request "x" ended with the undisturbed tokens, on another instance than `source` if it
    `moved` (and counted so) else on it, never resumed, no slot kept; returns /metrics."""
    router = s.app.state.router
    assert [t for d in got for t in d.new_token_ids] == list(want.token_ids)
    assert (router.journal.get("x").instance_id != source.instance_id) == moved
    metrics: str = (await s.client.get("/metrics")).text
    assert ('ember_requests_migrated_total{model="tiny"} 1.0' in metrics) == moved
    assert "ember_requests_resumed_total{" not in metrics
    assert router.load("tiny") == (0, 0)
    return metrics


def _never_caught_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rounds that never bring the target close enough to switch."""
    from ember.migration import live

    monkeypatch.setattr(live, "SWITCH_BEHIND", -1)
    monkeypatch.setattr(live, "MAX_ROUNDS", 10**6)


async def test_new_requests_avoid_an_instance_on_a_noticed_node(
    tmp_path: Path, model_dir: Path, cache_root: Path
) -> None:
    """Two nodes with room for one instance each. A notice for node a stops its instance, and
    its replacement, with no room elsewhere, starts on a itself. Two requests that come then
    both go to b's instance, not one to each (least loaded alone would spread them): a request
    placed on a would have to move again before the node goes."""
    spec = _spec(model_dir, min_instances=2, max_instances=2)
    nodes = ("node-a000", "node-b000")
    async with serving(
        tmp_path, (spec,), cache_root=cache_root, nodes=nodes, cpus=1.0, track_cpus=True
    ) as s:
        router = s.app.state.router
        await _until(lambda: len(s.controller.ready_instances("tiny")) == 2, 120)
        on = {h.node_id: h for h in s.controller.ready_instances("tiny")}
        assert set(on) == set(nodes)
        r = await s.client.post("/admin/nodes/node-a000/notice", json={"deadline_s": 60})
        assert r.status_code == 200, r.text

        def replaced_on_a() -> bool:
            return any(
                h.node_id == "node-a000" and h.instance_id != on["node-a000"].instance_id
                for h in s.controller.ready_instances("tiny")
            )

        await _until(replaced_on_a, 120)
        streams = {
            rid: router.generate("tiny", rid, PROMPTS[i], LONG) for i, rid in enumerate("wn")
        }
        for st in streams.values():
            await anext(st)
        b = on["node-b000"].instance_id
        assert [router.journal.get(rid).instance_id for rid in streams] == [b, b]
        for st in streams.values():
            await st.aclose()
        assert router.load("tiny") == (0, 0)


async def test_a_source_lost_mid_migration_hands_over_to_the_target_that_holds_its_tokens(
    tmp_path: Path, model_dir: Path, cache_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The node goes before the move is done (rounds never catch up here): the target's held
    copy gets the tokens it lacks and goes on; the client sees the undisturbed tokens and the
    request counts as migrated, not resumed."""
    _never_caught_up(monkeypatch)
    params = SamplingParams(max_tokens=300, temperature=0.8, seed=5, ignore_eos=True)
    want = _undisturbed(model_dir, {"x": (PROMPTS[1], params)})["x"]
    async with _one_stream(tmp_path, model_dir, cache_root, PROMPTS[1], params) as (
        s, source, stream, got,
    ):  # fmt: skip
        while sum(len(d.new_token_ids) for d in got) < 6:
            got.append(await anext(stream))
        s.controller.notice(source.node_id, 30.0)
        flight = s.app.state.router._flights[source.instance_id]["x"]
        await _until(lambda: flight.move is not None and flight.move.held, 60)
        got.append(await anext(stream))  # the source streams on meanwhile
        source.crash()
        got += await _collect(stream)
        await _check_end(s, source, got, want, moved=True)


async def test_a_source_lost_while_its_target_prefills_waits_for_the_target(
    tmp_path: Path, model_dir: Path, cache_root: Path
) -> None:
    """The node goes while the target is still prefilling the held copy (1,200 tokens,
    recomputed): the target finishes it and takes over, instead of the request being resumed
    from scratch elsewhere."""
    params = SamplingParams(max_tokens=1400, temperature=0.8, seed=9, ignore_eos=True)
    want = _undisturbed(model_dir, {"x": (PROMPTS[3], params)})["x"]
    config = ApiConfig(migration_kv="never")
    async with _one_stream(tmp_path, model_dir, cache_root, PROMPTS[3], params, config) as (
        s, source, stream, got,
    ):  # fmt: skip
        while sum(len(d.new_token_ids) for d in got) < 1200:
            got.append(await anext(stream))
        s.controller.notice(source.node_id, 60.0)
        flight = s.app.state.router._flights[source.instance_id]["x"]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while flight.move is None or flight.move.stream is None:  # its copy is on its way
            assert loop.time() < deadline
            await asyncio.sleep(0)
        assert not flight.move.held  # (1,200 tokens take the target a while to prefill)
        source.crash()
        got += await _collect(stream)
        await _check_end(s, source, got, want, moved=True)


async def test_a_move_near_its_deadline_switches_without_more_rounds(
    tmp_path: Path, model_dir: Path, cache_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rounds that would never catch up (the target kept far behind) and a notice due now: the
    move switches as soon as the target holds its copy; the tokens are the undisturbed ones."""
    _never_caught_up(monkeypatch)
    params = SamplingParams(max_tokens=300, temperature=0.8, seed=21, ignore_eos=True)
    want = _undisturbed(model_dir, {"x": (PROMPTS[2], params)})["x"]
    async with _one_stream(tmp_path, model_dir, cache_root, PROMPTS[2], params) as (
        s, source, stream, got,
    ):  # fmt: skip
        s.controller.notice(source.node_id, 0.0)
        got += await _collect(stream)
        await _check_end(s, source, got, want, moved=True)
        # The node outlived that notice: a new one goes by its own deadline, a third cannot
        # put it off.
        s.controller.notice(source.node_id, 60.0)
        assert 55 < s.controller.noticed()[source.node_id] <= 60
        s.controller.notice(source.node_id, 120.0)
        assert s.controller.noticed()[source.node_id] <= 60


async def test_a_move_whose_target_is_lost_leaves_the_request_streaming_where_it_was(
    tmp_path: Path, model_dir: Path, cache_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The target dies during the rounds: the move is given up (and counted), the request
    streams on from its source undisturbed, nothing is resumed, no slot is kept."""
    _never_caught_up(monkeypatch)  # the rounds go on until the target dies
    params = SamplingParams(max_tokens=300, temperature=0.8, seed=22, ignore_eos=True)
    want = _undisturbed(model_dir, {"x": (PROMPTS[0], params)})["x"]
    async with _one_stream(tmp_path, model_dir, cache_root, PROMPTS[0], params) as (
        s, source, stream, got,
    ):  # fmt: skip
        s.controller.notice(source.node_id, 60.0)
        flight = s.app.state.router._flights[source.instance_id]["x"]
        await _until(lambda: flight.move is not None and flight.move.held, 60)
        flight.move.target.crash()
        await _until(lambda: flight.move is None, 30)
        got += await _collect(stream)
        metrics = await _check_end(s, source, got, want, moved=False)
        assert 'ember_migrations_failed_total{model="tiny"} 1.0' in metrics
