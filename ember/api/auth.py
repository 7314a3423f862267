"""API keys as Bearer tokens: one check for /v1/* (user keys) and one for /admin/* (admin key).

With no key configured at all, both are open (the loopback-only default; `ApiConfig.validate`
refuses a non-loopback bind without keys). With keys configured, /v1/* takes any user key or the
admin key, and /admin/* takes only the admin key. Keys are compared in constant time.
"""

from __future__ import annotations

import hmac

from ember.api.config import ApiConfig
from ember.errors import AuthenticationError


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer TOKEN` header, or None."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def _matches(token: str, keys: tuple[str, ...]) -> bool:
    # Check every key (no early exit) so timing does not tell which prefix matched.
    found = False
    for key in keys:
        found |= hmac.compare_digest(token.encode(), key.encode())
    return found


class KeyChecker:
    """Raises AuthenticationError for a request whose key the config does not accept."""

    def __init__(self, config: ApiConfig) -> None:
        self._user_keys = tuple(config.api_keys) + ((config.admin_key,) if config.admin_key else ())
        self._admin_keys = (config.admin_key,) if config.admin_key else ()
        self._enabled = config.auth_enabled

    def check_user(self, authorization: str | None) -> None:
        if not self._enabled:
            return
        token = bearer_token(authorization)
        if token is None:
            raise AuthenticationError(
                "missing API key: send it as 'Authorization: Bearer YOUR_KEY'"
            )
        if not _matches(token, self._user_keys):
            raise AuthenticationError("incorrect API key provided")

    def check_admin(self, authorization: str | None) -> None:
        if not self._enabled:
            return
        if not self._admin_keys:
            raise AuthenticationError(
                "admin endpoints are disabled: the server has API keys but no admin key"
            )
        token = bearer_token(authorization)
        if token is None:
            raise AuthenticationError(
                "missing admin key: send it as 'Authorization: Bearer ADMIN_KEY'"
            )
        if not _matches(token, self._admin_keys):
            raise AuthenticationError("incorrect admin key provided")
