"""HTTP client of a running server's admin endpoints, shared by `ember deploy|delete|status|
prefetch|evict|notice`.

Owns the server URL and key resolution (--url / EMBER_URL, --api-key / EMBER_API_KEY) and the
mapping of HTTP errors (OpenAI's error JSON) onto ember's exceptions, so each command prints
one line and exits non-zero.
"""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

from ember.errors import (
    AuthenticationError,
    ConfigError,
    EmberError,
    ModelNotFoundError,
    ServingError,
)

DEFAULT_URL = "http://127.0.0.1:8000"


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", help=f"server URL (default: $EMBER_URL or {DEFAULT_URL})")
    parser.add_argument("--api-key", help="admin Bearer token (default: $EMBER_API_KEY)")
    parser.add_argument("--timeout-s", type=float, default=30.0, help="HTTP timeout in seconds")


class AdminClient:
    """Calls /admin/* on one server; every failure raises an EmberError with one-line text."""

    def __init__(self, url: str | None, api_key: str | None, timeout_s: float = 30.0) -> None:
        logging.getLogger("httpx").setLevel(logging.WARNING)  # no per-request INFO lines
        self.url = (url or os.environ.get("EMBER_URL") or DEFAULT_URL).rstrip("/")
        self.api_key = api_key or os.environ.get("EMBER_API_KEY") or None
        self.timeout_s = timeout_s

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> AdminClient:
        return cls(args.url, args.api_key, args.timeout_s)

    def deploy(self, spec: dict[str, Any]) -> dict[str, Any]:
        return self._request("POST", "/admin/deployments", json=spec)

    def delete(self, name: str) -> dict[str, Any]:
        return self._request("DELETE", f"/admin/deployments/{name}")

    def prefetch(self, name: str, tier: str, node: str | None) -> dict[str, Any]:
        body = {"tier": tier, "node": node}
        return self._request("POST", f"/admin/deployments/{name}/prefetch", json=body)

    def evict(self, name: str, tier: str, node: str | None) -> dict[str, Any]:
        body = {"tier": tier, "node": node}
        return self._request("POST", f"/admin/deployments/{name}/evict", json=body)

    def notice(self, node: str, deadline_s: float) -> dict[str, Any]:
        body = {"deadline_s": deadline_s}
        return self._request("POST", f"/admin/nodes/{node}/notice", json=body)

    def status(self) -> dict[str, Any]:
        return self._request("GET", "/admin/status")

    def _request(self, method: str, path: str, json: Any = None) -> dict[str, Any]:
        import httpx

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        try:
            r = httpx.request(
                method, self.url + path, json=json, headers=headers, timeout=self.timeout_s
            )
        except httpx.HTTPError as e:
            raise ServingError(
                f"cannot reach ember at {self.url} ({type(e).__name__}); is `ember serve` "
                "running there? (set --url or EMBER_URL)"
            ) from None
        if r.status_code >= 400:
            raise _error(r.status_code, _message(r))
        body = r.json()
        if not isinstance(body, dict):
            raise ServingError(f"{self.url}{path}: unexpected answer {body!r}")
        return body


def _message(r: Any) -> str:
    try:
        body = r.json()
    except ValueError:
        return r.text.strip()[:200] or f"HTTP {r.status_code}"
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict) and err.get("message"):
            return str(err["message"])
        if body.get("detail"):
            return str(body["detail"])
    return str(body)[:200]


def _error(status: int, message: str) -> EmberError:
    if status in (401, 403):
        return AuthenticationError(f"{message} (set --api-key or EMBER_API_KEY)")
    if status == 404:
        return ModelNotFoundError(message)
    if status in (400, 422):
        return ConfigError(message)
    if status == 409:
        return ServingError(message)
    return ServingError(f"HTTP {status}: {message}")
