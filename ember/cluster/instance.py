"""One serving instance: the Ray actor that hosts an engine, and the handle callers hold.

`InstanceActor` is a plain class (the adapter wraps it with `ray.remote`): it loads the model
through `EngineRunner`, which steps the engine on a background thread. Requests go in with
`submit` (a Ray call the caller does not await) and out with `abort`. Output leaves the actor
through ONE multiplexed stream per caller, every request's deltas in one message per step:
- the output channel (`channel`): a TCP connection on the node's address that the engine thread
  writes to itself, so no other thread of the actor wakes per step (see runner.py for why that
  matters); the caller proves itself with a one-time token it got through Ray. Once it is in
  use the caller sends its requests and aborts on it too, not as Ray calls;
- or, where no channel is connected, `events`, a Ray streaming generator of merged batches.
(`generate`, one Ray stream per request, remains for callers that want it.)

`InstanceHandle` is what the controller and the router hold: plain Python, no Ray type leaks
out. It reads the channel (or the event stream, if the channel cannot be opened) in one
background task and hands each request its own deltas; it counts the requests in flight
through it (the router's least-loaded choice reads it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import pickle
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ember.controller.types import Continuation, DeploymentSpec, Extension, StreamDelta
from ember.errors import InstanceLostError

if TYPE_CHECKING:
    from ember import SamplingParams
    from ember.cluster.adapter import ActorRef, RayAdapter
    from ember.cluster.runner import EngineRunner
    from ember.controller.types import KvBlob, KvTicket
    from ember.migration.transfer import MoveLink

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class InstanceReady:
    """What an instance reports once its engine is loaded."""

    node_id: str
    checkpoint_path: str
    load_s: float
    pid: int
    # Where the weights came from: the node store's "dram", "ssd", "peer" (another node's
    # copy), "remote" (S3) or "local"
    # (a checkpoint directory copied into DRAM), or "disk" (read straight from the directory).
    tier: str = "disk"


class InstanceActor:
    """Actor body: one engine replica (all its tensor-parallel ranks) and its streams."""

    def __init__(
        self, spec: DeploymentSpec, instance_id: str, cache_root: str, device: str = "cpu"
    ) -> None:
        from ember.cluster.adapter import worker_logging

        worker_logging()
        self._spec = spec
        self._instance_id = instance_id
        self._cache_root = cache_root
        self._device = device
        self._runner: EngineRunner | None = None
        self._ready: InstanceReady | None = None
        self._outbox: list[tuple[str, StreamDelta | BaseException]] = []
        self._outbox_ready = asyncio.Event()
        self._subscription = 0

    async def start(self) -> InstanceReady:
        """Prepare the checkpoint on this node and load the engine (idempotent)."""
        if self._ready is not None:
            return self._ready
        import os

        from ember.cluster.adapter import current_node_id
        from ember.cluster.runner import EngineRunner, prepare_checkpoint

        node_id = current_node_id()

        t0 = time.perf_counter()
        loop = asyncio.get_running_loop()
        path, tier = await loop.run_in_executor(
            None, prepare_checkpoint, self._spec, self._cache_root, node_id
        )
        runner = await loop.run_in_executor(
            None, EngineRunner.create, self._spec, path, self._device
        )
        self._run(runner, loop)
        self._ready = InstanceReady(
            node_id=node_id,
            checkpoint_path=str(path),
            load_s=time.perf_counter() - t0,
            pid=os.getpid(),
            tier=tier,
        )
        logger.info(
            "instance ready id=%s deployment=%s node=%s load_s=%.2f",
            self._instance_id,
            self._spec.name,
            node_id[:12],
            self._ready.load_s,
        )
        return self._ready

    def _run(self, runner: EngineRunner, loop: asyncio.AbstractEventLoop) -> None:
        """Start `runner`'s engine thread and make it this instance's (every way of starting
        one ends here: a pooled worker's too)."""
        from ember.cluster.adapter import node_ip

        runner.start(loop)
        runner.share_kv(node_ip())  # a move's K/V go from here to its target directly
        self._runner = runner

    async def generate(
        self, request_id: str, prompt: str | list[int] | Continuation, params: SamplingParams
    ) -> AsyncIterator[StreamDelta | BaseException]:
        """Stream a request's deltas; an error is yielded (not raised) so it keeps its type."""
        runner = self._runner
        if runner is None:
            from ember.errors import EngineError

            yield EngineError(f"instance {self._instance_id} is not started")
            return
        queue = runner.submit(request_id, prompt, params)
        finished = False
        try:
            while not finished:
                item = await queue.get()
                items = [item]
                while not queue.empty():
                    items.append(queue.get_nowait())
                for out in _merge(items):
                    if isinstance(out, BaseException):
                        finished = True
                        yield out
                        break
                    finished = out.finished
                    yield out
                    if finished:
                        break
        finally:
            if not finished:
                runner.abort(request_id)
            runner.release(request_id)

    async def submit(
        self, request_id: str, prompt: str | list[int] | Continuation, params: SamplingParams
    ) -> None:
        """Start a request whose output goes to the `events` stream (errors too)."""
        if self._runner is None:
            from ember.errors import EngineError

            self._emit(request_id, EngineError(f"instance {self._instance_id} is not started"))
            return
        self._runner.submit(request_id, prompt, params, sink=self._emit)

    async def events(self) -> AsyncIterator[list[tuple[Any, ...]]]:
        """Batches of `pack`ed rows (request_id, delta or error) for every `submit`ted request,
        until shutdown; each request's deltas in a batch merged into one.

        A new subscription ends the previous one (a caller that reconnects takes over).
        """
        self._subscription += 1
        mine = self._subscription
        while mine == self._subscription and self._runner is not None:
            # The runner hands over output at most once per FLUSH_INTERVAL_S, so a fast engine's
            # steps ride in one Ray object (each costs about a millisecond of CPU on both ends).
            await self._outbox_ready.wait()
            if mine != self._subscription:
                break  # superseded while waiting: the newer stream takes the batch
            self._outbox_ready.clear()
            batch, self._outbox = self._outbox, []
            if batch:
                yield [pack(rid, item) for rid, item in coalesce(batch)]

    def _emit(self, request_id: str, item: StreamDelta | BaseException) -> None:
        self._outbox.append((request_id, item))
        self._outbox_ready.set()

    async def channel(self) -> tuple[str, int, bytes]:
        """Open an output channel: (host, port, token) to connect to; see the module docstring."""
        from ember.cluster.adapter import node_ip
        from ember.errors import EngineError

        if self._runner is None:
            raise EngineError(f"instance {self._instance_id} is not started")
        host = node_ip()
        port, token = self._runner.open_channel(host)
        return host, port, token

    async def extend(self, request_id: str, extension: Extension) -> None:
        """A round of a live migration for a held request (see `Extension`)."""
        if self._runner is not None:
            self._runner.extend(request_id, extension)

    async def export(self, request_id: str, link: MoveLink) -> KvBlob | KvTicket | None:
        """A running request's K/V for a live migration, or None (`EngineRunner.export`)."""
        from ember.errors import EngineError

        if self._runner is None:
            raise EngineError(f"instance {self._instance_id} is not started")
        return await asyncio.wrap_future(self._runner.export(request_id, link))

    async def abort(self, request_id: str) -> None:
        if self._runner is not None:
            self._runner.abort(request_id)

    async def stats(self) -> dict[str, Any]:
        return {} if self._runner is None else self._runner.stats()

    async def shutdown(self) -> None:
        """Stop the engine thread; the adapter kills the actor afterwards."""
        if self._runner is not None:
            self._runner.stop()
            self._runner = None
        self._outbox_ready.set()  # ends the event stream


def coalesce(
    batch: list[tuple[str, StreamDelta | BaseException]],
) -> list[tuple[str, StreamDelta | BaseException]]:
    """Merge each request's consecutive deltas in a batch, keeping requests in first-seen order."""
    by_request: dict[str, list[StreamDelta | BaseException]] = {}
    for request_id, item in batch:
        by_request.setdefault(request_id, []).append(item)
    return [(rid, item) for rid, items in by_request.items() for item in _merge(items)]


def pack(request_id: str, item: StreamDelta | BaseException) -> tuple[Any, ...]:
    """A delta as a plain tuple for the wire (pickling a slotted dataclass costs ~25x more);
    an error as (request_id, error)."""
    if isinstance(item, BaseException):
        return (request_id, item)
    return (
        request_id,
        item.new_token_ids,
        item.new_text,
        item.finished,
        item.finish_reason,
        item.prompt_tokens,
        item.logprobs,
    )


def unpack(row: tuple[Any, ...]) -> StreamDelta | BaseException:
    """The inverse of `pack`."""
    if len(row) == 2:
        error: BaseException = row[1]
        return error
    return StreamDelta(*row)


def _merge(items: list[StreamDelta | BaseException]) -> list[StreamDelta | BaseException]:
    """Concatenate consecutive deltas (tokens, text, logprobs); the last one's end state wins."""
    out: list[StreamDelta | BaseException] = []
    for item in items:
        prev = out[-1] if out else None
        if isinstance(item, StreamDelta) and isinstance(prev, StreamDelta) and not prev.finished:
            logprobs = None
            if prev.logprobs is not None or item.logprobs is not None:
                logprobs = (prev.logprobs or ()) + (item.logprobs or ())
            out[-1] = StreamDelta(
                request_id=item.request_id,
                new_token_ids=prev.new_token_ids + item.new_token_ids,
                new_text=prev.new_text + item.new_text,
                finished=item.finished,
                finish_reason=item.finish_reason,
                prompt_tokens=item.prompt_tokens,
                logprobs=logprobs,
            )
        else:
            out.append(item)
    return out


class InstanceHandle:
    """The caller's side of one instance. Plain Python: no Ray type crosses this interface.

    `generate` yields `StreamDelta`s until one has `finished=True`; it raises the engine's own
    error (e.g. `RequestError` for a prompt that is too long) and `InstanceLostError` when the
    actor died. Closing the iterator early aborts the request. All requests share one event
    stream from the actor, read by a background task started on first use (`close` ends it).
    """

    def __init__(
        self,
        adapter: RayAdapter,
        actor: ActorRef,
        *,
        instance_id: str,
        deployment: str,
        node_id: str | None = None,
    ) -> None:
        self._adapter = adapter
        self._actor = actor
        self.instance_id = instance_id
        self.deployment = deployment
        self.node_id = node_id
        self.in_flight = 0
        self.lost = False  # set once a call found the actor dead; the controller replaces it
        # Its engine's counters at the last health probe (`ENGINE_STATS`, for `ember status`).
        self.engine_stats: dict[str, Any] | None = None
        self._queues: dict[str, asyncio.Queue[StreamDelta | BaseException]] = {}
        self._pump: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()  # set once requests may be submitted (or it failed)
        # The channel's writing side once it is in use: requests and aborts go that way (one
        # frame each, read by the engine thread between steps) instead of as Ray calls.
        self._writer: asyncio.StreamWriter | None = None

    @property
    def actor_ref(self) -> ActorRef:
        """The adapter's reference (for ember.cluster only)."""
        return self._actor

    def __repr__(self) -> str:
        return (
            f"InstanceHandle(id={self.instance_id}, deployment={self.deployment}, "
            f"node={(self.node_id or '?')[:12]}, in_flight={self.in_flight})"
        )

    async def generate(
        self, request_id: str, prompt: str | list[int] | Continuation, params: SamplingParams
    ) -> AsyncIterator[StreamDelta]:
        if self.lost:
            raise InstanceLostError(f"instance {self.instance_id} is gone")
        if request_id in self._queues:
            from ember.errors import RequestError

            raise RequestError(f"request_id: {request_id!r} is already running here")
        self._ensure_pump()
        queue: asyncio.Queue[StreamDelta | BaseException] = asyncio.Queue()
        self._queues[request_id] = queue
        self.in_flight += 1
        finished = False
        try:
            if not self._connected.is_set():
                await self._connected.wait()  # output is read before the request starts
            self._command("submit", request_id, prompt, params)
            while not finished:
                item = await queue.get()
                if not queue.empty():  # the consumer fell behind: hand it one merged delta
                    items = [item]
                    while not queue.empty():
                        items.append(queue.get_nowait())
                    merged = _merge(items)
                    item = merged[0]
                    for rest in merged[1:]:  # an error or a delta after a finished one: keep it
                        queue.put_nowait(rest)
                if isinstance(item, BaseException):
                    finished = True
                    if isinstance(item, InstanceLostError):
                        self.lost = True
                    raise item
                finished = item.finished
                yield item
        finally:
            self.in_flight -= 1
            self._queues.pop(request_id, None)
            if not finished and not self.lost:
                self._command("abort", request_id)

    async def abort(self, request_id: str) -> None:
        await self._adapter.call(self._actor, "abort", request_id)

    def extend(self, request_id: str, extension: Extension) -> None:
        """Send a round of a live migration to the held request `request_id` here (its
        acknowledgement, or its first tokens after a release, arrive on its `generate` stream)."""
        if self.lost:
            raise InstanceLostError(f"instance {self.instance_id} is gone")
        self._command("extend", request_id, extension)

    async def export(self, request_id: str, link: MoveLink) -> KvBlob | KvTicket | None:
        """The K/V of `request_id`'s cached tokens here when `link` says sending them beats
        recomputing them, else None (`ember.migration.transfer`); the request keeps running."""
        if self.lost:
            raise InstanceLostError(f"instance {self.instance_id} is gone")
        kv: KvBlob | KvTicket | None = await self._adapter.call(
            self._actor, "export", request_id, link
        )
        return kv

    def _command(self, op: str, request_id: str, *args: Any) -> None:
        """Start ("submit"), extend ("extend") or stop ("abort") a request: over the channel
        when it is in use (no thread of the actor but the engine's wakes for it), else as a Ray
        call."""
        writer = self._writer
        if writer is None or writer.is_closing():
            self._adapter.send(self._actor, op, request_id, *args)
            return
        from ember.cluster.runner import FRAME_HEADER

        data = pickle.dumps(("add" if op == "submit" else op, request_id, *args), protocol=5)
        writer.write(FRAME_HEADER.pack(len(data)) + data)

    async def stats(self) -> dict[str, Any]:
        """Engine counters of this instance (running, waiting, KV blocks in use)."""
        result: dict[str, Any] = await self._adapter.call(self._actor, "stats")
        return result

    async def close(self) -> None:
        """Stop reading the event stream; requests still waiting get InstanceLostError."""
        if self._pump is not None and not self._pump.done():
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump
        self._fail_all(InstanceLostError(f"instance {self.instance_id} was stopped"))

    def _ensure_pump(self) -> None:
        if self._pump is None or self._pump.done():
            self._pump = asyncio.create_task(self._read_events(), name=f"events-{self.instance_id}")

    async def _read_events(self) -> None:
        error: BaseException
        try:
            try:
                reader = await self._open_channel()
            except (OSError, asyncio.IncompleteReadError, TimeoutError) as e:
                logger.warning(
                    "output channel of %s failed (%s); using the Ray event stream",
                    self.instance_id, e,
                )  # fmt: skip
                await self._read_ray_events()
            else:
                await self._read_channel(reader)
            error = InstanceLostError(f"instance {self.instance_id} closed its stream")
        except asyncio.CancelledError:
            raise
        except InstanceLostError as e:
            error = e
        except Exception as e:  # the loop boundary of the reader: fail waiters, keep their type
            logger.exception("event stream of %s failed", self.instance_id)
            error = InstanceLostError(f"instance {self.instance_id}: {type(e).__name__}: {e}")
        finally:
            self._connected.set()  # waiters proceed and find the error in their queue
        self.lost = True
        self._fail_all(error)

    async def _open_channel(self) -> asyncio.StreamReader:
        host, port, token = await self._adapter.call(self._actor, "channel", timeout_s=30.0)
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 30.0)
        try:
            writer.write(token)
            await asyncio.wait_for(reader.readexactly(1), 30.0)  # the engine thread switched
        except BaseException:
            writer.close()
            raise
        self._writer = writer
        return reader

    async def _read_channel(self, reader: asyncio.StreamReader) -> None:
        from ember.cluster.runner import FRAME_HEADER

        self._connected.set()
        try:
            while True:
                try:
                    header = await reader.readexactly(FRAME_HEADER.size)
                except asyncio.IncompleteReadError:
                    return  # the instance closed it (shutdown) or died
                (size,) = FRAME_HEADER.unpack(header)
                self._dispatch(pickle.loads(await reader.readexactly(size)))
        finally:
            if self._writer is not None:
                self._writer.close()
                self._writer = None

    async def _read_ray_events(self) -> None:
        self._connected.set()
        async with contextlib.aclosing(self._adapter.stream(self._actor, "events")) as stream:
            async for batch in stream:
                self._dispatch(batch)

    def _dispatch(self, batch: list[Any]) -> None:
        """Hand each packed row of a batch to its request's queue (rows of requests no longer
        waited for are dropped)."""
        for row in batch:
            queue = self._queues.get(row[0])
            if queue is not None:
                queue.put_nowait(unpack(row))

    def _fail_all(self, error: BaseException) -> None:
        for queue in self._queues.values():
            queue.put_nowait(error)
