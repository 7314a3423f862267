"""A live move's K/V going straight from the source's runner to the target's
(`ember.migration.kv_link`): real engines on their threads, real loopback sockets.

The source shares its K/V (`share_kv`): `export` answers with a ticket; the target, given a
`Continuation` with it, pulls the bytes on a thread and carries on with exactly the tokens the
source went on to produce. A pull that fails (the source gone) recomputes them instead, with
the same tokens; an abort while the bytes are on their way ends the request at once and leaks
nothing.
"""

from __future__ import annotations

import asyncio
import logging
import pickle
import socket
import threading
from pathlib import Path

import pytest

from ember import SamplingParams
from ember.cluster.instance import unpack
from ember.cluster.runner import FRAME_HEADER, EngineRunner
from ember.controller.types import Continuation, KvTicket, StreamDelta
from ember.engine.config import EngineConfig
from ember.engine.engine import Engine
from ember.migration import kv_link
from ember.migration.transfer import KvMode, MoveLink
from ember.store.factory import make_model

PROMPT = [11, 12, 13, 14, 15, 16, 17, 18, 19, 20]
CASES = {
    "greedy": SamplingParams(max_tokens=60, temperature=0.0, ignore_eos=True),
    "seeded": SamplingParams(max_tokens=60, temperature=0.8, seed=5, ignore_eos=True),
}


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("kv") / "m", "llama", "tiny", "fp32", seed=2)


def _runner(model: Path) -> EngineRunner:
    runner = EngineRunner(Engine(EngineConfig(model=str(model), max_model_len=256)))
    runner.start(asyncio.get_running_loop())
    return runner


async def _collect(queue: asyncio.Queue[StreamDelta | BaseException]) -> tuple[list[int], str]:
    ids: list[int] = []
    text = ""
    while True:
        item = await asyncio.wait_for(queue.get(), 60)
        assert isinstance(item, StreamDelta), item
        ids += item.new_token_ids
        text += item.new_text
        if item.finished:
            return ids, text


async def _move(
    model: Path, params: SamplingParams, stop_source_first: bool
) -> tuple[list[int], list[int], KvTicket]:
    """Run a request on a source runner, take a ticket to its K/V after 12 tokens, resume it on
    a target runner from there; (the source's tokens, the moved ones, the ticket)."""
    source, target = _runner(model), _runner(model)
    try:
        source.share_kv("127.0.0.1")
        queue = source.submit("r", PROMPT, params)
        ids: list[int] = []
        text = ""
        while len(ids) < 12:
            item = await asyncio.wait_for(queue.get(), 60)
            assert isinstance(item, StreamDelta)
            ids += item.new_token_ids
            text += item.new_text
        ticket = await asyncio.wrap_future(source.export("r", MoveLink(KvMode.ALWAYS)))
        assert isinstance(ticket, KvTicket) and ticket.tokens >= 12
        rest, _ = await _collect(queue)
        source.release("r")
        if stop_source_first:
            source.stop()
        moved_queue = target.submit("r", Continuation(PROMPT, tuple(ids), text, kv=ticket), params)
        moved, _ = await _collect(moved_queue)
        target.release("r")
        stats = target.stats()
        assert stats["unfinished"] == 0 and stats["streams"] == 0
        assert (stats["kv_pulls"], stats["kv_pull_failures"]) == (
            (0, 1) if stop_source_first else (1, 0)
        )
        assert source.stats()["kv_shelved"] == 0  # taken (or dropped with its runner)
        blocks = target._engine.block_manager
        assert blocks.num_free == blocks.num_blocks  # nothing leaked
        return ids + rest, ids + moved, ticket
    finally:
        source.stop()
        target.stop()


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_target_pulls_the_kv_and_goes_on_with_the_same_tokens(
    model: Path, case: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ember.cluster.runner")

    async def main() -> None:
        want, got, ticket = await _move(model, CASES[case], stop_source_first=False)
        assert got == want and len(got) == 60
        pulled = [r.getMessage() for r in caplog.records if "pulled the K/V" in r.getMessage()]
        assert len(pulled) == 1 and f"of {ticket.tokens} tokens" in pulled[0], pulled

    asyncio.run(main())


def test_a_source_gone_before_the_pull_means_a_recompute_with_the_same_tokens(
    model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="ember.cluster.runner")

    async def main() -> None:
        want, got, _ = await _move(model, CASES["seeded"], stop_source_first=True)
        assert got == want
        messages = [r.getMessage() for r in caplog.records]
        assert any("no K/V from its source" in m and "recomputing" in m for m in messages)
        assert not any("pulled the K/V" in m for m in messages)

    asyncio.run(main())


def test_an_abort_while_the_kv_are_on_their_way_ends_the_request_at_once(
    model: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Over the output channel (the actor's path): the source never answers; the caller aborts;
    the stream ends with "abort" at once, the id is free again, and when the pull gives up
    nothing is added to the engine."""
    monkeypatch.setattr(kv_link, "READ_TIMEOUT_S", 1.5)
    silent = socket.create_server(("127.0.0.1", 0))  # accepts, never answers
    accepted: list[socket.socket] = []
    threading.Thread(target=lambda: accepted.append(silent.accept()[0]), daemon=True).start()
    ticket = KvTicket(
        "127.0.0.1", silent.getsockname()[1], "0" * 16, bytes(16), (2, 2, 4, 2, 16), "float32",
        2 * 2 * 4 * 2 * 16 * 4,
    )  # fmt: skip
    params = CASES["greedy"]

    def command(writer: asyncio.StreamWriter, *cmd: object) -> None:
        data = pickle.dumps(cmd, protocol=5)
        writer.write(FRAME_HEADER.pack(len(data)) + data)

    async def rows(reader: asyncio.StreamReader) -> list[StreamDelta | BaseException]:
        (size,) = FRAME_HEADER.unpack(await asyncio.wait_for(reader.readexactly(4), 30))
        return [unpack(row) for row in pickle.loads(await reader.readexactly(size))]

    async def main() -> None:
        runner = _runner(model)
        try:
            port, token = runner.open_channel("127.0.0.1")
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(token)
            assert await asyncio.wait_for(reader.readexactly(1), 10) == b"\x01"
            command(writer, "add", "m", Continuation(PROMPT, (30, 31), "", kv=ticket), params)
            await asyncio.sleep(0.3)  # the pull is under way
            command(writer, "abort", "m")
            command(writer, "add", "m", PROMPT, params)  # the id, reused at once
            ends: list[StreamDelta] = []
            while len(ends) < 2:
                ends += [d for d in await rows(reader) if isinstance(d, StreamDelta) and d.finished]
            assert [e.finish_reason for e in ends] == ["abort", "length"]
            await asyncio.sleep(kv_link.READ_TIMEOUT_S + 0.5)  # the pull has given up
            assert runner.stats()["unfinished"] == 0 and runner.stats()["streams"] == 0
            blocks = runner._engine.block_manager
            assert blocks.num_free == blocks.num_blocks
            writer.close()
        finally:
            runner.stop()
            silent.close()
            for conn in accepted:
                conn.close()

    asyncio.run(main())
