"""Test support for the node store: a real S3-compatible server (moto in server mode) on
127.0.0.1, and a TCP relay in front of it that can throttle or cut connections mid-transfer."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

from ember.store.remote import RemoteConfig

CREDENTIALS = {"access_key_id": "testing", "secret_access_key": "testing", "region": "us-east-1"}


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """An S3 API server on 127.0.0.1; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def remote_config(endpoint: str, **kw: object) -> RemoteConfig:
    return RemoteConfig(endpoint_url=endpoint, **CREDENTIALS, **kw)  # type: ignore[arg-type]


class Relay:
    """127.0.0.1 TCP relay to `target`. `budget_bytes` caps the bytes sent back to clients in
    total; once spent, every connection is cut and new ones are refused (a server that died
    mid-transfer) until `heal()`. `cut_once_at` cuts the connections open at that point but
    keeps serving (a network blip). `delay_s` sleeps per 64 KiB relayed (a slow link)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.budget_bytes: int | None = None
        self.cut_once_at: int | None = None  # cut every connection once, past this many bytes
        self.delay_s = 0.0
        self.down = False
        self.sent = 0
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def heal(self) -> None:
        with self._lock:
            self.budget_bytes, self.down = None, False

    def close(self) -> None:
        self._stop = True
        self._listener.close()
        self._cut_all()

    def _cut_all(self) -> None:
        with self._lock:
            socks, self._socks = self._socks, []
        for s in socks:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
                s.close()

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            if self.down:
                client.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self._lock:
                self._socks += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, counted: bool) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                if counted:
                    with self._lock:
                        budget = self.budget_bytes
                        if budget is not None and self.sent + len(data) > budget:
                            data = data[: max(0, budget - self.sent)]
                            self.down = True
                        self.sent += len(data)
                        cut = self.cut_once_at is not None and self.sent >= self.cut_once_at
                        if cut:
                            self.cut_once_at = None
                    if cut:
                        self._cut_all()
                        return
                    if self.delay_s:
                        time.sleep(self.delay_s)
                dst.sendall(data)
                if self.down:
                    self._cut_all()
                    return
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)
