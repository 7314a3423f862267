"""The HTTP API's configuration: where it binds, which API keys it accepts, request defaults.

`ApiConfig.validate()` enforces the one security rule of the API: a server bound to anything but
a loopback address must require API keys.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from ember.errors import ConfigError
from ember.migration.transfer import KvMode, MoveLink

LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})


def is_loopback(host: str) -> bool:
    """True if `host` names only this machine (127.0.0.0/8, ::1 or localhost)."""
    if host in LOOPBACK_HOSTS:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class ApiConfig:
    """Settings of the OpenAI-compatible HTTP API.

    host, port: where uvicorn binds (`ember serve --host/--port`).
    api_keys: Bearer tokens accepted on /v1/*; empty means no key is needed (loopback only).
    admin_key: the Bearer token for /admin/*; with no keys at all the admin endpoints are open,
        with api_keys but no admin_key they are refused (403), so no user key can deploy.
    completion_default_max_tokens: max_tokens of /v1/completions when the request names none
        (OpenAI's documented default is 16).
    chat_default_max_tokens: max_tokens of /v1/chat/completions when the request names none.
    max_logprobs: the largest `logprobs` / `top_logprobs` a request may ask for.
    journal_max_finished: finished requests kept in the request journal (oldest dropped first).
    migration_kv: how a live migration (a preemption notice) gives its target the K/V of the
        request's tokens: "auto" (sent when that is faster than the target recomputing them,
        judged by the source's measured prefill speed and `migration_link_gbps`), "always"
        or "never" (always recomputed); see ember/migration/transfer.py.
    migration_link_gbps: the network between two instances' nodes, in Gb/s.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    api_keys: tuple[str, ...] = ()
    admin_key: str | None = None
    completion_default_max_tokens: int = 16
    chat_default_max_tokens: int = 256
    max_logprobs: int = 20
    journal_max_finished: int = 10_000
    migration_kv: str = "auto"
    migration_link_gbps: float = 8.0

    @property
    def move_link(self) -> MoveLink:
        return MoveLink(KvMode(self.migration_kv), self.migration_link_gbps * 1e9 / 8)

    @property
    def auth_enabled(self) -> bool:
        return bool(self.api_keys) or self.admin_key is not None

    def validate(self) -> None:
        if not is_loopback(self.host) and not self.api_keys:
            raise ConfigError(
                f"host={self.host!r} is not a loopback address: API keys are required "
                "(set api_keys / --api-key or EMBER_API_KEYS)"
            )
        if not 0 < self.port < 65536:
            raise ConfigError(f"port={self.port} must be in 1..65535")
        if any(not k for k in self.api_keys) or self.admin_key == "":
            raise ConfigError("api_keys and admin_key must not be empty strings")
        for name in ("completion_default_max_tokens", "chat_default_max_tokens", "max_logprobs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        modes = [m.value for m in KvMode]
        if self.migration_kv not in modes:
            raise ConfigError(f"migration_kv={self.migration_kv!r} must be one of {modes}")
        if not self.migration_link_gbps > 0:
            raise ConfigError(f"migration_link_gbps={self.migration_link_gbps} must be > 0")
        if self.journal_max_finished < 0:
            raise ConfigError(f"journal_max_finished={self.journal_max_finished} must be >= 0")
