"""Preemption notices read from a cloud's metadata service (`ember.cluster.notices`), against a
metadata server on 127.0.0.1 that speaks EC2's (IMDSv2) or Compute Engine's protocol: the
notice is the one thing faked. Then the controller acting on one: its health probe reads the
node's notice, drains the node, and a streaming request moves to the other node."""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from serving_support import serving

from ember import LLM, SamplingParams
from ember.cluster.notices import GCE_NOTICE_S, NoticeConfig, NoticeWatcher
from ember.controller.types import DeploymentSpec
from ember.errors import ConfigError
from ember.store.factory import make_model

TOKEN = "imds-token-1"


class Metadata:
    """What the fake metadata service answers; `requests` logs (method, path, headers)."""

    def __init__(self) -> None:
        self.aws_action: dict[str, str] | None = None
        self.gce_preempted = False
        self.imds_v2 = True
        self.requests: list[tuple[str, str, dict[str, str]]] = []


@pytest.fixture
def metadata() -> Iterator[tuple[Metadata, str]]:
    with _metadata_server() as served:
        yield served


@contextlib.contextmanager
def _metadata_server() -> Iterator[tuple[Metadata, str]]:
    state = Metadata()

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _answer(self, code: int, body: str = "") -> None:
            data = body.encode()
            self.send_response(code)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_PUT(self) -> None:  # noqa: N802
            state.requests.append(("PUT", self.path, dict(self.headers)))
            if self.path == "/latest/api/token" and state.imds_v2:
                self._answer(200, TOKEN)
            else:
                self._answer(403)

        def do_GET(self) -> None:  # noqa: N802
            state.requests.append(("GET", self.path, dict(self.headers)))
            if self.path == "/latest/meta-data/spot/instance-action":
                if state.imds_v2 and self.headers.get("X-aws-ec2-metadata-token") != TOKEN:
                    self._answer(401)
                elif state.aws_action is None:
                    self._answer(404)
                else:
                    import json

                    self._answer(200, json.dumps(state.aws_action))
            elif self.path == "/computeMetadata/v1/instance/preempted":
                if self.headers.get("Metadata-Flavor") != "Google":
                    self._answer(403)
                else:
                    self._answer(200, "TRUE" if state.gce_preempted else "FALSE")
            else:
                self._answer(404)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


def test_aws_notice_through_imdsv2_and_v1(metadata: tuple[Metadata, str]) -> None:
    state, url = metadata
    now = 1_800_000_000.0
    watcher = NoticeWatcher(NoticeConfig("aws", url), now=lambda: now)
    assert watcher.poll() is None  # 404: no notice
    state.aws_action = {"action": "terminate", "time": "2027-01-15T08:02:00Z"}
    deadline = 1_800_000_000.0 + 120.0  # 2027-01-15T08:02:00Z is 120 s after `now`
    from datetime import UTC, datetime

    state.aws_action["time"] = datetime.fromtimestamp(deadline, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    assert watcher.poll() == pytest.approx(120.0)
    gets = [h for m, p, h in state.requests if m == "GET"]
    assert all(h.get("X-aws-ec2-metadata-token") == TOKEN for h in gets)  # IMDSv2
    assert sum(m == "PUT" for m, _, _ in state.requests) == 1  # one token, reused
    now += 200  # past the time: overdue, not negative
    assert watcher.poll() == 0.0
    state.imds_v2 = False  # a VM that only speaks IMDSv1
    v1 = NoticeWatcher(NoticeConfig("aws", url), now=lambda: deadline - 30)
    assert v1.poll() == pytest.approx(30.0)


def test_gce_notice_counts_30_s_from_when_it_was_first_seen(
    metadata: tuple[Metadata, str],
) -> None:
    state, url = metadata
    clock = [1000.0]
    watcher = NoticeWatcher(NoticeConfig("gce", url), now=lambda: clock[0])
    assert watcher.poll() is None
    state.gce_preempted = True
    assert watcher.poll() == GCE_NOTICE_S
    clock[0] += 12.0
    assert watcher.poll() == pytest.approx(GCE_NOTICE_S - 12.0)
    assert all(h.get("Metadata-Flavor") == "Google" for _, _, h in state.requests)


def test_no_metadata_service_means_no_notice_and_bad_config_is_refused() -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    for source in ("aws", "gce"):
        assert NoticeWatcher(NoticeConfig(source, dead, timeout_s=0.2)).poll() is None
    assert NoticeWatcher(NoticeConfig()).poll() is None  # "none": never asks
    with pytest.raises(ConfigError, match="EMBER_NOTICE_SOURCE='azure'"):
        NoticeConfig.from_env({"EMBER_NOTICE_SOURCE": "azure"})
    assert NoticeConfig.from_env({}).source == "none"


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_cloud_notice_drains_its_node_and_the_stream_moves(
    tmp_path: Path, anyio_backend: str
) -> None:
    """The metadata of the node a request streams from posts a notice: the controller's health
    probe reads it, drains that node, and the request moves to an instance on the other node
    with the undisturbed tokens."""
    import time

    model = make_model(tmp_path / "tiny", "llama", "tiny", "fp32", seed=0)
    # 200 tokens: this model and prompt have a near-tie at token 218 (top-2 logprobs 9.5e-7
    # apart, below fp32's rounding), which a recompute split at some points flips; the
    # smallest gap before 200 is 0.006.
    params = SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True)
    llm = LLM(str(model))
    try:
        want = llm.generate(["the water"], params)[0].token_ids
    finally:
        llm.close()
    spec = DeploymentSpec(name="tiny", source=str(model), min_instances=1, max_instances=1)
    nodes = ("node-a000", "node-b000")
    with _metadata_server() as (meta_a, url_a), _metadata_server() as (meta_b, url_b):
        clouds = {"node-a000": meta_a, "node-b000": meta_b}
        notices = {"node-a000": NoticeConfig("aws", url_a), "node-b000": NoticeConfig("aws", url_b)}
        async with serving(
            tmp_path, (spec,), nodes=nodes, notices=notices, probe_interval_s=0.2
        ) as s:
            router = s.app.state.router
            deadline = asyncio.get_running_loop().time() + 120
            while not s.controller.ready_instances("tiny"):
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.05)
            [source] = s.controller.ready_instances("tiny")
            assert source.node_id in clouds
            stream = router.generate("tiny", "r", "the water", params)
            got = list((await anext(stream)).new_token_ids)
            assert s.controller.noticed() == {}
            clouds[source.node_id].aws_action = {
                "action": "terminate",
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 120)),
            }
            async for delta in stream:
                got += delta.new_token_ids
                await asyncio.sleep(0.01)  # a client that reads at its own pace
            assert got == list(want)
            assert list(s.controller.noticed()) == [source.node_id]
            assert 0 < s.controller.noticed()[source.node_id] <= 120
            entry = router.journal.get("r")
            assert entry is not None and entry.instance_id != source.instance_id
            metrics = (await s.client.get("/metrics")).text
            assert 'ember_requests_migrated_total{model="tiny"} 1.0' in metrics


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_node_store_answers_the_probe_with_its_clouds_notice(
    metadata: tuple[Metadata, str], tmp_path: Path, anyio_backend: str
) -> None:
    """The node store actor's body (Ray only wraps it) reads the notice source `ember serve`'s
    environment configured."""
    from ember.cluster.node_services import NodeServicesConfig
    from ember.cluster.node_store_actor import NodeStoreActor

    state, url = metadata
    env = {"EMBER_NOTICE_SOURCE": "gce", "EMBER_NOTICE_URL": url,
           "EMBER_DRAM_DIR": str(tmp_path / "dram"), "EMBER_SSD_DIR": str(tmp_path / "ssd")}  # fmt: skip
    config = NodeServicesConfig.from_env(str(tmp_path / "cache"), env)
    assert config.notices == NoticeConfig("gce", url)
    assert config.store is not None
    actor = NodeStoreActor(config.store, config.notices)
    assert await actor.notice() is None
    state.gce_preempted = True
    assert await actor.notice() == pytest.approx(GCE_NOTICE_S, abs=2.0)
    quiet = NodeServicesConfig.from_env(str(tmp_path / "cache"), {**env, "EMBER_NOTICE_SOURCE": ""})
    assert quiet.notices.source == "none"
    assert await NodeStoreActor(quiet.store or config.store).notice() is None
    assert len(state.requests) == 2  # "none" asks nothing
