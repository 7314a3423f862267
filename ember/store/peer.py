"""Checkpoints fetched from a neighbour: one node's store serves the copies it holds (in DRAM or
on SSD, or still arriving from the remote store) to the other nodes' stores over plain TCP, so a model another server already
holds reaches this one at the speed of the link between them, not of the remote store (and
without a second download billed by the cloud).

The wire: the client sends a 4-byte big-endian length and a JSON request
`{"token", "key", "op", ...}`; the server answers an 8-byte signed big-endian length n, then n
bytes (n >= 0) or, for n < 0, a UTF-8 error message of -n bytes. Ops: `files` (the copy's file
names as JSON, less its dot files: the tier's bookkeeping), `file` (one whole file) and `range`
(`file`, `offset`, `nbytes`: the bytes sent with `sendfile` from the tier's file, no copy
through this process). One range per connection, as a ranged GET is one request.

Trust: the requester holds the authoritative index (read from the remote store) and only takes a
peer whose `index.json` is the same bytes; every chunk is then verified against that index's
checksums like any fetch (`ember.store.fetch`), so a peer can be slow or gone but cannot
hand over wrong bytes that count. The token (random per serving store, handed out only through
the cluster's own channel) keeps anyone else on the network from reading checkpoints. A copy
evicted on the peer mid-fetch ends its next request with an error; the fetch then goes on from
the remote store (`run_fetch(..., fallback=)`), keeping every chunk already verified.

A peer still fetching the checkpoint from the remote store offers it too (last): its server
streams a range's bytes as the blocks under them are verified there (its `.progress`), so nodes
waking the same model at once read it from the remote store once, not once each; it gives up
(and the requester falls back) only if that fetch stops making progress. Only fetches from
the remote store are offered, so two nodes never wait on each other.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import mmap
import os
import secrets
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from ember.errors import CheckpointError
from ember.netio import recv_exact, recv_into, serve_each
from ember.store.fetch import PROGRESS_FILE, is_partition, progress_layout
from ember.store.format import INDEX_FILE, read_index

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 2.0
IO_TIMEOUT_S = 30.0  # a peer that sends nothing for this long is given up on
# How long a range of a copy still being fetched waits for its next blocks while that fetch
# makes no progress (under IO_TIMEOUT_S, so the peer gives up before its client does).
WAIT_FETCHED_S = 25.0
MAX_REQUEST_BYTES = 64 << 10
OFFER_ORDER = ("dram", "ssd", "fetching")  # the offers' tiers, the one to take first first


class PeerError(CheckpointError):
    """A peer's copy cannot be read: the peer refused (gone, evicted, another version) or the
    connection failed. The message names the peer."""


@dataclass(frozen=True, slots=True)
class PeerOffer:
    """A node's answer to "do you hold this checkpoint?": where to ask for it."""

    node: str  # shown in logs and errors
    tier: str  # OFFER_ORDER: "fetching" is a fetch from the remote store still running there
    host: str
    port: int
    token: str


class PeerServer:
    """Serves the copies `resolve(key)` finds (None: not held; a copy still being fetched is
    served as its blocks arrive) to peers, one thread per connection. Bound to `host` (the node's address in the cluster; 127.0.0.1 on one
    machine) and `port` (0: any free one)."""

    def __init__(self, resolve: Callable[[str], Path | None], host: str, port: int = 0) -> None:
        self._resolve = resolve
        self.token = secrets.token_hex(16)
        self._listener = socket.create_server((host, port))
        self.host, self.port = host, self._listener.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, name="ember-peer-server", daemon=True).start()
        logger.info("peer server listening on %s:%d", self.host, self.port)

    def offer(self, node: str, tier: str) -> PeerOffer:
        return PeerOffer(node, tier, self.host, self.port, self.token)

    def close(self) -> None:
        self._closed = True
        with contextlib.suppress(OSError):
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept
        with contextlib.suppress(OSError):
            self._listener.close()

    def _accept(self) -> None:
        serve_each(self._listener, self._serve, "ember-peer-send", lambda: self._closed)

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.settimeout(IO_TIMEOUT_S)
                (size,) = struct.unpack("!I", recv_exact(conn, 4))
                if size > MAX_REQUEST_BYTES:
                    raise ValueError(f"request of {size} bytes")
                req = json.loads(recv_exact(conn, size))
                if not hmac.compare_digest(str(req.get("token", "")), self.token):
                    raise ValueError("bad token")
                self._answer(conn, req)
            except _Refused as e:
                _send_error(conn, str(e))
            except _Cut as e:
                logger.warning("peer answer cut short: %s", e)
            except (OSError, ValueError, KeyError, TypeError) as e:
                logger.warning("peer request refused: %s", e)
                with contextlib.suppress(OSError):
                    _send_error(conn, f"bad request: {e}")
            except Exception as e:  # e.g. a copy's index unreadable: the peer is told why
                logger.exception("peer request failed")
                with contextlib.suppress(OSError):
                    _send_error(conn, f"cannot serve it: {e}")

    def _answer(self, conn: socket.socket, req: dict[str, object]) -> None:
        key, op = str(req["key"]), req["op"]
        directory = self._resolve(key)
        if directory is None:
            raise _Refused(f"no copy of {key} here")
        if op == "files":
            names = sorted(p.name for p in directory.iterdir() if not p.name.startswith("."))
            return _send_bytes(conn, json.dumps(names).encode())
        name = str(req["file"])
        if "/" in name or name.startswith(".") or not name:
            raise _Refused(f"no file {name!r}")
        try:
            f = open(directory / name, "rb")  # noqa: SIM115 - closed below
        except FileNotFoundError:
            raise _Refused(f"no file {name} in the copy of {key} (evicted?)") from None
        with f:
            size = os.fstat(f.fileno()).st_size
            if op == "file":
                offset, nbytes = 0, size
            elif op == "range":
                offset, nbytes = int(str(req["offset"])), int(str(req["nbytes"]))
                if offset < 0 or nbytes < 0 or offset + nbytes > size:
                    raise _Refused(f"range [{offset}, {offset + nbytes}) outside {name} ({size})")
            else:
                raise _Refused(f"unknown op {op!r}")
            marks = _marks_of(directory, name) if op == "range" else None
            conn.sendall(struct.pack("!q", nbytes))
            for start, n in _as_fetched(marks, offset, nbytes):
                if conn.sendfile(f, start, n) != n:  # os.sendfile: no copy through this process
                    raise OSError(f"{name} ended before byte {start + n}")


class _Refused(Exception):
    pass


@dataclass(frozen=True, slots=True)
class _Marks:
    """Where a file's blocks are marked in a copy's `.progress`."""

    progress: Path
    first: int  # the file's first block
    block_bytes: int


def _marks_of(directory: Path, name: str) -> _Marks | None:
    """A copy whose fetch may still be running: where `name`'s blocks are marked (read before
    an answer begins, so an unreadable index is refused with its reason). None: no progress
    file, nothing to wait for."""
    progress = directory / PROGRESS_FILE
    if not progress.exists():
        return None
    index = read_index(directory)
    first = progress_layout(index).get(name)
    return None if first is None else _Marks(progress, first, index.block_bytes)


def _as_fetched(marks_of: _Marks | None, offset: int, nbytes: int) -> Iterator[tuple[int, int]]:
    """[offset, offset + nbytes) in pieces, each as soon as the blocks under it are verified
    and written (marked in the copy's `.progress`; a complete copy has them all). Gives up
    (`_Cut`: the connection is closed mid-answer, and the requester falls back) when the fetch
    made no progress for WAIT_FETCHED_S, or ended without them (its directory removed)."""
    if marks_of is None or nbytes == 0:
        yield offset, nbytes
        return
    progress, first, block = marks_of.progress, marks_of.first, marks_of.block_bytes
    try:
        fd = os.open(progress, os.O_RDONLY)
    except FileNotFoundError:
        raise _Cut(f"the fetch of {progress.parent.name} ended") from None
    try:
        end = offset + nbytes
        last = first + (end - 1) // block + 1
        with mmap.mmap(fd, 0, prot=mmap.PROT_READ) as marks:
            pos, seen, since = offset, -1, time.monotonic()
            while pos < end:
                b = ready = first + pos // block
                while ready < last and marks[ready]:
                    ready += 1
                if ready > b:  # blocks b .. ready-1 are in: send what of them the range wants
                    upto = min(end, (ready - first) * block)
                    yield pos, upto - pos
                    pos = upto
                    continue
                done = marks[:].count(1)
                if done != seen:  # the fetch moves: wait on
                    seen, since = done, time.monotonic()
                elif time.monotonic() - since > WAIT_FETCHED_S:
                    raise _Cut(f"the fetch made no progress for {WAIT_FETCHED_S:g} s")
                if not progress.exists():
                    raise _Cut(f"the fetch of {progress.parent.name} ended before byte {pos}")
                time.sleep(0.01)
    finally:
        os.close(fd)


class _Cut(Exception):
    """An answer already begun that cannot go on: the connection is closed."""


class PeerSource:
    """A `ChunkSource` (see `ember.store.fetch`) reading one checkpoint from a peer's copy.
    `connect` checks that the peer's index is `index` (the authoritative one) and reads the
    small files at once, so only partition ranges are read later."""

    def __init__(self, offer: PeerOffer, key: str, range_bytes: int) -> None:
        self.offer, self.key, self.range_bytes = offer, key, range_bytes
        self.name = f"peer {offer.node} ({offer.host}:{offer.port}, {offer.tier})"
        self._files: dict[str, bytes] = {}

    @classmethod
    def connect(
        cls, offer: PeerOffer, key: str, index: bytes | None, range_bytes: int
    ) -> PeerSource:
        """None for `index`: the authority cannot be read; the peer's index is taken."""
        src = cls(offer, key, range_bytes)
        theirs = src._request({"op": "file", "file": INDEX_FILE})
        if index is None:
            index = theirs
        elif theirs != index:
            raise PeerError(src.name, "holds another version of the checkpoint")
        names = json.loads(src._request({"op": "files"}))
        for name in names:
            if not is_partition(name):
                src._files[name] = (
                    index if name == INDEX_FILE else src._request({"op": "file", "file": name})
                )
        return src

    def extra_files(self) -> list[str]:
        return sorted(self._files)

    def read_file(self, name: str) -> bytes:
        try:
            return self._files[name]
        except KeyError:
            raise PeerError(self.name, f"has no file {name}") from None

    def open_range(self, file: str, offset: int, nbytes: int) -> _PeerRange:
        conn, size = self._open({"op": "range", "file": file, "offset": offset, "nbytes": nbytes})
        if size != nbytes:
            conn.close()
            raise PeerError(self.name, f"sent {size} bytes of {file} for a range of {nbytes}")
        return _PeerRange(conn, self.name, file)

    def _request(self, req: dict[str, object]) -> bytes:
        conn, size = self._open(req)
        with conn:
            try:
                return bytes(recv_exact(conn, size))
            except OSError as e:
                raise PeerError(self.name, f"connection lost: {e}") from e

    def _open(self, req: dict[str, object]) -> tuple[socket.socket, int]:
        """Send one request; (the connection, positioned at the answer's bytes, their count)."""
        body = json.dumps({**req, "token": self.offer.token, "key": self.key}).encode()
        try:
            conn = socket.create_connection(
                (self.offer.host, self.offer.port), timeout=CONNECT_TIMEOUT_S
            )
        except OSError as e:
            raise PeerError(self.name, f"cannot connect: {e}") from e
        try:
            conn.settimeout(IO_TIMEOUT_S)
            conn.sendall(struct.pack("!I", len(body)) + body)
            (size,) = struct.unpack("!q", recv_exact(conn, 8))
            if size < 0:
                raise PeerError(self.name, recv_exact(conn, -size).decode(errors="replace"))
        except OSError as e:
            conn.close()
            raise PeerError(self.name, f"connection lost: {e}") from e
        except BaseException:
            conn.close()
            raise
        return conn, size


class _PeerRange:
    """One range's bytes arriving on a connection, read straight into the pipeline's buffer."""

    def __init__(self, conn: socket.socket, name: str, file: str) -> None:
        self._conn, self._name, self._file = conn, name, file

    def read_exact(self, out: memoryview) -> None:
        try:
            recv_into(self._conn, out)
        except OSError as e:
            raise PeerError(f"{self._name}/{self._file}", f"connection lost: {e}") from e

    def close(self) -> None:
        self._conn.close()


def _send_bytes(conn: socket.socket, data: bytes) -> None:
    conn.sendall(struct.pack("!q", len(data)) + data)


def _send_error(conn: socket.socket, message: str) -> None:
    data = message.encode()
    conn.sendall(struct.pack("!q", -len(data)) + data)
