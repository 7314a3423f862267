"""Token-based live migration: a request moves to another instance while it streams.

The router owns the request (its journal, its slots, its client's stream); this module owns the
protocol between the two instances. Given a target that holds a slot (`Move.target`):

1. the source is asked for the request's state (`export`); it sends the K/V of the tokens it
   has cached when that beats recomputing them (`ember.migration.transfer`);
2. the target gets a *held* copy: the journal's tokens (with that K/V, if any): it prefills what
   it lacks, samples nothing, and acknowledges;
3. rounds: the tokens the source streamed meanwhile are sent (`Extension`) and acknowledged,
   fewer each round, as a prefill of n tokens takes less than n decode steps;
4. once the target is at most SWITCH_BEHIND tokens behind, after MAX_ROUNDS, or when the
   preemption notice's deadline is SWITCH_MARGIN_S away, the move is `ready`: the router
   switches at the source's next delta (aborts the source's copy, releases the target with the
   last tokens and the text the client has).

The client's pause is the last round's few tokens, not a prefill of the whole context.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from ember.controller.types import Continuation, Extension, StreamDelta
from ember.errors import InstanceLostError
from ember.migration.transfer import KvMode, MoveLink

if TYPE_CHECKING:
    from ember import SamplingParams
    from ember.controller.types import KvBlob, KvTicket
    from ember.policy.clock import Clock

logger = logging.getLogger(__name__)

# Rounds of catching up before the switch, and how far behind (in tokens) the target may be when
# the source stops (the pause is the prefill of those tokens plus a step).
MAX_ROUNDS = 4
SWITCH_BEHIND = 4
# A move under a preemption notice does no more rounds once its deadline is this close: it
# switches as soon as the target holds its copy (seconds).
SWITCH_MARGIN_S = 2.0
# The longest wait for the source's K/V before the target recomputes them instead (seconds).
EXPORT_TIMEOUT_S = 10.0


class InstanceLike(Protocol):
    """The part of `ember.cluster.instance.InstanceHandle` a move uses."""

    instance_id: str

    def generate(
        self, request_id: str, prompt: str | list[int] | Continuation, params: SamplingParams
    ) -> AsyncIterator[StreamDelta]: ...

    async def abort(self, request_id: str) -> None: ...

    def extend(self, request_id: str, extension: Extension) -> None: ...

    async def export(self, request_id: str, link: MoveLink) -> KvBlob | KvTicket | None: ...


@dataclass(eq=False, slots=True)
class Move:
    """A live migration in progress. `target` holds a slot once set; `stream` is the target's
    stream of the held copy, which has the first `sent` ids (`kv_tokens` of them came with
    their K/V from the source); `until` is the notice's deadline (clock time) if any."""

    until: float | None = None
    task: asyncio.Task[None] | None = None
    acked: asyncio.Event = field(default_factory=asyncio.Event)  # the target holds its copy
    target: Any = None
    stream: Relay | None = None
    sent: int = 0
    kv_tokens: int = 0
    ready: bool = False  # caught up: switch at the source's next delta

    @property
    def held(self) -> bool:
        """The target acknowledged its copy: it can take over."""
        return self.acked.is_set()


async def catch_up(
    move: Move,
    source: InstanceLike,
    request_id: str,
    prompt: str | list[int],
    params: SamplingParams,
    ids: list[int],
    link: MoveLink,
    clock: Clock,
) -> None:
    """Steps 1-4 of the module docstring for a move whose target holds a slot; `ids` is the
    journal's list of the request's output ids (it grows while this runs). Sets `move.ready`;
    raises when the move cannot go on (the request then stays on its source)."""
    kv = None
    if link.mode is not KvMode.NEVER:
        try:
            kv = await asyncio.wait_for(source.export(request_id, link), EXPORT_TIMEOUT_S)
            move.kv_tokens = kv.tokens if kv is not None else 0
        except InstanceLostError:
            raise
        except Exception as e:  # (not running there now: its tokens are recomputed)
            logger.info("request %s: no state from its source (%s); recomputing", request_id, e)
    n = len(ids)
    target = move.target
    copy = Continuation(prompt, tuple(ids[:n]), "", hold=True, kv=kv)
    move.stream = Relay(target.generate(request_id, copy, params))
    await acknowledged(move.stream)
    move.sent = n
    move.acked.set()
    for _ in range(MAX_ROUNDS - 1):
        n = len(ids)
        if n - move.sent <= SWITCH_BEHIND or _late(move, clock):
            break
        target.extend(request_id, Extension(tuple(ids[move.sent : n])))
        move.sent = n  # (a switch from here on sends only what follows)
        await acknowledged(move.stream)
    move.ready = True


def _late(move: Move, clock: Clock) -> bool:
    return move.until is not None and clock.now() >= move.until - SWITCH_MARGIN_S


def release(move: Move, ids: list[int], text: str) -> Extension:
    """The last round: the ids the target lacks and the text the client has."""
    return Extension(tuple(ids[move.sent :]), text, release=True)


class Relay:
    """A stream read by its own task into a queue, so that a reader waiting on it (a migration
    round) can be cancelled without ending the stream; `aclose` ends it (and so the request)."""

    def __init__(self, stream: AsyncIterator[StreamDelta]) -> None:
        self._queue: asyncio.Queue[StreamDelta | BaseException] = asyncio.Queue()
        self._task = asyncio.get_running_loop().create_task(self._pump(stream))

    async def _pump(self, stream: AsyncIterator[StreamDelta]) -> None:
        try:
            async for delta in stream:
                self._queue.put_nowait(delta)
            self._queue.put_nowait(StopAsyncIteration())
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self._queue.put_nowait(e)

    def __aiter__(self) -> Relay:
        return self

    async def __anext__(self) -> StreamDelta:
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self._queue.put_nowait(item)  # every later read ends the same way
            raise item
        return item

    async def aclose(self) -> None:
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)


async def held_or_failed(move: Move) -> bool:
    """Wait until the move's target holds its copy (True) or the move has ended without it."""
    if not move.held and move.task is not None and not move.task.done():
        acked = asyncio.ensure_future(move.acked.wait())
        try:
            await asyncio.wait([move.task, acked], return_when=asyncio.FIRST_COMPLETED)
        finally:
            acked.cancel()
    return move.held


async def next_output(stream: AsyncIterator[StreamDelta]) -> StreamDelta:
    """The next delta with output (a migration's acknowledgement that arrives after its
    target was released is skipped)."""
    delta = await anext(stream)
    while not (delta.new_token_ids or delta.new_text or delta.finished):
        delta = await anext(stream)
    return delta


async def acknowledged(stream: AsyncIterator[StreamDelta]) -> None:
    """Wait for a held copy's acknowledgement (a delta with no token) on its stream."""
    delta = await anext(stream)
    if delta.new_token_ids or delta.finished:
        raise RuntimeError(f"a held request produced output: {delta}")
