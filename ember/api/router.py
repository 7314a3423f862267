"""The router: per-deployment bounded queues, least-loaded instance choice, token streaming.

A request first tries to take a slot on a ready instance of its deployment (an instance carries
at most `spec.max_num_seqs` routed requests, the engine's batch size). If none is free it joins
the deployment's FIFO line, bounded by `spec.max_queue` (QueueFullError beyond it); while the
deployment has no ready instance at all the head of the line asks the controller to wake it and
waits for an instance (scale from zero). The whole wait, up to the first token, is bounded by
`spec.request_timeout_s` (RequestTimeoutError). Once placed, deltas stream straight through and
each one's token ids are appended to the request journal.

A request whose instance is lost (its process or node died: `InstanceLostError`) is resumed:
it goes back to the head of the line and, on the next instance it gets (a cold start if none
is left), carries on from the journal (prompt, ids and text streamed so far) as a
`Continuation`; the engine recomputes those tokens and continues, so the client's stream goes
on with the tokens it would have had (greedy and seeded: the same ones in fp32; a bf16 recompute
can flip a near-tie, see docs/serving.md). At most MAX_RESUMES times per request; the deadline
to the first new token starts again at each resume. A sampled request that names no seed gets
one here (`resumable`), so that it too resumes and moves with the tokens it would have had.

A request that makes every engine it runs on fail (a poison request) must not take the fleet
and the requests batched with it down too. A request lost with its instance SUSPECT_AFTER times
(2) is a suspect: it resumes only on an instance where no other suspect runs, until it streams a
token past the point where it was last lost (then it is cleared). A suspect whose instance is
lost while it is the only suspect there is quarantined: it ends with RequestQuarantinedError
(HTTP 500) instead of being resumed again, and the same request (model, prompt and parameters)
sent again within QUARANTINE_S is refused at once. The innocent requests lost beside it are
suspects too, each on an instance of its own for a few tokens, and go on. So a poison request
takes three instances, not one per resume, and fails alone.

A request whose instance is about to go away (its node got a preemption notice: the controller
calls `migrate(instance_id, deadline_s)`) moves while it streams (token-based live migration,
`ember.migration.live`): a target instance takes a slot at the head of the line, gets a held
copy of the request (the journal's tokens, with the source's K/V when moving them is cheaper
than recomputing them) and catches up in rounds while the source keeps decoding; once it is
ready the next delta from the source is the last: the source's copy is aborted and the target,
given the rest of the tokens and the text the client has, goes on. Near the notice's deadline
the rounds stop and the move switches at once. A move that fails
(the target lost, no instance in time) leaves the request on its source; if the source dies
first, a target that holds a prefix (or is prefilling it) takes over with the tokens it lacks,
else the request is resumed as above.

The controller reads `load(name) -> (queued, in_flight)` through `set_load_source` to decide how
many instances a deployment needs.

Invariants: `queued` counts requests in the line; `in_flight` counts requests holding a slot;
both return to zero when every request has ended, however it ended (finished, error, timeout,
client gone). A moving request holds a slot on its source and one on its target until it
switches. A request whose consumer stops early is aborted on its instance (and its target).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import secrets
from collections import deque
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from ember.api.journal import JournalEntry, RequestJournal
from ember.controller.types import Continuation, DeploymentSpec, StreamDelta
from ember.errors import (
    InstanceLostError,
    ModelNotFoundError,
    QueueFullError,
    RequestQuarantinedError,
    RequestTimeoutError,
)
from ember.migration.live import (
    InstanceLike,
    Move,
    catch_up,
    held_or_failed,
    next_output,
    release,
)
from ember.migration.transfer import MoveLink
from ember.policy.clock import Clock, SystemClock

if TYPE_CHECKING:
    from ember import SamplingParams

logger = logging.getLogger(__name__)

# How often a queued request re-checks for instances that became ready or free, in seconds.
POLL_INTERVAL_S = 0.05
# How many times one request is resumed after losing its instance before its error reaches the
# client (each resume recomputes its tokens so far on another instance).
MAX_RESUMES = 3
# Losses after which a request runs only where no other suspect does (module docstring), and
# how long a quarantined request is refused when it comes again (seconds; at most
# QUARANTINE_MAX remembered).
SUSPECT_AFTER = 2
QUARANTINE_S = 600.0
QUARANTINE_MAX = 1024


def resumable(params: SamplingParams) -> SamplingParams:
    """`params` with a seed: a sampled request that names none draws one (63 random bits, as
    random as the engine's own draw would have been). The journal keeps it, so a resume or a
    move replays the same generator and the client gets the tokens of the unmoved request,
    sampled or not."""
    if params.seed is not None or params.greedy:
        return params
    return dataclasses.replace(params, seed=secrets.randbits(63))


class ControllerLike(Protocol):
    """The part of `ember.controller.controller.Controller` the router uses."""

    def get(self, name: str) -> DeploymentSpec: ...

    def ready_instances(self, name: str) -> list[Any]: ...  # never one known to be lost

    def noticed(self) -> dict[str, float]: ...  # nodes under a preemption notice

    def set_load_source(self, fn: Callable[[str], tuple[int, int]]) -> None: ...

    def set_migrate_hook(self, fn: Callable[[str, float], object]) -> None: ...

    def wake(self, name: str) -> None: ...

    async def wait_for_instance(self, name: str, timeout_s: float) -> None: ...


@dataclass(slots=True)
class _Load:
    """One deployment's routing state (owned by the router, mutated on the event loop only)."""

    line: deque[object] = field(default_factory=deque)  # FIFO of waiting requests' tickets
    aside: int = 0  # suspects waiting outside the line for an instance without another suspect
    in_flight: int = 0
    per_instance: dict[str, int] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    waking: bool = False  # a cold start is in progress (counted once in cold_starts)
    turn: int = 0  # rotates ties between equally loaded instances

    def notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()


@dataclass(eq=False, slots=True)
class _Flight:
    """A request streaming from an instance (what `migrate` finds by instance)."""

    model: str
    request_id: str
    prompt: str | list[int]
    params: SamplingParams
    entry: JournalEntry
    handle: InstanceLike | None = None  # the instance it streams from
    move: Move | None = None
    suspect: bool = False  # lost SUSPECT_AFTER times and not yet past where it was last lost
    lost_at: int = -1  # its output tokens when it was last lost

    @property
    def instance_id(self) -> str:
        return self.handle.instance_id if self.handle is not None else ""


class Router:
    """Routes requests of every deployment to its instances; see the module docstring."""

    def __init__(
        self,
        controller: ControllerLike,
        journal: RequestJournal | None = None,
        clock: Clock | None = None,
        on_cold_start: Callable[[str], None] | None = None,
        on_resume: Callable[[str], None] | None = None,
        on_migrate: Callable[[str, int], None] | None = None,
        on_move_failed: Callable[[str], None] | None = None,
        link: MoveLink | None = None,
        on_quarantine: Callable[[str], None] | None = None,
    ) -> None:
        self._controller = controller
        self.journal = journal if journal is not None else RequestJournal()
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._on_cold_start = on_cold_start
        self._on_resume = on_resume
        self._on_migrate = on_migrate
        self._on_move_failed = on_move_failed
        self._on_quarantine = on_quarantine
        self.link = link if link is not None else MoveLink()
        self._loads: dict[str, _Load] = {}
        self._flights: dict[str, dict[str, _Flight]] = {}  # instance id -> request id -> flight
        self._suspects: dict[str, set[str]] = {}  # instance id -> suspects' request ids there
        self._quarantine: dict[str, float] = {}  # request fingerprint -> refused until (clock)
        self._background: set[asyncio.Task[Any]] = set()
        controller.set_load_source(self.load)
        controller.set_migrate_hook(self.migrate)

    # --- what the controller and /metrics read ---------------------------------------------

    def load(self, name: str) -> tuple[int, int]:
        """(queued, in_flight) of a deployment."""
        state = self._loads.get(name)
        return (len(state.line) + state.aside, state.in_flight) if state is not None else (0, 0)

    def loads(self) -> dict[str, tuple[int, int]]:
        return {name: self.load(name) for name in self._loads}

    # --- routing -------------------------------------------------------------------------------

    async def generate(
        self, model: str, request_id: str, prompt: str | list[int], params: SamplingParams
    ) -> AsyncIterator[StreamDelta]:
        """Stream one request's deltas from an instance of `model`.

        Raises ModelNotFoundError, QueueFullError, RequestTimeoutError (no first token within
        the deployment's request timeout), or the instance's own error (e.g. RequestError).
        """
        spec = self._controller.get(model)
        fingerprint = self._check_quarantine(model, prompt, params)
        params = resumable(params)
        state = self._loads.setdefault(model, _Load())
        deadline = self._clock.now() + spec.request_timeout_s
        entry = self.journal.open(request_id, model, prompt, params, self._clock.now())
        flight = _Flight(model, request_id, prompt, params, entry)
        finish_reason: str | None = "abort"
        handle: Any = None
        stream: AsyncIterator[StreamDelta] | None = None
        finished = False
        resumes = 0
        try:
            while True:
                try:
                    if handle is None:
                        handle = await self._acquire(
                            model, spec, state, deadline, resuming=resumes > 0,
                            suspect=flight.suspect,
                        )  # fmt: skip
                        self._fly(flight, handle)
                        what: str | list[int] | Continuation = prompt
                        if entry.token_ids:
                            what = Continuation(prompt, tuple(entry.token_ids), entry.text)
                        stream = handle.generate(request_id, what, params)
                        delta = await self._first_delta(stream, deadline, spec)
                    else:  # a migration's target that took over from a lost source
                        assert stream is not None
                        delta = await next_output(stream)
                    while True:
                        finished = self._record(entry, delta)
                        if flight.suspect and len(entry.token_ids) > flight.lost_at:
                            self._clear_suspect(flight, state)
                        yield delta
                        if finished:
                            break
                        move = flight.move
                        if move is not None and move.ready:
                            handle, stream = self._switch(flight, state, handle, stream)
                        delta = await next_output(stream)
                    break
                except InstanceLostError as lost:
                    lost_id, move = handle.instance_id, flight.move
                    handle = stream = None
                    if move is not None and move.stream is not None:
                        # The target has its copy and may be prefilling it still: let it
                        # finish and take over.
                        await held_or_failed(move)
                        move = flight.move
                    if move is not None and move.held:
                        logger.warning(
                            "instance %s lost with request %s during its migration (%s); "
                            "the target takes over", lost_id, request_id, lost,
                        )  # fmt: skip
                        self._release(state, lost_id, request=False)  # it goes on there
                        try:
                            handle, stream = self._switch(flight, state, None, None)
                            continue
                        except InstanceLostError:  # the target too: resumed below
                            self._release(state, None)
                    else:
                        self._abandon(flight, state)  # (still finding a target: off)
                        self._release(state, lost_id)
                    if flight.suspect and self._suspects.get(lost_id) == {request_id}:
                        self._quarantine_request(flight, fingerprint, lost_id, resumes + 1)
                    resumes += 1
                    spec = self._resumable(model, lost, resumes)
                    flight.lost_at = len(entry.token_ids)
                    if resumes >= SUSPECT_AFTER and not flight.suspect:
                        flight.suspect = True
                        logger.warning(
                            "request %s lost its instance %d times: it runs where no other "
                            "suspect does until it passes token %d",
                            request_id, resumes, flight.lost_at + 1,
                        )  # fmt: skip
                    logger.warning(
                        "instance %s lost with request %s after %d tokens (%s); resuming it on "
                        "another instance (%d of %d)",
                        lost_id, request_id, len(entry.token_ids), lost, resumes, MAX_RESUMES,
                    )  # fmt: skip
                    deadline = self._clock.now() + spec.request_timeout_s
                    if self._on_resume is not None:
                        self._on_resume(model)
            finish_reason = entry.finish_reason
        except StopAsyncIteration:
            finish_reason = entry.finish_reason or "abort"
        finally:
            self._land(flight)
            self._abandon(flight, state)
            if handle is not None:
                self._release(state, handle.instance_id)
            if stream is not None and not finished:
                self._spawn(self._close(handle, stream, request_id))
            self.journal.close(entry, finish_reason)

    # --- live migration ------------------------------------------------------------------------

    def migrate(self, instance_id: str, deadline_s: float | None = None) -> int:
        """Move every request streaming from `instance_id` to other instances of its
        deployment, live (module docstring), done `deadline_s` from now at the latest (the
        preemption notice's); returns how many moves started."""
        until = None if deadline_s is None else self._clock.now() + deadline_s
        started = 0
        for flight in list(self._flights.get(instance_id, {}).values()):
            if flight.move is None:
                move = flight.move = Move(until)
                move.task = asyncio.get_running_loop().create_task(
                    self._prepare(flight, move), name=f"migrate-{flight.request_id}"
                )
                started += 1
        if started:
            logger.info("migrating %d requests off instance %s", started, instance_id)
        return started

    async def _prepare(self, flight: _Flight, move: Move) -> None:
        """Find the move's target, then catch it up (`ember.migration.live.catch_up`)."""
        model, rid, source = flight.model, flight.request_id, flight.handle
        try:
            assert source is not None
            spec = self._controller.get(model)
            state = self._loads.setdefault(model, _Load())
            deadline = self._clock.now() + spec.request_timeout_s
            move.target = await self._acquire(
                model, spec, state, deadline, resuming=True, suspect=flight.suspect
            )
            state.in_flight -= 1  # a second slot, not a second request (see `_release`)
            t0 = self._clock.now()
            await catch_up(
                move, source, rid, flight.prompt, flight.params, flight.entry.token_ids,
                self.link, self._clock,
            )  # fmt: skip
            logger.info(
                "request %s ready to move from %s to %s (%d tokens held, %d with their K/V; "
                "%d behind; caught up in %.3f s)",
                rid, source.instance_id, move.target.instance_id, move.sent, move.kv_tokens,
                len(flight.entry.token_ids) - move.sent, self._clock.now() - t0,
            )  # fmt: skip
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the request stays on its source (and is resumed if it dies)
            logger.warning("migration of request %s off %s failed: %s", rid, flight.instance_id, e)
            if self._on_move_failed is not None:
                self._on_move_failed(model)
            if flight.move is move:
                flight.move = None
                self._abandon_move(move, flight, self._loads.get(model))

    def _switch(
        self, flight: _Flight, state: _Load, handle: Any, stream: AsyncIterator[StreamDelta] | None
    ) -> tuple[Any, AsyncIterator[StreamDelta]]:
        """Stop the source (`handle`, None when it died) and release the target with the ids
        and text the client has: the target's stream is the request's from now on."""
        move = flight.move
        assert move is not None and move.stream is not None
        flight.move = None
        if move.task is not None and not move.task.done():
            move.task.cancel()  # mid-round (its source died): it only waits on the relay
        entry = flight.entry
        last = release(move, entry.token_ids, entry.text)
        try:
            move.target.extend(flight.request_id, last)
        except InstanceLostError:  # the target is gone: stay on the source if it is alive
            logger.warning("migration target of request %s was lost", flight.request_id)
            if self._on_move_failed is not None:
                self._on_move_failed(flight.model)
            self._abandon_move(move, flight, state)
            if handle is None or stream is None:
                raise
            return handle, stream
        if handle is not None and stream is not None:
            self._spawn(self._close(handle, stream, flight.request_id))
            self._release(state, handle.instance_id, request=False)  # it goes on on the target
        self._fly(flight, move.target)  # (the journal entry's too)
        logger.info(
            "request %s moved to %s after %d tokens (%d sent in the last round)",
            flight.request_id, move.target.instance_id, len(entry.token_ids), len(last.token_ids),
        )  # fmt: skip
        if self._on_migrate is not None:
            self._on_migrate(flight.model, move.kv_tokens)
        return move.target, move.stream

    def _abandon(self, flight: _Flight, state: _Load) -> None:
        """End a move that did not switch (the request ended first)."""
        move, flight.move = flight.move, None
        if move is not None:
            self._abandon_move(move, flight, state)

    def _abandon_move(self, move: Move, flight: _Flight, state: _Load | None) -> None:
        if move.task is not None and not move.task.done():
            move.task.cancel()
        if move.target is not None:
            if state is not None:
                self._release(state, move.target.instance_id, request=False)
            if move.stream is not None:
                self._spawn(self._close(move.target, move.stream, flight.request_id))
            move.target = move.stream = None

    def _fly(self, flight: _Flight, handle: InstanceLike) -> None:
        self._land(flight)
        flight.handle = handle
        flight.entry.instance_id = handle.instance_id
        self._flights.setdefault(handle.instance_id, {})[flight.request_id] = flight
        if flight.suspect:
            self._suspects.setdefault(handle.instance_id, set()).add(flight.request_id)

    def _land(self, flight: _Flight) -> None:
        on = self._flights.get(flight.instance_id)
        if on is not None:
            on.pop(flight.request_id, None)
            if not on:
                del self._flights[flight.instance_id]
        self._unmark(flight)

    def _unmark(self, flight: _Flight) -> None:
        marked = self._suspects.get(flight.instance_id)
        if marked is not None:
            marked.discard(flight.request_id)
            if not marked:
                del self._suspects[flight.instance_id]

    # --- poison requests -----------------------------------------------------------------------

    def _check_quarantine(self, model: str, prompt: str | list[int], params: SamplingParams) -> str:
        """The request's fingerprint; RequestQuarantinedError if it is quarantined."""
        fingerprint = hashlib.sha256(repr((model, prompt, params)).encode()).hexdigest()
        until = self._quarantine.get(fingerprint)
        if until is not None:
            if self._clock.now() < until:
                raise RequestQuarantinedError(
                    f"this request (deployment {model!r}) made the engines it ran on fail and "
                    f"is refused for {until - self._clock.now():.0f} s more"
                )
            del self._quarantine[fingerprint]
        return fingerprint

    def _quarantine_request(
        self, flight: _Flight, fingerprint: str, lost_id: str, losses: int
    ) -> None:
        """End a suspect lost alone (module docstring): remember it, raise the error."""
        self._unmark(flight)
        while len(self._quarantine) >= QUARANTINE_MAX:
            del self._quarantine[next(iter(self._quarantine))]  # the oldest
        self._quarantine[fingerprint] = self._clock.now() + QUARANTINE_S
        logger.error(
            "request %s quarantined: lost with its instance %d times, the last (%s) as the "
            "only suspect there; not resumed again, refused for %.0f s if sent again",
            flight.request_id, losses, lost_id, QUARANTINE_S,
        )  # fmt: skip
        if self._on_quarantine is not None:
            self._on_quarantine(flight.model)
        raise RequestQuarantinedError(
            f"request {flight.request_id!r} was lost with its instance {losses} times, the last "
            f"time as the only suspect there: it is not resumed again, since it may be what "
            f"makes the engine fail"
        )

    def _clear_suspect(self, flight: _Flight, state: _Load) -> None:
        """A suspect streamed past where it was last lost: it runs anywhere again."""
        self._unmark(flight)
        flight.suspect = False
        state.notify()  # a suspect waiting for this instance may go there now
        logger.info(
            "request %s passed token %d on %s: no longer suspected",
            flight.request_id, flight.lost_at + 1, flight.instance_id,
        )  # fmt: skip

    def _resumable(self, model: str, lost: InstanceLostError, resumes: int) -> DeploymentSpec:
        """The deployment's spec when a request its instance lost may be resumed; else `lost`
        is raised again (too many resumes, or the deployment was deleted)."""
        if resumes > MAX_RESUMES:
            raise lost
        try:
            return self._controller.get(model)
        except ModelNotFoundError:
            raise lost from None

    async def _first_delta(
        self, stream: AsyncIterator[StreamDelta], deadline: float, spec: DeploymentSpec
    ) -> StreamDelta:
        remaining = max(deadline - self._clock.now(), 0.001)
        try:
            return await asyncio.wait_for(anext(stream), remaining)
        except TimeoutError:
            raise RequestTimeoutError(
                f"no output within request_timeout_s={spec.request_timeout_s} "
                f"for deployment {spec.name!r}"
            ) from None

    def _record(self, entry: JournalEntry, delta: StreamDelta) -> bool:
        self.journal.record(entry, delta)
        return delta.finished

    async def _acquire(
        self,
        model: str,
        spec: DeploymentSpec,
        state: _Load,
        deadline: float,
        resuming: bool = False,
        suspect: bool = False,
    ) -> Any:
        """A ready instance with a free slot, taken in FIFO order; see the module docstring. A
        request `resuming` after its instance was lost goes to the head of the line (it was
        admitted already and its client is waiting mid-stream); a `suspect` waits aside for an
        instance where no other suspect runs (it would block the line)."""
        if suspect:
            return await self._acquire_aside(model, spec, state, deadline)
        if not state.line:
            handle = self._pick(model, spec, state)
            if handle is not None:
                return handle
        if len(state.line) >= spec.max_queue and not resuming:
            raise QueueFullError(
                f"deployment {model!r} has {len(state.line)} requests queued "
                f"(max_queue={spec.max_queue}); retry later"
            )
        ticket = object()
        if resuming:
            state.line.appendleft(ticket)
        else:
            state.line.append(ticket)
        try:
            while True:
                if state.line[0] is ticket:
                    handle = self._pick(model, spec, state)
                    if handle is not None:
                        state.line.popleft()
                        state.notify()  # the next in line may find a slot too
                        return handle
                await self._wait(model, spec, state, deadline, "in the queue of", "an instance")
        finally:
            if ticket in state.line:
                state.line.remove(ticket)
                state.notify()

    async def _acquire_aside(
        self, model: str, spec: DeploymentSpec, state: _Load, deadline: float
    ) -> Any:
        state.aside += 1
        try:
            while True:
                handle = self._pick(model, spec, state, suspect=True)
                if handle is not None:
                    return handle
                await self._wait(
                    model, spec, state, deadline, "for an instance of", "another suspect there"
                )
        finally:
            state.aside -= 1

    async def _wait(
        self, model: str, spec: DeploymentSpec, state: _Load, deadline: float, where: str,
        without: str,
    ) -> None:  # fmt: skip
        """One wait of a request for an instance: for a cold start while the deployment has
        none ready, else for a slot to free; RequestTimeoutError past `deadline`."""
        remaining = deadline - self._clock.now()
        if remaining <= 0:
            raise RequestTimeoutError(
                f"request waited request_timeout_s={spec.request_timeout_s} {where} "
                f"deployment {model!r} without {without}"
            )
        if not self._controller.ready_instances(model):
            await self._wait_for_instance(model, state, remaining)
        else:
            await _wait_event(state.changed, min(remaining, POLL_INTERVAL_S))

    async def _wait_for_instance(self, model: str, state: _Load, remaining: float) -> None:
        if not state.waking:
            state.waking = True
            if self._on_cold_start is not None:
                self._on_cold_start(model)
            logger.info("cold start deployment=%s queued=%d", model, len(state.line))
        self._controller.wake(model)
        try:
            await self._controller.wait_for_instance(model, min(remaining, 1.0))
        except RequestTimeoutError:
            pass  # the caller re-checks its own deadline
        except Exception:  # start failed or deployment deleted: the next wake is a new cold start
            state.waking = False
            raise

    def _pick(self, model: str, spec: DeploymentSpec, state: _Load, suspect: bool = False) -> Any:
        """Least-loaded ready instance below its slot cap (ties rotate), for a `suspect` one
        where no suspect runs; takes the slot. An instance on a node under a preemption notice
        (one started there because no other node had room) comes last: a request, or a move's
        target, placed there would have to move again or be lost with the node."""
        ready = self._controller.ready_instances(model)
        if ready:
            state.waking = False
        noticed = self._controller.noticed() if ready else {}
        best: Any = None
        best_key: tuple[bool, int, int] | None = None
        n = len(ready)
        for i, handle in enumerate(ready):
            count = state.per_instance.get(handle.instance_id, 0)
            if count >= spec.max_num_seqs or (suspect and handle.instance_id in self._suspects):
                continue
            key = (getattr(handle, "node_id", None) in noticed, count, (i - state.turn) % n)
            if best_key is None or key < best_key:
                best, best_key = handle, key
        if best is not None:
            state.turn += 1
            state.per_instance[best.instance_id] = state.per_instance.get(best.instance_id, 0) + 1
            state.in_flight += 1
        return best

    def _release(self, state: _Load, instance_id: str | None, request: bool = True) -> None:
        """Give back a slot on `instance_id` (None: none) and, with `request`, the request's
        count in `in_flight` (a moving request holds two slots but counts once)."""
        if request:
            state.in_flight -= 1
        if instance_id is not None:
            left = state.per_instance.get(instance_id, 0) - 1
            if left > 0:
                state.per_instance[instance_id] = left
            else:
                state.per_instance.pop(instance_id, None)
        assert state.in_flight >= 0, "router in-flight count went negative"
        state.notify()

    async def _close(
        self, handle: Any, stream: AsyncIterator[StreamDelta], request_id: str
    ) -> None:
        """Stop an unfinished request on its instance (closing the stream aborts it too)."""
        try:
            aclose = getattr(stream, "aclose", None)
            if aclose is not None:
                await aclose()
            await handle.abort(request_id)
        except Exception:  # the instance may be gone already; nothing is left to abort then
            logger.debug("abort of %s failed", request_id, exc_info=True)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        # Cleanup runs in its own task so a cancelled caller (client gone) cannot interrupt it.
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def drain_background(self) -> None:
        """Wait for pending abort tasks (tests and shutdown)."""
        while self._background:
            await asyncio.gather(*list(self._background), return_exceptions=True)


async def _wait_event(event: asyncio.Event, timeout_s: float) -> None:
    try:
        await asyncio.wait_for(event.wait(), timeout_s)
    except TimeoutError:
        pass
