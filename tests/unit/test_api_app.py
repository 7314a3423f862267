"""The HTTP app over the real controller, for everything that needs no running engine:
OpenAI-shaped errors, API keys, admin endpoints, queueing limits, /health and /metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from serving_support import serving

from ember.api.config import ApiConfig
from ember.controller.types import DeploymentSpec
from ember.errors import ConfigError

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _spec(tmp_path: Path, name: str = "m", **kw: Any) -> DeploymentSpec:
    src = tmp_path / "src"
    src.mkdir(exist_ok=True)
    return DeploymentSpec(name=name, source=str(src), **kw)


def _assert_error(
    resp: Any, status: int, param: str | None = None, code: str | None = None
) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"]
    if param is not None:
        assert err["param"] == param
    if code is not None:
        assert err["code"] == code
    return err


async def test_unknown_route_and_model_are_404_in_openai_shape(tmp_path: Path) -> None:
    async with serving(tmp_path, (_spec(tmp_path),), cpus=0) as s:
        err = _assert_error(await s.client.get("/v1/nope"), 404, code="not_found")
        assert "/v1/nope" in err["message"]
        body = {"model": "missing", "prompt": "hi"}
        _assert_error(
            await s.client.post("/v1/completions", json=body), 404, "model", "model_not_found"
        )
        body = {"model": "missing", "messages": [{"role": "user", "content": "hi"}]}
        _assert_error(await s.client.post("/v1/chat/completions", json=body), 404, "model")
        _assert_error(await s.client.get("/v1/models/missing"), 404, "model")


async def test_bad_parameters_are_400_naming_the_param(tmp_path: Path) -> None:
    async with serving(tmp_path, (_spec(tmp_path),), cpus=0) as s:
        cases = [
            ({"model": "m", "prompt": "x", "temperature": 9}, "temperature"),
            ({"model": "m", "prompt": "x", "n": 2}, "n"),
            ({"model": "m", "prompt": "x", "max_tokens": -3}, "max_tokens"),
            ({"model": "m"}, "prompt"),
        ]
        for body, param in cases:
            _assert_error(await s.client.post("/v1/completions", json=body), 400, param)
        resp = await s.client.post(
            "/v1/completions", content=b"{not json", headers={"content-type": "application/json"}
        )
        err = _assert_error(resp, 400)
        assert "JSON" in err["message"]


async def test_models_lists_deployments(tmp_path: Path) -> None:
    async with serving(tmp_path, (_spec(tmp_path, "b"), _spec(tmp_path, "a")), cpus=0) as s:
        resp = await s.client.get("/v1/models")
        assert resp.status_code == 200
        data = resp.json()
        assert data["object"] == "list"
        assert [m["id"] for m in data["data"]] == ["a", "b"]
        assert (await s.client.get("/v1/models/a")).json()["id"] == "a"


async def test_full_queue_is_429_and_wait_past_timeout_is_504(tmp_path: Path) -> None:
    specs = (
        _spec(tmp_path, "noqueue", max_queue=0),
        _spec(tmp_path, "slow", request_timeout_s=0.3),
    )
    async with serving(tmp_path, specs, cpus=0) as s:
        resp = await s.client.post("/v1/completions", json={"model": "noqueue", "prompt": "x"})
        _assert_error(resp, 429, code="queue_full")
        assert resp.headers["retry-after"] == "1"
        resp = await s.client.post("/v1/completions", json={"model": "slow", "prompt": "x"})
        _assert_error(resp, 504, code="timeout")
        assert s.app.state.router.load("slow") == (0, 0)  # the timed-out request left the line
        metrics = (await s.client.get("/metrics")).text
        assert (
            'ember_requests_total{endpoint="completions",model="noqueue",status="429"} 1.0'
            in metrics
        )
        assert (
            'ember_requests_total{endpoint="completions",model="slow",status="504"} 1.0' in metrics
        )
        assert 'ember_cold_starts_total{model="slow"} 1.0' in metrics


async def test_keys_guard_v1_and_admin_separately(tmp_path: Path) -> None:
    config = ApiConfig(api_keys=("user-key",), admin_key="admin-key")
    async with serving(tmp_path, (_spec(tmp_path),), config=config, cpus=0) as s:
        c = s.client
        err = _assert_error(await c.get("/v1/models"), 401, code="invalid_api_key")
        assert "missing" in err["message"]
        bad = {"Authorization": "Bearer nope"}
        _assert_error(await c.get("/v1/models", headers=bad), 401, code="invalid_api_key")
        # Auth is checked before the body: a bad key with a bad body is still 401.
        resp = await c.post("/v1/completions", json={"model": "m", "n": 5}, headers=bad)
        _assert_error(resp, 401)
        user = {"Authorization": "Bearer user-key"}
        admin = {"Authorization": "Bearer admin-key"}
        assert (await c.get("/v1/models", headers=user)).status_code == 200
        assert (await c.get("/v1/models", headers=admin)).status_code == 200
        _assert_error(await c.get("/admin/status", headers=user), 401)
        assert (await c.get("/admin/status", headers=admin)).status_code == 200
        # /health and /metrics need no key.
        assert (await c.get("/health")).json() == {"status": "ok"}
        assert (await c.get("/metrics")).status_code == 200


async def test_user_keys_without_admin_key_disable_admin(tmp_path: Path) -> None:
    config = ApiConfig(api_keys=("k",))
    async with serving(tmp_path, config=config, cpus=0) as s:
        resp = await s.client.get("/admin/status", headers={"Authorization": "Bearer k"})
        err = _assert_error(resp, 401)
        assert "disabled" in err["message"]


def test_non_loopback_bind_requires_keys() -> None:
    with pytest.raises(ConfigError, match="API keys are required"):
        ApiConfig(host="0.0.0.0").validate()
    ApiConfig(host="0.0.0.0", api_keys=("k",)).validate()
    ApiConfig(host="127.0.0.2").validate()


def test_migration_settings_are_checked_and_give_the_router_its_link() -> None:
    with pytest.raises(ConfigError, match="migration_kv='sometimes'"):
        ApiConfig(migration_kv="sometimes").validate()
    with pytest.raises(ConfigError, match="migration_link_gbps=0"):
        ApiConfig(migration_link_gbps=0).validate()
    link = ApiConfig(migration_kv="never", migration_link_gbps=80.0).move_link
    assert (link.mode, link.transfer_Bps) == ("never", 10e9)


async def test_admin_deploy_status_delete(tmp_path: Path) -> None:
    async with serving(tmp_path, cpus=0) as s:
        c = s.client
        src = tmp_path / "model"
        src.mkdir()
        resp = await c.post("/admin/deployments", json={"name": "demo", "source": str(src)})
        assert resp.status_code == 201, resp.text
        assert resp.json()["deployment"]["name"] == "demo"
        resp = await c.post(
            "/admin/deployments", json={"name": "demo", "source": str(src), "max_instances": 2}
        )
        assert resp.status_code == 200 and resp.json()["created"] is False
        assert s.controller.get("demo").max_instances == 2
        status = (await c.get("/admin/status")).json()
        [dep] = status["deployments"]
        assert (dep["name"], dep["queued"], dep["in_flight"]) == ("demo", 0, 0)
        assert dep["spec"]["max_instances"] == 2
        assert [n["node_id"] for n in status["nodes"]] == ["local0000000000000000"]
        bad = {"name": "x", "source": str(src), "max_instances": 0}
        _assert_error(await c.post("/admin/deployments", json=bad), 400, "max_instances")
        bad = {"name": "x", "source": str(tmp_path / "absent")}
        _assert_error(await c.post("/admin/deployments", json=bad), 400, "source")
        bad = {"name": "x", "source": str(src), "colour": "red"}
        _assert_error(await c.post("/admin/deployments", json=bad), 400, "colour")
        assert (await c.delete("/admin/deployments/demo")).json() == {"deleted": "demo"}
        _assert_error(await c.delete("/admin/deployments/demo"), 404)
        assert (await c.get("/v1/models")).json()["data"] == []


async def test_instance_that_fails_to_start_is_503_and_the_next_wake_counts_again(
    tmp_path: Path,
) -> None:
    # The source exists but holds no model: the instance's start fails while requests wait.
    async with serving(tmp_path, (_spec(tmp_path, "broken"),)) as s:
        body = {"model": "broken", "prompt": "x"}
        err = _assert_error(await s.client.post("/v1/completions", json=body), 503)
        assert err["code"] == "deployment_unavailable" and "failed to start" in err["message"]
        assert s.app.state.router.load("broken") == (0, 0)
        metrics = (await s.client.get("/metrics")).text
        assert 'ember_cold_starts_total{model="broken"} 1.0' in metrics
        assert (
            'ember_requests_total{endpoint="completions",model="broken",status="503"} 1.0'
            in metrics
        )
