"""The engine loop inside an instance actor: one background thread owns the engine.

Owns: the `Engine` object (touched only by its thread), an inbox of add/abort commands from the
actor's event loop, where each live request's output goes, and the output channel. Output goes
one of three ways:
- the output channel (`open_channel`): a TCP connection from the caller (the instance handle in
  the API process) that the engine thread itself writes each step's packed outputs to, one
  length-prefixed pickle per step, and reads the caller's add/abort commands from between steps
  (one frame each; it sleeps in `select` on the channel and the inbox's wake-up pipe). No other
  Python thread of the process wakes per request or per step, so the engine keeps the GIL: each
  wake-up of another thread (asyncio loop, Ray's reporting threads) costs the engine several
  times the woken thread's own work (docs/serving.md, "Serving overhead"). Requests submitted
  with a sink while a channel is connected use it too.
- on the event-loop side, a request's own asyncio queue, or a sink callback shared by many
  requests (the actor's multiplexed Ray stream). These outputs cross to the event loop in
  batches: at most one `call_soon_threadsafe` per FLUSH_INTERVAL_S.
The thread sleeps when the engine has no work.

A live migration's K/V leave a source runner that shares them (`share_kv`) on its shelf
(`ember.migration.kv_link`): `export` answers with a ticket, not the bytes. A target runner given
a `Continuation` with such a ticket pulls the bytes on a thread of its own and adds the request
when they are here (or, if the pull fails, without them: its tokens are recomputed); an abort
meanwhile ends it at once.

Invariants: only the engine thread calls the engine and writes to the channel; only the event
loop touches the queues and sinks; a request receives exactly one finished delta or one
exception, then nothing.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import hmac
import logging
import os
import pickle
import secrets
import select
import socket
import struct
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ember.controller.types import (
    Continuation,
    DeploymentSpec,
    Extension,
    KvBlob,
    KvTicket,
    StreamDelta,
)
from ember.migration.kv_link import KvShelf, pull_kv
from ember.migration.transfer import MoveLink, export_for_move
from ember.netio import recv_exact

if TYPE_CHECKING:
    from ember import SamplingParams
    from ember.engine.engine import Engine

logger = logging.getLogger(__name__)

# The least time between two hand-overs of engine output to the event loop, in seconds. A fast
# engine (steps shorter than this) has its steps batched: one loop wake-up and one Ray object per
# interval instead of per step, so the serving work does not steal the engine's CPU and GIL.
# Adds at most this much to a token's latency under load, nothing to an idle runner's first one.
FLUSH_INTERVAL_S = 0.005

# How long an opened channel waits for its caller to connect, and how long a blocked write to it
# may take before the engine gives the channel up (its reader is gone or stuck), in seconds.
CHANNEL_ACCEPT_S = 30.0
CHANNEL_SEND_TIMEOUT_S = 30.0
CHANNEL_TOKEN_BYTES = 32
FRAME_HEADER = struct.Struct("!I")  # a frame: its length, then a pickled list of packed rows

Item = StreamDelta | BaseException
Sink = Callable[[str, Item], None]  # (request_id, delta or error), called on the event loop


def node_cache_dir(cache_root: str | Path) -> Path:
    """This machine's cache of converted checkpoints under `cache_root`, named by host name
    (`cache_root` may be on a file system several machines share). It was keyed by Ray node
    id, which is new at every start of a private Ray: each `ember serve` run converted its
    models again into a directory of its own, left the old ones on disk, and gave the node
    store a new source path, so a restarted server never found them in its DRAM tier."""
    from ember.store.tiers import host_dir_name

    return Path(cache_root).expanduser() / "nodes" / host_dir_name()


def prepare_checkpoint(spec: DeploymentSpec, cache_root: str, node_id: str) -> tuple[Path, str]:
    """An ember checkpoint for `spec` on this node, converting the source once if needed, and
    the tier it came from (`InstanceReady.tier`: the node store's, or "disk").

    Instances starting together on one node take a file lock, so the source is converted
    once and the second instance finds the finished checkpoint.
    """
    if spec.source.startswith("s3://"):  # fetched (S3 -> SSD -> DRAM) by this node's store
        from ember.cluster.node_store_actor import fetch_on_this_node
        from ember.errors import DeploymentError

        report = fetch_on_this_node(spec.source)
        if report is None:
            raise DeploymentError(f"{spec.source}: node {node_id[:12]} runs no node store")
        return Path(report.path), report.served_from
    import fcntl

    from ember.engine.checkpoint import resolve
    from ember.engine.config import DTYPE_NAMES

    cache = node_cache_dir(cache_root)
    cache.mkdir(parents=True, exist_ok=True)
    os.environ["EMBER_CACHE_DIR"] = str(cache)
    want = DTYPE_NAMES.get(spec.dtype, spec.dtype)
    with open(cache / ".convert.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return resolve(spec.source, spec.tp, None if want == "auto" else want), "disk"


class EngineRunner:
    """Steps one engine on a background thread and fans its outputs out to per-request queues."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._inbox: deque[tuple[str, str, Any, Any]] = deque()
        # The output channel's connection (set by its accept thread, written by the engine
        # thread only) and the requests whose output goes there (added on the event loop before
        # their "add" command, removed by the engine thread after their last item).
        self._channel: socket.socket | None = None
        self._channel_ids: set[str] = set()
        self._channel_lock = threading.Lock()  # one frame at a time (a broken engine's errors)
        self._rx = bytearray()  # the channel's bytes read but not yet a whole command frame
        # Channel requests aborted whose end the engine has yet to report (its next step), and
        # the channel's commands held until then because one reuses such an id.
        self._aborting: set[str] = set()
        self._held: list[tuple[Any, ...]] = []
        # Wakes the engine thread when it sleeps (it waits on this pipe and on the channel).
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        # Closed once nothing can use them any more (the threads hold the runner while they
        # run): closing in `stop` could let a late `_notify` write into a reused fd number.
        weakref.finalize(self, _close_fds, self._wake_r, self._wake_w)
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queues: dict[str, asyncio.Queue[Item]] = {}
        self._sinks: dict[str, Sink] = {}
        # Steps' outputs not yet handed to the event loop (engine thread -> loop; see _post).
        self._pending: list[tuple[list[Item], list[str]]] = []
        self._pending_lock = threading.Lock()
        self._flush_scheduled = False
        self._last_flush_s = float("-inf")
        # A live migration's K/V: this runner's shelf for its sources (None: `export` hands the
        # bytes back) and the requests whose K/V are being pulled before they are added.
        self._kv_host: str | None = None
        self._shelf: KvShelf | None = None
        self._pulling: set[str] = set()
        self.kv_pulls = 0  # moved requests whose K/V came (pull threads count them)
        self.kv_pull_failures = 0  # ... and those whose pull failed (recomputed)
        self.steps = 0
        self.step_s = 0.0  # time inside engine.step(), summed (busy time, for stats)
        self.broken: str | None = None

    @classmethod
    def create(
        cls, spec: DeploymentSpec, checkpoint: Path, device: str = "cpu", pack_weights: bool = True
    ) -> EngineRunner:
        """An engine for `spec` on `checkpoint` (`pack_weights`: see `EngineConfig`)."""
        from ember.engine.config import EngineConfig
        from ember.engine.engine import Engine

        config = EngineConfig(
            model=str(checkpoint),
            dtype=spec.dtype,
            tensor_parallel_size=spec.tp,
            max_model_len=spec.max_model_len,
            max_num_seqs=spec.max_num_seqs,
            max_num_batched_tokens=spec.max_num_batched_tokens,
            device=device,
            pack_weights=pack_weights,
        )
        return cls(Engine(config))

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.Thread(target=self._run, name="ember-engine", daemon=True)
        self._thread.start()

    # --- event-loop side -------------------------------------------------------------------

    def submit(
        self,
        request_id: str,
        prompt: str | list[int] | Continuation,
        params: SamplingParams,
        sink: Sink | None = None,
    ) -> asyncio.Queue[Item]:
        """Queue a request for the engine (a `Continuation` resumes one another instance lost).

        Its deltas (or one exception) arrive on the returned queue, or, with `sink`, as calls
        `sink(request_id, item)`; a sink's request is released after its last item.
        """
        queue: asyncio.Queue[Item] = asyncio.Queue()
        deliver: Sink = sink if sink is not None else (lambda _rid, item: queue.put_nowait(item))
        channel = sink is not None and self._channel is not None
        if (
            request_id in self._queues
            or request_id in self._sinks
            or (request_id in self._channel_ids)
        ):
            from ember.errors import RequestError

            deliver(request_id, RequestError(f"request_id: {request_id!r} is already running"))
            return queue
        if channel:
            self._channel_ids.add(request_id)
        elif sink is not None:
            self._sinks[request_id] = sink
        else:
            self._queues[request_id] = queue
        # (After an engine error the thread stays and answers it with the error.)
        self._inbox.append(("add", request_id, prompt, params))
        self._notify()
        return queue

    def extend(self, request_id: str, extension: Extension) -> None:
        """A round of a live migration for a held request (`Engine.extend_request`); an error
        (the request is not held here) ends the request's stream."""
        self._inbox.append(("extend", request_id, extension, None))
        self._notify()

    def share_kv(self, host: str) -> None:
        """From now on `export` shelves the K/V it reads and answers with a ticket that a
        target pulls them with from `host` (this node's address), module docstring."""
        self._kv_host = host

    def export(
        self, request_id: str, link: MoveLink
    ) -> concurrent.futures.Future[KvBlob | KvTicket | None]:
        """For a live migration: the K/V of a running request's cached tokens when `link` says
        sending them beats recomputing them, else None (`ember.migration.transfer`), read
        between two steps; the request keeps running. With `share_kv`, a ticket to them. The
        future fails with RequestError for a request not running here."""
        future: concurrent.futures.Future[KvBlob | KvTicket | None] = concurrent.futures.Future()
        self._inbox.append(("export", request_id, link, future))
        self._notify()
        return future

    def abort(self, request_id: str) -> None:
        """Stop a request: its stream ends with finish_reason "abort"; the engine frees it."""
        if request_id in self._queues or request_id in self._sinks:
            self._deliver([StreamDelta(request_id, (), "", True, "abort", 0)], [request_id])
        self._inbox.append(("abort", request_id, None, None))
        self._notify()

    def open_channel(self, host: str) -> tuple[int, bytes]:
        """Listen on `host` for one connection that will carry the output of every request
        submitted with a sink from then on; returns (port, token). The caller connects and sends
        the token first; the engine thread answers one byte once the channel is in use.
        Connections without the token are closed. A newer channel replaces the current one."""
        token = secrets.token_bytes(CHANNEL_TOKEN_BYTES)
        listener = socket.create_server((host, 0))
        listener.settimeout(CHANNEL_ACCEPT_S)
        port = int(listener.getsockname()[1])
        threading.Thread(
            target=self._accept_channel, args=(listener, token), name="ember-channel", daemon=True
        ).start()
        return port, token

    def _accept_channel(self, listener: socket.socket, token: bytes) -> None:
        with listener:
            while not self._stopping:
                try:
                    conn, _ = listener.accept()
                except OSError:  # timed out: nobody came; the caller falls back or retries
                    logger.warning(
                        "output channel: no caller connected within %ss", listener.timeout
                    )
                    return
                try:
                    conn.settimeout(5.0)
                    if not hmac.compare_digest(recv_exact(conn, len(token)), token):
                        raise ConnectionError("wrong token")
                    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    # Non-blocking from here (see `_send_all`): a socket with a timeout polls
                    # before every send and receive, one more system call per step.
                    conn.setblocking(False)
                except OSError as e:
                    logger.warning("output channel: refused a connection: %s", e)
                    conn.close()
                    continue
                # The engine thread switches to it and acknowledges (one byte, written before
                # any frame), so the caller knows requests it submits from now on use it.
                self._inbox.append(("channel", "", conn, None))
                self._notify()
                return

    def release(self, request_id: str) -> None:
        self._queues.pop(request_id, None)
        self._sinks.pop(request_id, None)

    def stats(self) -> dict[str, Any]:
        return {
            "streams": len(self._queues) + len(self._sinks) + len(self._channel_ids),
            "kv_shelved": 0 if self._shelf is None else self._shelf.held(),
            "kv_pulls": self.kv_pulls,
            "kv_pull_failures": self.kv_pull_failures,
            "unfinished": self._engine.num_unfinished(),
            "steps": self.steps,
            "step_s": self.step_s,
            "prefill_tokens_per_s": self._engine.prefill_tokens_per_s,
            "broken": self.broken,
            "pid": os.getpid(),
        }

    def stop(self) -> None:
        self._stopping = True
        self._notify()
        if self._thread is not None:
            self._thread.join(timeout=10.0)
        if self._channel is not None:
            self._channel.close()  # the reader sees the stream end
        if self._shelf is not None:
            self._shelf.close()
        close = getattr(self._engine, "shutdown", None) or getattr(self._engine, "close", None)
        if close is not None:
            close()

    def _deliver(self, items: list[Item], ids: list[str]) -> None:
        for request_id, item in zip(ids, items, strict=True):
            queue = self._queues.get(request_id)
            if queue is not None:
                queue.put_nowait(item)
                continue
            sink = self._sinks.get(request_id)
            if sink is not None:
                if isinstance(item, BaseException) or item.finished:
                    del self._sinks[request_id]  # nothing may follow the last item
                sink(request_id, item)

    # --- engine thread -----------------------------------------------------------------------

    def _notify(self) -> None:
        """Wake the engine thread if it sleeps (any thread)."""
        try:
            os.write(self._wake_w, b"\0")
        except OSError:  # full: a wake-up is pending anyway; closed: stopped
            pass

    def _sleep(self) -> None:
        """Engine thread, no work: wait for a command (the inbox's pipe or the channel)."""
        fds: list[Any] = [self._wake_r]
        if self._channel is not None:
            fds.append(self._channel)
        select.select(fds, [], [])
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 4096):
                pass

    def _run(self) -> None:
        engine = self._engine
        while not self._stopping:
            items: list[Item] = []
            ids: list[str] = []
            self._drain_inbox(items, ids)
            if self.broken is None and engine.has_unfinished():
                t0 = time.perf_counter()
                try:
                    outputs = engine.step()
                except Exception as e:  # the thread's loop boundary: the engine is lost
                    # Its state (blocks half written, a rank gone) cannot be trusted: every
                    # request here ends as if the process had died, so the router resumes it
                    # elsewhere, and the instance reports itself broken (`stats`) until it is
                    # replaced (the handle marks it lost at the first such error; so does the
                    # controller's health probe).
                    logger.exception("engine step failed; the instance is lost")
                    self.broken = f"{type(e).__name__}: {e}"
                    done = set(ids)  # requests the inbox already ended (bad adds, aborts)
                    live = [
                        rid
                        for rid in (*self._queues, *self._sinks, *self._channel_ids)
                        if rid not in done
                    ]
                    lost = self._stopped()
                    self._pulling.clear()  # (their K/V, when they come, are dropped)
                    self._post([*items, *(lost for _ in live)], [*ids, *live])
                    continue  # the thread stays to answer later requests with the error
                self.steps += 1
                self.step_s += time.perf_counter() - t0
                # Outputs of channel requests go out as packed rows (`instance.pack`'s layout)
                # with no StreamDelta between: this runs for every request at every step.
                rows: list[tuple[Any, ...]] = []
                channel_ids = self._channel_ids
                for out in outputs:
                    request_id = out.request_id
                    new = tuple(out.new_token_ids)
                    lps = out.new_logprobs
                    logprobs = None if lps is None else tuple(lps)
                    if request_id in channel_ids:
                        n_prompt = len(out.prompt_token_ids)
                        row = (request_id, new, out.new_text, out.finished, out.finish_reason)
                        rows.append((*row, n_prompt, logprobs))
                        continue
                    items.append(
                        StreamDelta(
                            request_id=request_id,
                            new_token_ids=new,
                            new_text=out.new_text,
                            finished=out.finished,
                            finish_reason=out.finish_reason,
                            prompt_tokens=len(out.prompt_token_ids),
                            logprobs=logprobs,
                        )
                    )
                    ids.append(request_id)
                self._post(items, ids, rows)
            else:
                self._post(items, ids)
                self._sleep()

    def _drain_inbox(self, items: list[Item], ids: list[str]) -> None:
        """Apply the commands that came in since the last step: the event loop's inbox, then
        the channel's (the caller's requests and aborts; see `_read_channel`)."""
        while self._inbox:
            op, request_id, prompt, params = self._inbox.popleft()
            if op == "channel":
                self._switch_channel(prompt)
            elif op == "abort":
                self._abort(request_id, items, ids)
            elif op == "extend":
                self._extend(request_id, prompt, items, ids)
            elif op == "export":
                self._export(request_id, prompt, params)
            elif op == "pulled":  # (dropped if aborted while its K/V were on their way)
                if request_id in self._pulling:
                    self._pulling.discard(request_id)
                    self._add(request_id, prompt, params, items, ids)
            else:
                self._add(request_id, prompt, params, items, ids)
        if self._channel is None:
            return
        commands, self._held = [*self._held, *self._read_channel()], []
        for i, (op, request_id, *rest) in enumerate(commands):
            if op == "abort":
                self._abort(request_id, items, ids)
                continue
            if op == "extend":
                self._extend(request_id, rest[0], items, ids)
                continue
            if request_id in self._aborting:
                # The id's aborted request ends in the next step's output: start the new one
                # (and everything after it, in order) once that end has gone out.
                self._held = commands[i:]
                return
            if request_id in self._channel_ids:  # still running: refuse the new one
                from ember.errors import RequestError

                error = RequestError(f"request_id: {request_id!r} is already running")
                self._write_frame([(request_id, error)])  # the running one stays
                continue
            self._channel_ids.add(request_id)
            self._add(request_id, rest[0], rest[1], items, ids)

    def _abort_in_engine(self, request_id: str) -> None:
        try:
            self._engine.abort(request_id)
        except Exception:  # unknown or already finished: nothing to free
            logger.debug("abort of %s ignored", request_id, exc_info=True)

    def _abort(self, request_id: str, items: list[Item], ids: list[str]) -> None:
        if request_id in self._pulling:  # not in the engine yet: it ends here and now
            self._pulling.discard(request_id)
            if request_id in self._channel_ids:  # (a queue's or sink's end went out already)
                items.append(StreamDelta(request_id, (), "", True, "abort", 0))
                ids.append(request_id)
                self._aborting.add(request_id)  # (its id is reusable once that end is out)
            return
        self._abort_in_engine(request_id)
        if request_id in self._channel_ids:  # the engine reports its end in the next step
            if self.broken is None:
                self._aborting.add(request_id)
            else:  # no next step
                items.append(StreamDelta(request_id, (), "", True, "abort", 0))
                ids.append(request_id)

    def _add(
        self, request_id: str, prompt: Any, params: Any, items: list[Item], ids: list[str]
    ) -> None:
        if self.broken is not None:
            items.append(self._stopped())
            ids.append(request_id)
            return
        if isinstance(prompt, Continuation) and isinstance(prompt.kv, KvTicket):
            self._pulling.add(request_id)
            threading.Thread(
                target=self._pull, args=(request_id, prompt, params), name="ember-kv-pull",
                daemon=True,
            ).start()  # fmt: skip
            return
        try:
            if isinstance(prompt, Continuation):
                assert not isinstance(prompt.kv, KvTicket)
                self._engine.resume_request(
                    request_id,
                    prompt.prompt,
                    params,
                    prompt.output_token_ids,
                    prompt.text,
                    hold=prompt.hold,
                    kv=prompt.kv,
                )
            else:
                self._engine.add_request(request_id, prompt, params)
        except Exception as e:  # bad request: only this request fails
            items.append(e)
            ids.append(request_id)

    def _extend(self, request_id: str, ext: Extension, items: list[Item], ids: list[str]) -> None:
        if request_id in self._pulling:  # (a round before its acknowledgement): the move is off
            self._pulling.discard(request_id)
            from ember.errors import RequestError

            items.append(RequestError(f"request {request_id!r} is not held here yet"))
            ids.append(request_id)
            return
        try:
            self._engine.extend_request(request_id, ext.token_ids, ext.text, ext.release)
        except Exception as e:  # not held here (finished, aborted, unknown): end its stream
            self._abort_in_engine(request_id)
            items.append(e)
            ids.append(request_id)

    def _pull(self, request_id: str, cont: Continuation, params: Any) -> None:
        """A thread of its own: the ticket's K/V from the source, then the request is added
        (by the engine thread) with them, or without them if the pull failed."""
        ticket = cont.kv
        assert isinstance(ticket, KvTicket)
        kv: KvBlob | None = None
        t0 = time.perf_counter()
        try:
            kv = pull_kv(ticket)
            dt = time.perf_counter() - t0
            self.kv_pulls += 1
            logger.info(
                "request %s: pulled the K/V of %d tokens (%.1f MB) from %s:%d in %.3f s",
                request_id, ticket.tokens, ticket.nbytes / 1e6, ticket.host, ticket.port, dt,
            )  # fmt: skip
        except Exception as e:  # the source is gone, the ticket expired: recompute
            self.kv_pull_failures += 1
            logger.warning("request %s: no K/V from its source (%s); recomputing", request_id, e)
        self._inbox.append(("pulled", request_id, dataclasses.replace(cont, kv=kv), params))
        self._notify()

    def _export(
        self,
        request_id: str,
        link: MoveLink,
        future: concurrent.futures.Future[KvBlob | KvTicket | None],
    ) -> None:
        if self.broken is not None:
            future.set_exception(self._stopped())
            return
        try:
            blob = export_for_move(self._engine, request_id, link)
            if blob is not None and self._kv_host is not None:
                if self._shelf is None:
                    self._shelf = KvShelf(self._kv_host)
                future.set_result(self._shelf.put(blob))
                return
            future.set_result(blob)
        except Exception as e:  # finished or unknown here: the move is off
            future.set_exception(e)

    def _stopped(self) -> Exception:
        from ember.errors import InstanceLostError

        return InstanceLostError(f"the instance's engine failed: {self.broken}")

    def _read_channel(self) -> list[tuple[Any, ...]]:
        """The commands the caller wrote to the channel since the last read, without blocking:
        ("add", request_id, prompt, params) or ("abort", request_id), each one frame (a length,
        then a pickle; the connection proved itself with the token). The caller closing it ends
        the channel: its requests are aborted."""
        conn = self._channel
        assert conn is not None
        while True:
            try:
                data = conn.recv(1 << 16)
            except BlockingIOError:  # nothing more now
                break
            except OSError as e:
                self._drop_channel(f"read failed ({e})")
                return []
            if not data:
                self._drop_channel("closed by the caller")
                return []
            self._rx += data
        commands: list[tuple[Any, ...]] = []
        view = self._rx
        pos = 0
        while len(view) - pos >= FRAME_HEADER.size:
            (size,) = FRAME_HEADER.unpack_from(view, pos)
            if len(view) - pos - FRAME_HEADER.size < size:
                break
            start = pos + FRAME_HEADER.size
            commands.append(pickle.loads(view[start : start + size]))
            pos = start + size
        del self._rx[:pos]
        return commands

    def _drop_channel(self, why: str) -> None:
        """Close the channel and abort its requests: nobody reads their output (engine thread)."""
        if self._channel_ids:
            logger.warning(
                "output channel: %s; aborting its %d requests", why, len(self._channel_ids)
            )
        else:  # e.g. the API process stopping: nothing was in flight
            logger.info("output channel: %s", why)
        if self._channel is not None:
            self._channel.close()
        self._channel = None
        self._rx.clear()
        self._held.clear()
        self._aborting.clear()
        for request_id in self._channel_ids:
            self._abort_in_engine(request_id)
        self._channel_ids.clear()

    def _switch_channel(self, conn: socket.socket) -> None:
        old, self._channel = self._channel, conn
        try:
            _send_all(conn, b"\x01")
        except OSError as e:
            logger.warning("output channel: lost before use: %s", e)
            self._channel = old
            conn.close()
            return
        self._rx.clear()  # a part of the old channel's frame
        self._held.clear()
        if old is not None:
            old.close()  # its reader sees the end of its stream and fails its requests

    def _send_channel(self, rows: list[tuple[Any, ...]]) -> None:
        """Write one frame of packed rows to the channel (engine thread). If the reader is gone
        or stuck, the channel is dropped and its requests are aborted: nobody reads them."""
        for row in rows:
            if len(row) == 2 or row[3]:  # an error, or a finished delta: the request's last row
                self._channel_ids.discard(row[0])
                self._aborting.discard(row[0])
        self._write_frame(rows)

    def _write_frame(self, rows: list[tuple[Any, ...]]) -> None:
        """The frame alone: it ends nothing in `_channel_ids`."""
        conn = self._channel
        if conn is None:
            return
        data = pickle.dumps(rows, protocol=5)
        try:
            with self._channel_lock:
                _send_all(conn, FRAME_HEADER.pack(len(data)) + data)
        except OSError as e:
            self._drop_channel(f"write failed ({e})")

    def _post(
        self, items: list[Item], ids: list[str], rows: list[tuple[Any, ...]] | None = None
    ) -> None:
        """Hand a step's outputs on: those of channel requests go straight to the channel (with
        `rows`, outputs already packed for it, after them in the same frame), the rest to the
        event loop. Only the first output since the last flush wakes the loop; later steps join
        the pending batch, which the loop flushes at most once per FLUSH_INTERVAL_S (an idle
        runner's next output is flushed at once)."""
        from ember.cluster.instance import pack

        if self._channel_ids and items:
            sent: list[tuple[Any, ...]] = []
            kept: list[tuple[str, Item]] = []
            for rid, it in zip(ids, items, strict=True):
                if rid in self._channel_ids:
                    sent.append(pack(rid, it))
                else:
                    kept.append((rid, it))
            if sent:
                rows = [*sent, *rows] if rows else sent
                ids, items = [rid for rid, _ in kept], [it for _, it in kept]
        if rows:
            self._send_channel(rows)
        loop = self._loop
        if not items or loop is None or loop.is_closed():
            return
        with self._pending_lock:
            self._pending.append((items, ids))
            if self._flush_scheduled:
                return
            self._flush_scheduled = True
        loop.call_soon_threadsafe(self._schedule_flush)

    def _schedule_flush(self) -> None:
        assert self._loop is not None
        delay_s = self._last_flush_s + FLUSH_INTERVAL_S - self._loop.time()
        if delay_s > 0:
            self._loop.call_later(delay_s, self._flush)
        else:
            self._flush()

    def _flush(self) -> None:
        with self._pending_lock:
            pending, self._pending = self._pending, []
            self._flush_scheduled = False
        assert self._loop is not None
        self._last_flush_s = self._loop.time()
        for items, ids in pending:
            self._deliver(items, ids)


def _send_all(conn: socket.socket, data: bytes) -> None:
    """`sendall` for the channel's non-blocking socket: wait for room only when the socket's
    buffer is full (the reader fell behind), at most CHANNEL_SEND_TIMEOUT_S in all."""
    view = memoryview(data)
    deadline = None
    while view:
        try:
            view = view[conn.send(view) :]
            continue
        except BlockingIOError:
            pass
        now = time.monotonic()
        if deadline is None:
            deadline = now + CHANNEL_SEND_TIMEOUT_S
        if now >= deadline:
            raise TimeoutError(f"the channel's reader took no data for {CHANNEL_SEND_TIMEOUT_S} s")
        select.select([], [conn], [], deadline - now)


def _close_fds(*fds: int) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
