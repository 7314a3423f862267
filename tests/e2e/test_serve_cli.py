"""`ember serve | deploy | status | delete` as a user runs them, against a live server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import psutil

if TYPE_CHECKING:
    from tests.e2e.conftest import EmberServer


def ember(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ember", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def status_json(server: EmberServer, *extra: str) -> dict[str, Any]:
    """`ember status --json`, as a user would run it."""
    r = ember("status", "--json", "--url", server.url, *extra)
    assert r.returncode == 0, r.stderr
    data: dict[str, Any] = json.loads(r.stdout)
    return data


def status_http(server: EmberServer) -> dict[str, Any]:
    """GET /admin/status directly (cheap enough to poll; each CLI run starts a Python)."""
    r = httpx.get(server.url + "/admin/status", timeout=10.0)
    assert r.status_code == 200, r.text
    data: dict[str, Any] = r.json()
    return data


def instance_states(server: EmberServer, name: str) -> list[str] | None:
    d = deployment(status_http(server), name)
    return None if d is None else [i["state"] for i in d["instances"]]


def deployment(state: dict[str, Any], name: str) -> dict[str, Any] | None:
    return next((d for d in state["deployments"] if d["name"] == name), None)


def wait_for(pred: Callable[[], bool], timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.5)


def test_deploy_status_delete_round_trip(
    ember_server: EmberServer, model_factory: Callable[..., Path]
) -> None:
    model = model_factory("llama", "tiny", "fp32", seed=3)
    url = ("--url", ember_server.url)
    r = ember("deploy", "cli-m", str(model), "--min-instances", "1", "--keep-alive-s", "5", *url)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"deployment cli-m created (source {model})"

    wait_for(lambda: instance_states(ember_server, "cli-m") == ["ready"])
    d = deployment(status_json(ember_server), "cli-m")
    assert d is not None and d["spec"]["keep_alive_s"] == 5.0 and d["spec"]["min_instances"] == 1
    [inst] = d["instances"]
    assert inst["node_id"] and inst["load_s"] > 0
    assert d["cached_on"] == [inst["node_id"]]
    text = ember("status", *url)
    assert text.returncode == 0
    assert any(line.startswith("cli-m ") and "ready=1" in line for line in text.stdout.splitlines())

    r = ember("delete", "cli-m", *url)
    assert (r.returncode, r.stdout.strip()) == (0, "deployment cli-m deleted")
    assert instance_states(ember_server, "cli-m") is None
    again = ember("delete", "cli-m", *url)
    assert again.returncode == 1
    assert again.stderr.strip().startswith("ember delete: error:") and "cli-m" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1


def test_bad_deploy_and_unreachable_server_are_one_line_errors(ember_server: EmberServer) -> None:
    r = ember("deploy", "x", "/no/such/model", "--url", ember_server.url)
    assert r.returncode == 1 and "does not exist" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = ember("status", "--url", "http://127.0.0.1:9")  # nothing listens on the discard port
    assert r.returncode == 1 and "cannot reach ember" in r.stderr


def test_private_ray_and_api_listen_only_on_loopback(ember_server: EmberServer) -> None:
    # An instance must be running so its worker's sockets are checked too.
    wake = ember("deploy", "lo", str(_demo_source(ember_server)), "--min-instances", "1",
                 "--url", ember_server.url)  # fmt: skip
    assert wake.returncode == 0, wake.stderr
    wait_for(lambda: instance_states(ember_server, "lo") == ["ready"])
    assert ember_server.proc is not None
    root = psutil.Process(ember_server.proc.pid)
    pids = {root.pid} | {p.pid for p in root.children(recursive=True)}
    listening = [
        c
        for c in psutil.net_connections("inet")
        if c.status == psutil.CONN_LISTEN and c.pid in pids
    ]
    assert len(listening) >= 4  # the API, GCS, raylet, workers
    assert [c.laddr for c in listening if not _loopback(c.laddr.ip)] == []
    assert ember("delete", "lo", "--url", ember_server.url).returncode == 0


def test_public_host_without_keys_is_refused_before_anything_starts(tmp_path: Path) -> None:
    t0 = time.monotonic()
    r = ember("serve", "--host", "0.0.0.0", "--port", "1", "--state-dir", str(tmp_path))
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        "ember serve: error: host='0.0.0.0' is not a loopback address: API keys are required "
        "(set api_keys / --api-key or EMBER_API_KEYS)"
    ]
    assert time.monotonic() - t0 < 30 and not (tmp_path / "ember.db").exists()


def test_restarted_server_keeps_deployments(
    ember_server: EmberServer, model_factory: Callable[..., Path]
) -> None:
    model = model_factory("llama", "tiny", "fp32", seed=4)
    ok = ember("deploy", "kept", str(model), "--max-instances", "2", "--url", ember_server.url)
    assert ok.returncode == 0, ok.stderr
    ember_server.restart()
    d = deployment(status_http(ember_server), "kept")
    assert d is not None and d["spec"]["max_instances"] == 2 and d["spec"]["source"] == str(model)
    assert d["instances"] == []  # min 0: nothing runs until a request comes
    assert deployment(status_http(ember_server), "ember-demo") is not None


def test_admin_key_is_required_for_the_cli(
    start_ember_server: Callable[..., EmberServer], model_factory: Callable[..., Path]
) -> None:
    model = model_factory("llama", "tiny", "fp32", seed=4)
    server = start_ember_server("--no-demo", api_keys=("user-k",), admin_key="admin-k")
    url = ("--url", server.url)
    denied = ember("deploy", "m", str(model), *url, "--api-key", "user-k")
    assert denied.returncode == 1 and "EMBER_API_KEY" in denied.stderr
    env = {**os.environ, "EMBER_API_KEY": "admin-k", "EMBER_URL": server.url}
    ok = ember("deploy", "m", str(model), env=env)
    assert ok.returncode == 0, ok.stderr


def _demo_source(server: EmberServer) -> Path:
    return server.cache_dir / "demo" / "llama-tiny-seed0"


def _loopback(ip: str) -> bool:
    return ip.startswith("127.") or ip == "::1" or ip.startswith("::ffff:127.")
