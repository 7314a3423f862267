"""A moving request's K/V, straight from its source instance to its target.

The source's runner reads the K/V out between two steps (`Engine.export_kv`) and shelves the
bytes here (`KvShelf.put`) instead of handing them back; what travels through the API process
is a `KvTicket`: the shelf's address, a one-time secret and the K/V's shape. The target's
runner pulls the bytes with it (`pull_kv`) on a thread of its own, so its engine keeps stepping
the requests it serves, and then resumes the request with them. The K/V cross the network once,
source node to target node, instead of twice through the API server, whose event loop (every
client's stream) no longer deserializes and re-serializes them.

A ticket is good for one pull within SHELF_TTL_S; the shelf drops the bytes once sent or
expired. A pull that fails (the source died, the ticket expired or was taken, a short read, a
size that does not match the shape) raises KvPullError, and the target recomputes those tokens
instead, as when no K/V came: a move never waits on, nor trusts, a broken transfer.

The wire, one connection per pull: the client sends the ticket's id (16 ASCII bytes) and secret
(16 bytes); the server answers b"\\x01", the byte count (8 bytes, big-endian) and the bytes, or
b"\\x00" and closes (unknown, expired, already taken or a wrong secret: one answer for all).
"""

from __future__ import annotations

import hmac
import logging
import math
import secrets
import socket
import struct
import threading
import time
from dataclasses import dataclass

from ember.controller.types import KvBlob, KvTicket
from ember.errors import KvPullError
from ember.netio import recv_exact, serve_each

logger = logging.getLogger(__name__)

# How long a shelved K/V waits for its target (seconds): a move's target asks as soon as it has
# the ticket, so anything older belongs to a move that ended another way.
SHELF_TTL_S = 120.0
# How long a pull may wait for a connection, and for each next piece of the bytes (seconds).
CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 15.0
ID_BYTES = 16  # hex characters of a ticket's id
SECRET_BYTES = 16
_LENGTH = struct.Struct("!Q")
# Bytes per element of the dtypes a K/V cache may have (torch's names; this module, like the
# router that carries tickets, does not import torch).
ITEMSIZE = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "float8_e4m3fn": 1, "float8_e5m2": 1,
}  # fmt: skip


@dataclass(slots=True)
class _Shelved:
    secret: bytes
    blob: KvBlob
    expires: float


class KvShelf:
    """The source side: K/V waiting for their targets, served on `host` (the node's address)
    by a listener thread that opens at the first `put`."""

    def __init__(self, host: str) -> None:
        self.host = host
        self._lock = threading.Lock()
        self._shelf: dict[str, _Shelved] = {}
        self._listener: socket.socket | None = None
        self._closed = False

    @property
    def port(self) -> int:
        return 0 if self._listener is None else int(self._listener.getsockname()[1])

    def put(self, blob: KvBlob) -> KvTicket:
        """Shelve `blob` for one pull; the ticket names it."""
        with self._lock:
            if self._closed:
                raise KvPullError("the K/V shelf is closed")
            if self._listener is None:
                self._listener = socket.create_server((self.host, 0))
                threading.Thread(
                    target=serve_each, args=(self._listener, self._send, "ember-kv-send"),
                    name="ember-kv-shelf", daemon=True,
                ).start()  # fmt: skip
            self._sweep()
            ticket_id = secrets.token_hex(ID_BYTES // 2)
            secret = secrets.token_bytes(SECRET_BYTES)
            self._shelf[ticket_id] = _Shelved(secret, blob, time.monotonic() + SHELF_TTL_S)
            port = int(self._listener.getsockname()[1])
        return KvTicket(self.host, port, ticket_id, secret, blob.shape, blob.dtype, len(blob.data))

    def held(self) -> int:
        """How many shelved K/V are waiting (expired ones dropped first)."""
        with self._lock:
            self._sweep()
            return len(self._shelf)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._shelf.clear()
            listener, self._listener = self._listener, None
        if listener is not None:
            try:
                listener.shutdown(socket.SHUT_RDWR)  # wakes the thread blocked in accept
            except OSError:
                pass
            listener.close()

    def _sweep(self) -> None:
        now = time.monotonic()
        for ticket_id in [t for t, s in self._shelf.items() if s.expires <= now]:
            del self._shelf[ticket_id]
            logger.info("K/V shelf: ticket %s expired unpulled", ticket_id)

    def _take(self, ticket_id: str, secret: bytes) -> KvBlob | None:
        with self._lock:
            self._sweep()
            shelved = self._shelf.get(ticket_id)
            if shelved is None or not hmac.compare_digest(shelved.secret, secret):
                return None
            del self._shelf[ticket_id]
            return shelved.blob

    def _send(self, conn: socket.socket) -> None:
        with conn:
            try:
                conn.settimeout(READ_TIMEOUT_S)
                asked = recv_exact(conn, ID_BYTES + SECRET_BYTES)
                ticket_id = asked[:ID_BYTES].decode("ascii", "replace")
                blob = self._take(ticket_id, bytes(asked[ID_BYTES:]))
                if blob is None:
                    conn.sendall(b"\x00")
                    return
                conn.sendall(b"\x01" + _LENGTH.pack(len(blob.data)))
                conn.sendall(blob.data)
            except OSError as e:  # the target went away: it recomputes
                logger.warning("K/V shelf: a pull failed: %s", e)


def pull_kv(ticket: KvTicket) -> KvBlob:
    """The K/V `ticket` names, from its source's shelf (KvPullError if they cannot be had)."""
    where = f"{ticket.host}:{ticket.port}"
    itemsize = _itemsize(ticket.dtype)
    want = math.prod(ticket.shape) * itemsize
    if ticket.nbytes != want:
        raise KvPullError(f"K/V ticket from {where}: {ticket.nbytes} bytes for {ticket.shape}")
    try:
        with socket.create_connection((ticket.host, ticket.port), CONNECT_TIMEOUT_S) as conn:
            conn.settimeout(READ_TIMEOUT_S)
            conn.sendall(ticket.ticket_id.encode("ascii") + ticket.secret)
            if recv_exact(conn, 1) != b"\x01":
                raise KvPullError(f"{where} no longer holds K/V ticket {ticket.ticket_id}")
            (size,) = _LENGTH.unpack(recv_exact(conn, _LENGTH.size))
            if size != want:
                raise KvPullError(f"{where} sent {size} bytes of K/V; the ticket says {want}")
            data = recv_exact(conn, size)
    except OSError as e:
        raise KvPullError(f"K/V from {where}: {type(e).__name__}: {e}") from None
    return KvBlob(ticket.shape, ticket.dtype, data)


def _itemsize(dtype: str) -> int:
    size = ITEMSIZE.get(dtype)
    if size is None:
        raise KvPullError(f"K/V ticket names an unknown dtype {dtype!r}")
    return size
