"""The FastAPI application: OpenAI-compatible routes, admin routes, /health and /metrics.

`create_app(controller, config)` wires the pieces of this package to a running controller:
the router (queues, instance choice, request journal), the generation endpoints, API-key checks,
OpenAI-shaped errors and Prometheus metrics. The app holds no model: instances live behind the
controller (Ray actors in production), and this process only renders prompts and moves tokens.

Routes:
    GET  /v1/models, /v1/models/{model}          deployments, as OpenAI model cards
    POST /v1/completions, /v1/chat/completions   generation (stream or not)
    POST /admin/deployments                      create or update (body: DeploymentSpec JSON)
    DELETE /admin/deployments/{name}             delete (404 if unknown)
    POST /admin/deployments/{name}/prefetch      {"tier", "node"}: an s3:// checkpoint to a node
    POST /admin/deployments/{name}/evict         {"tier", "node"}: drop it (409 while in use)
    POST /admin/nodes/{node}/notice              {"deadline_s"}: a preemption notice; drain it
    GET  /admin/status                           deployments, instances, nodes (`ember status`)
    GET  /admin/requests[/{request_id}]          active journal entries, or one (prompt, token ids)
    GET  /health, /metrics                       liveness; Prometheus text format (no key needed)
"""

from __future__ import annotations

import logging
import time
from typing import Any

from fastapi import Depends, FastAPI, Header, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from ember.api.auth import KeyChecker
from ember.api.config import ApiConfig
from ember.api.generation import Generation
from ember.api.journal import JournalEntry, RequestJournal
from ember.api.metrics import ApiMetrics
from ember.api.responses import error_response, install_error_handlers
from ember.api.router import ControllerLike, Router
from ember.api.schemas import ChatCompletionRequest, CompletionRequest
from ember.controller.types import DeploymentSpec
from ember.errors import (
    CheckpointError,
    ConfigError,
    DeploymentError,
    InvalidRequestError,
    StoreCapacityError,
)
from ember.policy.clock import Clock, SystemClock

logger = logging.getLogger(__name__)


def create_app(controller: Any, config: ApiConfig, clock: Clock | None = None) -> FastAPI:
    """The API app for `controller` (an `ember.controller.Controller`, started by the caller)."""
    config.validate()
    clock = clock if clock is not None else SystemClock()
    ctl: ControllerLike = controller
    keys = KeyChecker(config)
    metrics = ApiMetrics()
    router = Router(
        ctl,
        RequestJournal(config.journal_max_finished),
        clock=clock,
        on_cold_start=lambda model: metrics.cold_starts.labels(model).inc(),
        on_resume=lambda model: metrics.resumed.labels(model).inc(),
        on_migrate=metrics.observe_move,
        on_move_failed=lambda model: metrics.moves_failed.labels(model).inc(),
        link=config.move_link,
        on_quarantine=lambda model: metrics.quarantined.labels(model).inc(),
    )
    metrics.watch(router.loads, controller.status)
    generation = Generation(ctl, router, config, metrics, clock)
    started = int(time.time())

    app = FastAPI(title="ember", version="0.1.0", docs_url=None, redoc_url=None)
    app.state.router = router
    app.state.metrics = metrics
    app.state.controller = controller
    app.state.generation = generation
    install_error_handlers(app)

    # async: FastAPI runs a plain `def` dependency in a worker thread, a thread hop per request.
    async def user(authorization: str | None = Header(default=None)) -> None:
        keys.check_user(authorization)

    async def admin(authorization: str | None = Header(default=None)) -> None:
        keys.check_admin(authorization)

    def card(spec: DeploymentSpec) -> dict[str, Any]:
        return {"id": spec.name, "object": "model", "created": started, "owned_by": "ember"}

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics_endpoint() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=[Depends(user)])
    async def list_models() -> dict[str, Any]:
        specs = sorted(controller.list_deployments(), key=lambda s: s.name)
        return {"object": "list", "data": [card(s) for s in specs]}

    @app.get("/v1/models/{model:path}", dependencies=[Depends(user)])
    async def get_model(model: str) -> dict[str, Any]:
        return card(controller.get(model))

    @app.post("/v1/completions", dependencies=[Depends(user)])
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await generation.completion(body, request)

    @app.post("/v1/chat/completions", dependencies=[Depends(user)])
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await generation.chat(body, request)

    @app.post("/admin/deployments", dependencies=[Depends(admin)])
    async def deploy(request: Request) -> JSONResponse:
        try:
            data = await request.json()
        except ValueError:
            raise InvalidRequestError("request body is not valid JSON") from None
        try:
            spec = DeploymentSpec.from_dict(data)
        except ConfigError as e:
            raise InvalidRequestError(str(e), _field_of(str(e))) from None
        existed = any(s.name == spec.name for s in controller.list_deployments())
        try:
            check = getattr(controller, "check_source", None)
            if callable(check):  # an s3:// source must hold a checkpoint
                await check(spec)
            controller.deploy(spec)
        except (ConfigError, DeploymentError) as e:  # e.g. a source that does not exist
            raise InvalidRequestError(str(e), _field_of(str(e))) from None
        except CheckpointError as e:  # no such object, not an index, S3 unreachable
            raise InvalidRequestError(f"source: {e}", "source") from None
        if existed:
            generation.tokenizers.forget(spec.source)
        logger.info("deployment %s name=%s source=%s", "updated" if existed else "created",
                    spec.name, spec.source)  # fmt: skip
        return JSONResponse(
            {"deployment": spec.to_dict(), "created": not existed},
            status_code=200 if existed else 201,
        )

    @app.delete("/admin/deployments/{name}", dependencies=[Depends(admin)])
    async def delete(name: str) -> dict[str, Any]:
        spec = controller.get(name)
        controller.delete(name)
        generation.tokenizers.forget(spec.source)
        logger.info("deployment deleted name=%s", name)
        return {"deleted": name}

    async def body_of(request: Request, fields: set[str], shape: str) -> dict[str, Any]:
        """An admin request's JSON object ({} for an empty body) with no field but `fields`."""
        try:
            data = await request.json() if await request.body() else {}
        except ValueError:
            raise InvalidRequestError("request body is not valid JSON") from None
        if not isinstance(data, dict) or set(data) - fields:
            raise InvalidRequestError(f"body: expected {shape}")
        return data

    async def lever_args(request: Request, default_tier: str) -> tuple[str, str | None]:
        data = await body_of(request, {"tier", "node"}, '{"tier": ..., "node": ...}')
        tier, node = data.get("tier", default_tier), data.get("node")
        if not isinstance(tier, str):
            raise InvalidRequestError("tier: expected a string", "tier")
        if node is not None and not isinstance(node, str):
            raise InvalidRequestError("node: expected a node id (or a prefix of one)", "node")
        return tier, node

    @app.post("/admin/deployments/{name}/prefetch", dependencies=[Depends(admin)])
    async def prefetch(name: str, request: Request) -> dict[str, Any]:
        tier, node = await lever_args(request, "ssd")
        spec = controller.get(name)
        try:
            target = controller.prefetch(name, tier, node)
        except ConfigError as e:
            raise InvalidRequestError(str(e), _field_of(str(e))) from None
        return {"deployment": name, "source": spec.source, "tier": tier, "node": target}

    @app.post("/admin/deployments/{name}/evict", dependencies=[Depends(admin)])
    async def evict(name: str, request: Request) -> Response:
        tier, node = await lever_args(request, "dram")
        spec = controller.get(name)
        try:
            gone = await controller.evict(name, tier, node)
        except ConfigError as e:
            raise InvalidRequestError(str(e), _field_of(str(e))) from None
        except StoreCapacityError as e:  # an instance maps that copy
            return error_response(409, str(e), "invalid_request_error", "name", "in_use")
        return JSONResponse({"deployment": name, "source": spec.source, "tier": tier,
                             "nodes": gone})  # fmt: skip

    @app.post("/admin/nodes/{node}/notice", dependencies=[Depends(admin)])
    async def notice(node: str, request: Request) -> dict[str, Any]:
        body = await body_of(request, {"deadline_s"}, '{"deadline_s": seconds}')
        deadline = body.get("deadline_s", 30.0)
        if isinstance(deadline, bool) or not isinstance(deadline, int | float) or deadline < 0:
            raise InvalidRequestError(
                f"deadline_s: expected seconds >= 0, got {deadline!r}", "deadline_s"
            )
        try:
            result: dict[str, Any] = controller.notice(node, float(deadline))
        except ConfigError as e:
            raise InvalidRequestError(str(e), _field_of(str(e))) from None
        return result

    @app.get("/admin/status", dependencies=[Depends(admin)])
    async def status() -> dict[str, Any]:
        out: dict[str, Any] = {"deployments": [s.to_dict() for s in controller.status()]}
        for d in out["deployments"]:
            d["queued"], d["in_flight"] = router.load(d["name"])
        nodes = getattr(controller, "nodes", None)
        if callable(nodes):
            try:
                out["nodes"] = [n.to_dict() for n in nodes()]
                rates = getattr(controller, "rates", None)
                measured = rates() if callable(rates) else {}
                pool = getattr(controller, "pool_idle", None)
                idle = pool() if callable(pool) else {}
                noticed = getattr(controller, "noticed", None)
                notices = noticed() if callable(noticed) else {}
                for n in out["nodes"]:  # what placement's start-up estimate uses
                    n["fetch_bytes_per_s"] = measured.get(n["node_id"], {})
                    n["notice_s"] = notices.get(n["node_id"])  # seconds left of a notice
                    n["pool_idle"] = idle.get(n["node_id"], 0)  # pre-started workers waiting
            except Exception:  # the cluster may be unreachable; status still answers
                logger.exception("admin status: listing nodes failed")
                out["nodes"] = []
        checkpoints = getattr(controller, "checkpoints", None)
        if callable(checkpoints):  # which tier holds which checkpoint on each node
            try:
                out["checkpoints"] = await checkpoints()
            except Exception:
                logger.exception("admin status: listing node stores failed")
        return out

    @app.get("/admin/requests", dependencies=[Depends(admin)])
    async def journal_active() -> dict[str, Any]:
        return {"active": [_entry_dict(e) for e in router.journal.active()]}

    @app.get("/admin/requests/{request_id}", dependencies=[Depends(admin)])
    async def journal_entry(request_id: str) -> dict[str, Any]:
        entry = router.journal.get(request_id)
        if entry is None:
            raise HTTPException(404, f"no journal entry for request {request_id!r}")
        return _entry_dict(entry)

    return app


def _entry_dict(entry: JournalEntry) -> dict[str, Any]:
    return {
        "request_id": entry.request_id,
        "model": entry.model,
        "instance_id": entry.instance_id,
        "prompt": entry.prompt,
        "prompt_tokens": entry.prompt_tokens,
        "token_ids": list(entry.token_ids),
        "text": entry.text,
        "finished": entry.finished,
        "finish_reason": entry.finish_reason,
    }


def _field_of(message: str) -> str | None:
    """The field a ConfigError names first ("max_instances: must be >= 1" -> "max_instances")."""
    head = message.split(":", 1)[0].strip()
    return head if head.isidentifier() else None
