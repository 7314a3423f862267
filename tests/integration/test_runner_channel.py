"""The engine runner's output channel: a real engine on its thread, a real loopback socket.

The channel carries each step's packed deltas for requests submitted with a sink; these tests
check that a caller without the token gets nothing, that every token arrives in order and equals
what the same engine gives through its in-process queue, and that an abort ends the stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import pickle
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ember import SamplingParams
from ember.cluster.instance import unpack
from ember.cluster.runner import FRAME_HEADER, EngineRunner
from ember.controller.types import StreamDelta
from ember.engine.config import EngineConfig
from ember.engine.engine import Engine
from ember.store.factory import make_model


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("chan") / "m", "llama", "tiny", "fp32", seed=0)


async def _connect(port: int, token: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(token)
    assert await asyncio.wait_for(reader.readexactly(1), 10) == b"\x01"
    return reader, writer


async def _read_until_finished(
    reader: asyncio.StreamReader, ids: set[str]
) -> dict[str, list[StreamDelta | BaseException]]:
    got: dict[str, list[StreamDelta | BaseException]] = {rid: [] for rid in ids}
    live = set(ids)
    while live:
        (size,) = FRAME_HEADER.unpack(await asyncio.wait_for(reader.readexactly(4), 30))
        for row in pickle.loads(await reader.readexactly(size)):
            item = unpack(row)
            got[row[0]].append(item)
            if isinstance(item, BaseException) or item.finished:
                live.discard(row[0])
    return got


async def _queue_tokens(
    runner: EngineRunner, request_id: str, prompt: list[int], params: SamplingParams
) -> list[int]:
    """A request's tokens through the runner's in-process queue path (the reference)."""
    queue = runner.submit(request_id, prompt, params)
    tokens: list[int] = []
    while True:
        item = await queue.get()
        assert isinstance(item, StreamDelta)
        tokens += item.new_token_ids
        if item.finished:
            break
    runner.release(request_id)
    return tokens


@contextlib.asynccontextmanager
async def _channel(
    model: Path,
) -> AsyncIterator[tuple[EngineRunner, asyncio.StreamReader, asyncio.StreamWriter]]:
    """A runner on its thread with a connected output channel; stopped on exit."""
    runner = EngineRunner(Engine(EngineConfig(model=str(model), max_model_len=256)))
    runner.start(asyncio.get_running_loop())
    try:
        port, token = runner.open_channel("127.0.0.1")
        reader, writer = await _connect(port, token)
        yield runner, reader, writer
    finally:
        runner.stop()


def test_channel_carries_every_token_in_order_and_refuses_a_wrong_token(model: Path) -> None:
    async def main() -> None:
        runner = EngineRunner(Engine(EngineConfig(model=str(model), max_model_len=256)))
        runner.start(asyncio.get_running_loop())
        try:
            port, token = runner.open_channel("127.0.0.1")
            bad_reader, bad_writer = await asyncio.open_connection("127.0.0.1", port)
            bad_writer.write(bytes(len(token)))
            assert await asyncio.wait_for(bad_reader.read(), 10) == b""  # closed, nothing sent
            reader, writer = await _connect(port, token)

            params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
            prompts = {"a": [11, 12, 13, 14], "b": [20, 21, 22]}
            sunk: list[str] = []
            for rid, prompt in prompts.items():
                runner.submit(rid, prompt, params, sink=lambda r, _item: sunk.append(r))
            got = await _read_until_finished(reader, set(prompts))
            for rid, prompt in prompts.items():  # the same engine through its queue path
                want = await _queue_tokens(runner, f"q-{rid}", prompt, params)
                deltas = got[rid]
                assert all(isinstance(d, StreamDelta) for d in deltas)
                tokens = [t for d in deltas for t in d.new_token_ids]  # type: ignore[union-attr]
                assert tokens == want and len(tokens) == 12
                last = deltas[-1]
                assert isinstance(last, StreamDelta) and last.finish_reason == "length"
                assert sum(d.finished for d in deltas) == 1  # type: ignore[union-attr]
            assert sunk == []  # the channel took them: the event-loop path saw nothing
            assert runner.stats()["streams"] == 0
            writer.close()
        finally:
            runner.stop()

    asyncio.run(main())


def test_abort_ends_a_channel_request_with_abort(model: Path) -> None:
    async def main() -> None:
        async with _channel(model) as (runner, reader, writer):
            params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
            runner.submit("long", [5, 6, 7], params, sink=lambda _r, _i: None)
            (size,) = FRAME_HEADER.unpack(await asyncio.wait_for(reader.readexactly(4), 30))
            first = unpack(pickle.loads(await reader.readexactly(size))[0])
            assert isinstance(first, StreamDelta) and not first.finished
            runner.abort("long")
            rest = await _read_until_finished(reader, {"long"})
            last = rest["long"][-1]
            assert isinstance(last, StreamDelta) and last.finish_reason == "abort"
            assert runner.stats()["streams"] == 0 and runner.stats()["unfinished"] == 0
            writer.close()

    asyncio.run(main())


def _command(writer: asyncio.StreamWriter, *command: object) -> None:
    data = pickle.dumps(command, protocol=5)
    writer.write(FRAME_HEADER.pack(len(data)) + data)


async def _rows(reader: asyncio.StreamReader, frames: int) -> list[tuple[str, object]]:
    out: list[tuple[str, object]] = []
    for _ in range(frames):
        (size,) = FRAME_HEADER.unpack(await asyncio.wait_for(reader.readexactly(4), 30))
        out += [(row[0], unpack(row)) for row in pickle.loads(await reader.readexactly(size))]
    return out


def test_requests_and_aborts_written_to_the_channel(model: Path) -> None:
    """The caller's requests and aborts travel on the channel itself and the engine thread reads
    them between steps: the tokens equal the in-process queue path's, an abort ends its stream,
    a reused id is refused, and closing the channel aborts what is still running."""

    async def main() -> None:
        async with _channel(model) as (runner, reader, writer):
            params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
            seeded = SamplingParams(max_tokens=10, temperature=0.8, seed=7, ignore_eos=True)
            long = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
            _command(writer, "add", "a", [11, 12, 13, 14], params)
            _command(writer, "add", "s", [9, 8, 7], seeded)
            _command(writer, "add", "long", [5, 6, 7], long)
            _command(writer, "abort", "long")
            got = await _read_until_finished(reader, {"a", "s", "long"})
            for rid, prompt, p in (("a", [11, 12, 13, 14], params), ("s", [9, 8, 7], seeded)):
                want = await _queue_tokens(runner, f"q-{rid}", prompt, p)
                deltas = [d for d in got[rid] if isinstance(d, StreamDelta)]
                tokens = [t for d in deltas for t in d.new_token_ids]
                assert tokens == want and len(tokens) == 10
            last = got["long"][-1]
            assert isinstance(last, StreamDelta) and last.finish_reason == "abort"
            assert runner.stats()["unfinished"] == 0

            # A reused id: refused while its request runs; accepted right after its abort, in
            # the same read (the abort's end is sent before the new request's first token).
            _command(writer, "add", "r", [5, 6, 7], long)
            _command(writer, "add", "r", [1, 2], params)
            rows = await _rows(reader, 2)
            refused = [item for rid, item in rows if isinstance(item, BaseException)]
            assert len(refused) == 1 and "already running" in str(refused[0])
            _command(writer, "abort", "r")
            _command(writer, "add", "r", [11, 12, 13, 14], params)
            rows = []
            while sum(isinstance(i, StreamDelta) and i.finished for _, i in rows) < 2:
                rows += await _rows(reader, 1)
            ends = [i for _, i in rows if isinstance(i, StreamDelta) and i.finished]
            assert [e.finish_reason for e in ends] == ["abort", "length"]
            after = rows[[i for _, i in rows].index(ends[0]) + 1 :]
            tokens = [t for _, i in after if isinstance(i, StreamDelta) for t in i.new_token_ids]
            assert tokens == [
                t for d in got["a"] if isinstance(d, StreamDelta) for t in d.new_token_ids
            ]
            assert runner.stats()["unfinished"] == 0

            _command(writer, "add", "orphan", [5, 6, 7], long)  # then the caller goes away
            (size,) = FRAME_HEADER.unpack(await asyncio.wait_for(reader.readexactly(4), 30))
            await reader.readexactly(size)
            writer.close()
            for _ in range(200):
                if runner.stats()["unfinished"] == 0:
                    break
                await asyncio.sleep(0.05)
            assert runner.stats()["unfinished"] == 0 and runner.stats()["streams"] == 0

    asyncio.run(main())


def test_a_caller_that_stops_reading_loses_the_channel_not_the_engine(
    model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A caller that stops reading fills the socket's buffers: the engine thread waits for room
    at most CHANNEL_SEND_TIMEOUT_S, then drops the channel and aborts its requests, and goes on
    serving everything else."""
    import socket

    from ember.cluster import runner as runner_module

    monkeypatch.setattr(runner_module, "CHANNEL_SEND_TIMEOUT_S", 0.5)

    async def main() -> None:
        async with _channel(model) as (runner, reader, writer):
            small = 4096  # small kernel buffers on both ends, so the rows back up soon
            writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, small)
            # asyncio would read ahead up to its high-water mark: nothing is read at all (the
            # receive window was advertised before the buffer shrank, so the rows are many)
            writer.transport.pause_reading()  # type: ignore[attr-defined]
            assert runner._channel is not None  # the engine's end (test-only access)
            runner._channel.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, small)
            big = SamplingParams(max_tokens=250, temperature=0.0, ignore_eos=True, logprobs=20)
            for i in range(24):  # never read: the stream backs up (~24 x 250 rows of 20 logprobs)
                _command(writer, "add", f"stuck-{i}", [5, 6, 7, i + 8], big)
            # The engine thread reads the commands between its steps: until it has, the stats
            # show no stream either, and the wait below would end before anything started.
            for _ in range(400):
                if runner.stats()["streams"] or runner._channel is None:
                    break
                await asyncio.sleep(0.01)
            for _ in range(400):
                if runner.stats()["streams"] == 0 and runner.stats()["unfinished"] == 0:
                    break
                await asyncio.sleep(0.05)
            assert runner.stats()["streams"] == 0 and runner.stats()["unfinished"] == 0
            assert runner._channel is None
            params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
            assert len(await _queue_tokens(runner, "after", [11, 12, 13], params)) == 6
            writer.close()

    asyncio.run(main())
