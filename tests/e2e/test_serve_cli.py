"""`ember serve | deploy | status | delete` as a user runs them, against a live server."""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import psutil
import pytest

if TYPE_CHECKING:
    from tests.e2e.conftest import EmberServer


def ember(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run the `ember` command's entry point in this process (as `ember ARGS` would).

    In-process because every `ember` process pays for importing torch (ember.cli.make_model
    imports the model factory at module level), about 5 s each on a loaded 2-core machine.
    """
    from ember.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    saved = dict(os.environ)
    try:
        if env is not None:
            os.environ.clear()
            os.environ.update(env)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                rc = main(list(args))
            except SystemExit as e:  # argparse errors
                rc = int(e.code or 0)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return subprocess.CompletedProcess(["ember", *args], rc, out.getvalue(), err.getvalue())


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
    env = {**os.environ, "EMBER_URL": ember_server.url}  # --url or $EMBER_URL
    r = ember(
        "deploy", "cli-m", str(model), "--min-instances", "1", "--keep-alive-s", "5",
        "--max-num-batched-tokens", "64", env=env,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"deployment cli-m created (source {model})"

    wait_for(lambda: instance_states(ember_server, "cli-m") == ["ready"])
    d = deployment(status_json(ember_server), "cli-m")
    assert d is not None and d["spec"]["keep_alive_s"] == 5.0 and d["spec"]["min_instances"] == 1
    assert d["spec"]["max_num_batched_tokens"] == 64
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
    spec = {"name": "lo", "source": str(_demo_source(ember_server)), "min_instances": 1}
    r = httpx.post(ember_server.url + "/admin/deployments", json=spec, timeout=30)
    assert r.status_code == 201, r.text
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
    assert httpx.delete(ember_server.url + "/admin/deployments/lo", timeout=30).status_code == 200


def test_public_host_without_keys_is_refused_before_anything_starts(tmp_path: Path) -> None:
    t0 = time.monotonic()
    r = subprocess.run(
        [sys.executable, "-m", "ember", "serve", "--host", "0.0.0.0", "--port", "1",
         "--state-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
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


def test_a_fresh_server_is_warm_when_it_first_answers(
    start_ember_server: Callable[..., EmberServer],
) -> None:
    """`ember serve` answers only once its pre-started worker has done its imports and loaded
    the CPU attention kernel (compiling it when the cache has none, as this fresh cache does),
    and the demo model is converted and put in the DRAM tier at deploy, before any request. So
    the first request starts from DRAM in a warm worker: nothing of a process start, an import,
    a compiler run or a conversion is left for it. (Before, a request sent as /health first
    answered waited for all four: 3.5-3.9 s on the demo model here, against 0.10 s now.)"""
    server = start_ember_server()
    assert server.proc is not None
    workers = [
        p for p in psutil.Process(server.proc.pid).children(recursive=True)
        if "PooledInstanceActor" in " ".join(p.cmdline())
    ]  # fmt: skip
    assert len(workers) == 1
    assert [n["pool_idle"] for n in status_http(server)["nodes"]] == [1]
    maps = [m.path for m in workers[0].memory_maps()]
    assert any("/paged_attention-" in m for m in maps), "the kernel is not loaded yet"

    def demo_in_dram() -> bool:
        rows = [r for rs in status_http(server)["checkpoints"].values() for r in rs]
        return any(
            r["tier"] == "dram" and "llama-tiny-seed0" in r["key"] and r["fetched"] is None
            for r in rows
        )

    wait_for(demo_in_dram, 60)  # no request has been sent
    r = httpx.post(
        server.url + "/v1/completions",
        json={"model": "ember-demo", "prompt": "hello", "max_tokens": 2},
        timeout=60.0,
    )
    assert r.status_code == 200, r.text
    d = deployment(status_http(server), "ember-demo")
    assert d is not None and [i["tier"] for i in d["instances"]] == ["dram"]


def _demo_source(server: EmberServer) -> Path:
    return server.cache_dir / "demo" / "llama-tiny-seed0"


def _loopback(ip: str) -> bool:
    return ip.startswith("127.") or ip == "::1" or ip.startswith("::ffff:127.")


def test_busy_port_and_unreachable_cluster_are_one_line_errors(
    ember_server: EmberServer, tmp_path: Path
) -> None:
    state = ("--state-dir", str(tmp_path))
    busy = ember("serve", "--port", str(ember_server.port), *state)
    assert busy.returncode == 1
    assert busy.stderr.strip().splitlines() == [
        f"ember serve: error: port: cannot bind 127.0.0.1:{ember_server.port} (Address already "
        "in use); is another server running? choose another with --port"
    ]
    with socket.socket() as probe:  # a free port, so only the cluster address is wrong
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    gone = ember("serve", "--address", "127.0.0.1:9", "--port", port, *state)
    assert gone.returncode == 1 and len(gone.stderr.strip().splitlines()) == 1
    assert "cannot join the Ray cluster at 127.0.0.1:9: nothing answers there" in gone.stderr


@pytest.mark.parametrize("to_group", [False, True], ids=["process", "process-group"])
def test_sigterm_stops_the_server_cleanly_with_exit_code_0(
    start_ember_server: Callable[..., EmberServer], to_group: bool
) -> None:
    """What a service manager sends: the server stops its instances and Ray and exits 0 (Ray's
    driver handler used to turn the signal into exit code 15, a failure to systemd). systemd's
    default (KillMode=control-group) signals every process of the service at once, Ray's
    included: the server still exits 0, and nothing of its process group is left."""
    import signal

    server = start_ember_server("--no-demo")
    proc = server.proc
    assert proc is not None
    if to_group:
        os.killpg(proc.pid, signal.SIGTERM)
    else:
        proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0, server.log()
    assert "ember stopped" in server.log()
    if to_group:
        deadline = time.monotonic() + 30
        while _group_members(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _group_members(proc.pid), server.log()


def _group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            stat = (entry / "stat").read_text()
            fields = stat[stat.rfind(")") + 2 :].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                pids.append(int(entry.name))
    return pids


def test_s3_model_push_deploy_prefetch_evict_as_a_user_runs_them(
    start_ember_server: Callable[..., EmberServer], model_factory: Callable[..., Path]
) -> None:
    """`ember push` to an S3-compatible server (moto on 127.0.0.1), then against a live
    `ember serve`: a deploy of a prefix holding nothing is a one-line error; a good deploy is
    prefetched to SSD before any request; `ember prefetch` and `ember evict` move it; the first
    request is served."""
    from moto.server import ThreadedMotoServer

    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    moto.start()
    try:
        host, port = moto.get_host_and_port()
        s3_env = {
            "EMBER_S3_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
        }  # fmt: skip
        model = model_factory("llama", "tiny", "fp32", seed=5)
        src = "s3://cli-models/tiny"
        push_env = {**os.environ, **s3_env}
        r = ember("push", str(model), src, env=push_env)  # the bucket does not exist yet
        assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert "no bucket 'cli-models'" in r.stderr and "--create-bucket" in r.stderr
        r = ember("push", str(model), src, "--create-bucket", env=push_env)
        assert r.returncode == 0, r.stderr
        server = start_ember_server("--no-demo", env=s3_env)
        url = ("--url", server.url)

        def tiers() -> set[str]:
            rows = status_json(server).get("checkpoints", {}).values()
            return {
                r["tier"] for rs in rows for r in rs if r["key"] == src and r["fetched"] is None
            }

        r = ember("deploy", "s3m", "s3://cli-models/nothing-here", *url)
        assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
        assert "s3://cli-models/nothing-here/index.json: no such object" in r.stderr
        r = ember("deploy", "s3m", src, "--max-model-len", "64", *url)
        assert r.returncode == 0, r.stderr
        wait_for(lambda: tiers() == {"ssd"})  # prefetched on deploy, no request yet
        r = ember("prefetch", "s3m", "--tier", "dram", *url)
        assert r.returncode == 0 and r.stdout.startswith(f"prefetching {src} to dram on node")
        wait_for(lambda: tiers() == {"ssd", "dram"})
        r = ember("evict", "s3m", *url)  # DRAM by default, every node holding it
        assert r.returncode == 0 and r.stdout.startswith(f"evicted {src} from dram: "), r.stdout
        assert tiers() == {"ssd"}
        body = {"model": "s3m", "prompt": "hello", "max_tokens": 4}
        answer = httpx.post(server.url + "/v1/completions", json=body, timeout=120)
        assert answer.status_code == 200, answer.text
        [inst] = deployment(status_json(server), "s3m")["instances"]  # type: ignore[index]
        assert inst["tier"] == "ssd"  # the first request's instance read the prefetched copy
        r = ember("prefetch", "nosuch", *url)
        assert r.returncode == 1 and "nosuch" in r.stderr
    finally:
        moto.stop()


def test_an_update_rolls_over_and_a_broken_one_leaves_the_old_serving(
    ember_server: EmberServer, model_factory: Callable[..., Path], tmp_path: Path
) -> None:
    """`ember deploy` again with a new engine setting, then with a truncated weights file, as a
    user runs them against a live server: the deployment keeps answering throughout, ends with
    one instance of the new revision, and a revision that cannot start leaves it serving with
    the reason in `ember status`."""
    import shutil

    model = model_factory("llama", "tiny", "fp32", seed=4)
    broken = tmp_path / "broken"
    shutil.copytree(model, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    url = ("--url", ember_server.url)
    base = ("deploy", "cli-u", "--min-instances", "1", "--max-instances", "3", *url)
    body = {"model": "cli-u", "prompt": [1, 2, 3], "max_tokens": 2}

    def answers() -> bool:
        r = httpx.post(ember_server.url + "/v1/completions", json=body, timeout=120.0)
        return r.status_code == 200

    def live(name: str) -> list[tuple[int, str]]:
        d = deployment(status_http(ember_server), name) or {"instances": []}
        return sorted((i["revision"], i["state"]) for i in d["instances"] if i["state"] != "failed")

    r = ember(base[0], base[1], str(model), *base[2:])
    assert r.returncode == 0, r.stderr
    wait_for(lambda: live("cli-u") == [(0, "ready")])
    r = ember(base[0], base[1], str(model), *base[2:], "--max-num-seqs", "8")
    assert (r.returncode, r.stdout.strip()) == (0, f"deployment cli-u updated (source {model})")
    assert (0, "ready") in live("cli-u") and answers()  # the old one serves meanwhile
    wait_for(lambda: live("cli-u") == [(1, "ready")])
    assert answers()
    r = ember(base[0], base[1], str(broken), *base[2:])
    assert r.returncode == 0, r.stderr
    wait_for(lambda: bool((deployment(status_http(ember_server), "cli-u") or {}).get("last_error")))
    assert live("cli-u")[0] == (1, "ready") and answers()  # revision 2 failed: 1 serves on
    text = ember("status", *url).stdout
    assert "last start failed: " in text and "model.safetensors" in text and "(old)" in text
    assert ember("delete", "cli-u", *url).returncode == 0
