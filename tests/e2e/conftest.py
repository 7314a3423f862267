"""`ember serve` as a subprocess on a free 127.0.0.1 port, for end-to-end tests.

`ember_server` (module scope) serves the demo model (`ember-demo`, random weights) with no API
keys; `start_ember_server(*extra_args, env=None, api_keys=(), admin_key=None)` starts another
one for the calling test (auth on/off, --model, a config file) and stops it afterwards. Both
give an `EmberServer`: `.url`, `.base_url` (url + "/v1" for the openai client), `.api_key`,
`.admin_key`, `.model`, `.restart()` (same port, state dir and cache), `.stop()`, `.log()`.
Each server runs in its own session; tear-down stops it with SIGINT (graceful: instances are
stopped, Ray shut down), then kills what is left of its process group.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

START_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class EmberServer:
    """One `ember serve` process (see the module docstring)."""

    state_dir: Path
    cache_dir: Path
    log_path: Path
    extra_args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    api_keys: tuple[str, ...] = ()
    admin_key: str | None = None
    model: str = "ember-demo"
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    @property
    def api_key(self) -> str | None:
        return self.api_keys[0] if self.api_keys else None

    def command(self) -> list[str]:
        cmd = [sys.executable, "-m", "ember", "serve", "--host", "127.0.0.1"]
        cmd += ["--port", str(self.port), "--state-dir", str(self.state_dir)]
        cmd += ["--cache-dir", str(self.cache_dir), "--num-cpus", "4"]
        for key in self.api_keys:
            cmd += ["--api-key", key]
        if self.admin_key is not None:
            cmd += ["--admin-key", self.admin_key]
        return cmd + list(self.extra_args)

    def start(self) -> EmberServer:
        env = {**os.environ, **self.env}
        env.pop("RAY_ADDRESS", None)  # never join a cluster a test started in this process
        # The server runs as a user starts it: without the variable that makes Ray keep to
        # loopback (tests/conftest.py sets it for the Ray instances tests start in-process).
        # `ember serve` must keep its private Ray on 127.0.0.1 by itself.
        # Likewise the pool of pre-started workers: on, at its default size, as `ember serve`
        # runs it (tests/conftest.py turns it off for the clusters tests start in-process).
        for name in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "EMBER_WORKER_POOL_SIZE"):
            if name not in self.env:
                env.pop(name, None)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ember serve exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health", timeout=2.0).status_code == 200:
                    return self
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(
            f"ember serve did not answer /health in {START_TIMEOUT_S} s:\n{self.log()}"
        )

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)  # Ray processes the server left behind, if any

    def restart(self) -> EmberServer:
        self.stop()
        return self.start()

    def log(self, tail_chars: int = 6000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail_chars:]
        except FileNotFoundError:
            return ""


def _new_server(root: Path, extra_args: tuple[str, ...], **kw: object) -> EmberServer:
    root.mkdir(parents=True, exist_ok=True)
    return EmberServer(
        state_dir=root / "state",
        cache_dir=root / "cache",
        log_path=root / "serve.log",
        extra_args=extra_args,
        **kw,  # type: ignore[arg-type]
    )


@pytest.fixture(scope="module")
def ember_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmberServer]:
    server = _new_server(tmp_path_factory.mktemp("ember-serve"), ())
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def start_ember_server(tmp_path: Path) -> Iterator[Callable[..., EmberServer]]:
    started: list[EmberServer] = []

    def start(
        *extra_args: str,
        env: dict[str, str] | None = None,
        api_keys: tuple[str, ...] = (),
        admin_key: str | None = None,
    ) -> EmberServer:
        server = _new_server(
            tmp_path / f"server-{len(started)}",
            tuple(extra_args),
            env=dict(env or {}),
            api_keys=tuple(api_keys),
            admin_key=admin_key,
        )
        started.append(server)
        return server.start()

    try:
        yield start
    finally:
        for server in started:
            server.stop()
