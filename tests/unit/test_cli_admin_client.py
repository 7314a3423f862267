"""The admin client's URL/key resolution and its mapping of HTTP errors to one-line errors."""

from __future__ import annotations

import pytest

from ember.cli.admin_client import DEFAULT_URL, AdminClient, _error
from ember.errors import AuthenticationError, ConfigError, ModelNotFoundError, ServingError


def test_flags_win_over_environment_which_wins_over_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("EMBER_URL", raising=False)
    monkeypatch.delenv("EMBER_API_KEY", raising=False)
    c = AdminClient(None, None)
    assert (c.url, c.api_key) == (DEFAULT_URL, None)
    monkeypatch.setenv("EMBER_URL", "http://127.0.0.1:9000/")
    monkeypatch.setenv("EMBER_API_KEY", "env-key")
    c = AdminClient(None, None)
    assert (c.url, c.api_key) == ("http://127.0.0.1:9000", "env-key")
    c = AdminClient("http://127.0.0.1:7", "flag-key")
    assert (c.url, c.api_key) == ("http://127.0.0.1:7", "flag-key")


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (401, AuthenticationError),
        (403, AuthenticationError),
        (404, ModelNotFoundError),
        (400, ConfigError),
        (422, ConfigError),
        (503, ServingError),
    ],
)
def test_http_errors_map_to_ember_errors(status: int, kind: type) -> None:
    err = _error(status, "the message")
    assert type(err) is kind
    assert "the message" in str(err) and "\n" not in str(err)


def test_auth_errors_say_how_to_pass_a_key() -> None:
    assert "EMBER_API_KEY" in str(_error(401, "bad key"))


def test_status_shows_a_fetch_in_flight_with_its_progress() -> None:
    from dataclasses import asdict

    from ember.cli.status import render
    from ember.store.node_store import CachedCheckpoint

    rows = [
        asdict(CachedCheckpoint("s3://m/a", "dram", 2_000_000_000, 1, 0.0)),
        asdict(CachedCheckpoint("s3://m/b", "ssd", 2_000_000_000, 0, 0.0, fetched=0.42)),
        asdict(CachedCheckpoint("s3://m/a", "dram", 2_000_000_000, 2, 0.0, retired=True)),
    ]
    text = render({"deployments": [], "checkpoints": {"0123456789abcdef": rows}})
    assert "dram     2.00 GB pins=1  s3://m/a" in text
    assert "ssd      2.00 GB fetching 42%  s3://m/b" in text
    assert "dram     2.00 GB retired (old version, pins=2)  s3://m/a" in text


def test_status_shows_each_nodes_measured_fetch_rates() -> None:
    from ember.cli.status import render

    node = {"node_id": "0123456789abcdef", "address": "127.0.0.1", "alive": True,
            "cpus_total": 2, "cpus_available": 1, "labels": {}}  # fmt: skip
    text = render({"deployments": [], "nodes": [
        {**node, "fetch_bytes_per_s": {"remote": 1.4e8, "ssd": 2.31e9}, "pool_idle": 1},
        {**node, "node_id": "fedcba9876543210", "fetch_bytes_per_s": {}, "pool_idle": 0,
         "notice_s": 24.6},
    ]})  # fmt: skip
    assert "0123456789ab" in text and "fetch: remote 0.14 GB/s, ssd 2.31 GB/s" in text
    assert text.count("fetch:") == 1  # a node that measured nothing shows no rates
    assert text.count(" pool=1") == 1 and " pool=0" not in text  # pre-started workers idle
    [noticed] = [line for line in text.splitlines() if "NOTICE" in line]
    assert noticed.startswith("  fedcba987654") and "NOTICE: goes in 25 s" in noticed


def test_status_marks_the_old_revisions_instances_and_the_last_failed_start() -> None:
    from ember.cli.status import render

    inst = {"state": "ready", "node_id": "n1", "in_flight": 0, "load_s": 0.5}
    text = render({"deployments": [{
        "name": "m", "spec": {"source": "/m"}, "desired": 1, "revision": 2,
        "last_error": "CheckpointCorruptError: /m/model.safetensors: truncated",
        "instances": [
            {**inst, "instance_id": "m-1", "revision": 0, "estimated_load_s": 0.1, "pid": 4242},
            {**inst, "instance_id": "m-3", "revision": 2, "state": "starting", "pid": None},
        ],
    }]})  # fmt: skip
    [old] = [line for line in text.splitlines() if "m-1" in line]
    [new] = [line for line in text.splitlines() if "m-3" in line]
    assert "revision=0 (old)" in old and "(old)" not in new
    assert "load_s=0.50 (est 0.10)" in old and "(est" not in new  # placement's estimate
    assert "pid=4242" in old and "pid=" not in new  # its process, once started
    assert "last start failed: CheckpointCorruptError: /m/model.safetensors: truncated" in text


def test_status_shows_an_instances_k_v_pulls_and_a_failed_engine() -> None:
    from ember.cli.status import render

    inst = {"state": "ready", "node_id": "n1", "in_flight": 0, "load_s": 0.5, "revision": 0}
    text = render({"deployments": [{
        "name": "m", "spec": {"source": "/m"}, "desired": 2, "revision": 0,
        "instances": [
            {**inst, "instance_id": "m-1", "engine": {"steps": 9, "kv_pulls": 3}},
            {**inst, "instance_id": "m-2", "engine": {"broken": "RuntimeError: rank 1 gone"}},
            {**inst, "instance_id": "m-3", "engine": {"steps": 4, "kv_pulls": 0}},
        ],
    }]})  # fmt: skip
    lines = text.splitlines()
    assert lines[lines.index(next(x for x in lines if "m-1" in x)) + 1].strip() == "kv_pulls=3"
    assert "    engine failed: RuntimeError: rank 1 gone" in lines
    after_m3 = lines[lines.index(next(x for x in lines if "m-3" in x)) + 1 :]
    assert not after_m3 or not after_m3[0].startswith("    ")  # nothing to show for m-3
