"""`ember serve` as a subprocess for the benchmarks that measure it from outside: a free port on
127.0.0.1, a baseline tree checked out beside this one, a check that the interpreter imports
the tree under test, waiting for `/health`, and a clean stop."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def worktree(repo: Path, ref: str, where: Path) -> Iterator[Path]:
    """`repo` at `ref`, checked out at `where` (a git worktree) for as long as the block runs."""
    subprocess.run(
        ["git", "-C", str(repo), "worktree", "add", "--detach", str(where), ref],
        check=True, capture_output=True,
    )  # fmt: skip
    try:
        yield where
    finally:
        subprocess.run(
            ["git", "-C", str(repo), "worktree", "remove", "--force", str(where)],
            check=False, capture_output=True,
        )  # fmt: skip


def check_tree(python: Path | str, tree: Path, env: dict[str, str], cwd: Path) -> None:
    """Refuse to measure the wrong code: `python` must import `ember` from `tree` (the project's
    editable install puts its own finder ahead of PYTHONPATH, in every process Ray starts too)."""
    where = subprocess.run(
        [str(python), "-c", "import ember; print(ember.__file__)"],
        env=env, capture_output=True, text=True, check=True, cwd=cwd,
    ).stdout.strip()  # fmt: skip
    if not Path(where).resolve().is_relative_to(tree.resolve()):
        raise RuntimeError(f"`import ember` found {where}, not the tree under test {tree}")


def wait_health(base: str, proc: subprocess.Popen[bytes], timeout_s: float, log: Path) -> None:
    """Poll `base`/health until it answers 200; raise if the server exits or `timeout_s` ends."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"ember serve exited with {proc.returncode}; see {log}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"ember serve did not answer /health in {timeout_s:g} s; see {log}")
        time.sleep(0.05)


def status(base: str) -> dict[str, Any]:
    """The server's /admin/status (`ember status --json`)."""
    return dict(httpx.get(base + "/admin/status", timeout=10).json())


def instances(base: str, name: str = "m") -> list[dict[str, Any]]:
    """Deployment `name`'s instances, as /admin/status lists them."""
    [dep] = [d for d in status(base)["deployments"] if d["name"] == name]
    return list(dep["instances"])


def wait_ready(base: str, n: int, timeout_s: float = 300, name: str = "m") -> None:
    """Wait until deployment `name` has `n` ready instances."""
    deadline = time.monotonic() + timeout_s
    while sum(i["state"] == "ready" for i in instances(base, name)) < n:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{n} ready instances not reached in {timeout_s:g} s")
        time.sleep(0.2)


def metric_lines(base: str, *prefixes: str) -> list[str]:
    """The server's /metrics lines that start with one of `prefixes`."""
    text = httpx.get(base + "/metrics", timeout=10).text
    return [line for line in text.splitlines() if line.startswith(prefixes)]


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGINT (ember serve stops its instances and its private Ray), then SIGKILL to the
    process group if it has not exited within a minute."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
