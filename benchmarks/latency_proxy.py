"""A TCP proxy on 127.0.0.1 that adds a round-trip time to every request/response exchange:
the first bytes of an answer that follow bytes from the client wait `rtt_s` before they go on.
Put in front of the loopback S3 server, it stands in for a real object store's latency (a small
GET: tens of ms) without slowing the bulk of a transfer."""

from __future__ import annotations

import contextlib
import socket
import threading
import time


class LatencyProxy:
    def __init__(self, target_port: int, rtt_s: float) -> None:
        self.target_port = target_port
        self.rtt_s = rtt_s
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._stop = False
        threading.Thread(target=self._accept, daemon=True, name="latency-proxy").start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._stop = True
        self._listener.close()

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            asked = threading.Event()  # the client sent bytes the answer has not yet followed
            threading.Thread(
                target=self._pipe, args=(client, upstream, asked, False), daemon=True
            ).start()
            threading.Thread(
                target=self._pipe, args=(upstream, client, asked, True), daemon=True
            ).start()

    def _pipe(
        self, src: socket.socket, dst: socket.socket, asked: threading.Event, answers: bool
    ) -> None:
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                if not answers:
                    asked.set()
                elif asked.is_set():
                    asked.clear()
                    time.sleep(self.rtt_s)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
