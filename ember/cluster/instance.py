"""One serving instance: the Ray actor that hosts an engine, and the handle callers hold.

`InstanceActor` is a plain class (the adapter wraps it with `ray.remote`): it loads the model
through `EngineRunner`, which steps the engine on a background thread, and streams each
request's output back as `StreamDelta`s from an async generator (a Ray streaming generator on
the caller's side). Deltas waiting when the consumer wakes are merged into one, so a busy
instance sends one object per request per wake-up rather than one per token.

`InstanceHandle` is what the controller and the router hold: plain Python, no Ray type leaks
out. It counts the requests in flight through it (the router's least-loaded choice reads it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ember.controller.types import DeploymentSpec, StreamDelta
from ember.errors import InstanceLostError

if TYPE_CHECKING:
    from ember import SamplingParams
    from ember.cluster.adapter import ActorRef, RayAdapter
    from ember.cluster.runner import EngineRunner

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class InstanceReady:
    """What an instance reports once its engine is loaded."""

    node_id: str
    checkpoint_path: str
    load_s: float
    pid: int


class InstanceActor:
    """Actor body: one engine replica (all its tensor-parallel ranks) and its streams."""

    def __init__(
        self, spec: DeploymentSpec, instance_id: str, cache_root: str, device: str = "cpu"
    ) -> None:
        self._spec = spec
        self._instance_id = instance_id
        self._cache_root = cache_root
        self._device = device
        self._runner: EngineRunner | None = None
        self._ready: InstanceReady | None = None

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
        path = await loop.run_in_executor(
            None, prepare_checkpoint, self._spec, self._cache_root, node_id
        )
        runner = await loop.run_in_executor(
            None, EngineRunner.create, self._spec, path, self._device
        )
        runner.start(loop)
        self._runner = runner
        self._ready = InstanceReady(
            node_id=node_id,
            checkpoint_path=str(path),
            load_s=time.perf_counter() - t0,
            pid=os.getpid(),
        )
        logger.info(
            "instance ready id=%s deployment=%s node=%s load_s=%.2f",
            self._instance_id,
            self._spec.name,
            node_id[:12],
            self._ready.load_s,
        )
        return self._ready

    async def generate(
        self, request_id: str, prompt: str | list[int], params: SamplingParams
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
    actor died. Closing the iterator early aborts the request.
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
        self, request_id: str, prompt: str | list[int], params: SamplingParams
    ) -> AsyncIterator[StreamDelta]:
        self.in_flight += 1
        finished = False
        try:
            stream = self._adapter.stream(self._actor, "generate", request_id, prompt, params)
            async with contextlib.aclosing(stream):
                async for item in stream:
                    if isinstance(item, BaseException):
                        finished = True
                        raise item
                    finished = item.finished
                    yield item
                    if finished:
                        break
        except InstanceLostError:
            self.lost = True
            finished = True
            raise
        finally:
            self.in_flight -= 1
            if not finished:
                await self._abort_quietly(request_id)

    async def abort(self, request_id: str) -> None:
        await self._adapter.call(self._actor, "abort", request_id)

    async def stats(self) -> dict[str, Any]:
        """Engine counters of this instance (running, waiting, KV blocks in use)."""
        result: dict[str, Any] = await self._adapter.call(self._actor, "stats")
        return result

    async def _abort_quietly(self, request_id: str) -> None:
        try:
            await asyncio.shield(self.abort(request_id))
        except Exception:  # the actor may already be gone; nothing left to abort then
            logger.debug("abort of %s on %s failed", request_id, self.instance_id, exc_info=True)
