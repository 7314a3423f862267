"""Blocking socket helpers shared by ember's small TCP servers and their clients (the peer
checkpoint server, the K/V shelf, the instance's output channel): exact reads, and a listener
that serves each connection on a thread of its own. Standard library only."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable


def recv_into(conn: socket.socket, out: memoryview) -> None:
    """Fill `out` from `conn` (ConnectionError if the peer closes first)."""
    done = 0
    while done < len(out):
        n = conn.recv_into(out[done:])
        if n == 0:
            raise ConnectionError(f"closed after {done} of {len(out)} bytes")
        done += n


def recv_exact(conn: socket.socket, nbytes: int) -> bytearray:
    """The next `nbytes` bytes from `conn` (ConnectionError if the peer closes first)."""
    buf = bytearray(nbytes)
    recv_into(conn, memoryview(buf))
    return buf


def serve_each(
    listener: socket.socket,
    handle: Callable[[socket.socket], None],
    name: str,
    closed: Callable[[], bool] = lambda: False,
) -> None:
    """Accept connections on `listener` until it is closed (or `closed()` holds), each handled
    by `handle(conn)` on a daemon thread called `name`. Runs on the caller's thread."""
    while not closed():
        try:
            conn, _ = listener.accept()
        except OSError:  # the listener was closed
            return
        threading.Thread(target=handle, args=(conn,), name=name, daemon=True).start()
