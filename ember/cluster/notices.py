"""Preemption notices from a node's cloud: the metadata service each spot VM can ask whether it
is about to be reclaimed.

- `aws`: EC2's instance metadata, `GET /latest/meta-data/spot/instance-action` (IMDSv2: a
  session token from `PUT /latest/api/token` first, IMDSv1 if that is refused). 404 until a
  notice; then `{"action": "terminate"|"stop"|"hibernate", "time": "2026-12-07T18:30:00Z"}`,
  two minutes ahead.
- `gce`: Compute Engine's `GET /computeMetadata/v1/instance/preempted` (header
  `Metadata-Flavor: Google`): `FALSE` until the VM is being preempted, then `TRUE`, with 30 s
  left from then (GCE_NOTICE_S, counted from the first poll that saw it).

Each node's store actor owns a `NoticeWatcher` (configured from `ember serve`'s environment:
EMBER_NOTICE_SOURCE=none|aws|gce, EMBER_NOTICE_URL to point it elsewhere, e.g. a proxy) and
answers the controller's health probe with the seconds left, which the controller turns into
`Controller.notice(node, seconds)`. A metadata service that does not answer means no notice:
a VM outside that cloud must never be drained by mistake.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import httpx

from ember.errors import ConfigError

logger = logging.getLogger(__name__)

SOURCES = ("none", "aws", "gce")
DEFAULT_URLS = {"aws": "http://169.254.169.254", "gce": "http://metadata.google.internal"}
GCE_NOTICE_S = 30.0  # GCE's preemption notice: 30 s from when `preempted` turns TRUE
AWS_TOKEN_TTL_S = 21600


@dataclass(frozen=True, slots=True)
class NoticeConfig:
    source: str = "none"
    url: str | None = None  # the metadata service's base URL (default: the cloud's own)
    timeout_s: float = 0.5  # per request: an absent service must not hold the probe up

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ConfigError(
                f"EMBER_NOTICE_SOURCE={self.source!r}: expected one of {', '.join(SOURCES)}"
            )

    @classmethod
    def from_env(cls, env: dict[str, str]) -> NoticeConfig:
        return cls(env.get("EMBER_NOTICE_SOURCE", "none") or "none", env.get("EMBER_NOTICE_URL"))

    @property
    def base_url(self) -> str:
        return (self.url or DEFAULT_URLS.get(self.source, "")).rstrip("/")


class NoticeWatcher:
    """Asks this machine's metadata service for a preemption notice (`poll`)."""

    def __init__(self, config: NoticeConfig, now: Callable[[], float] = time.time) -> None:
        self.config = config
        self._now = now
        self._gce_seen: float | None = None  # when `preempted` was first TRUE
        self._token: str | None = None
        self._token_until = 0.0

    def poll(self) -> float | None:
        """Seconds until this machine is reclaimed (0 when overdue), or None: no notice, or
        no metadata service answering."""
        if self.config.source == "none":
            return None
        try:
            with httpx.Client(timeout=self.config.timeout_s) as client:
                if self.config.source == "aws":
                    return self._aws(client)
                return self._gce(client)
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as e:
            logger.debug("preemption notice: %s metadata did not answer: %s", self.config.source, e)
            return None

    def _aws(self, client: httpx.Client) -> float | None:
        base = self.config.base_url
        headers: dict[str, str] = {}
        if self._token is None or self._now() > self._token_until:
            r = client.put(
                base + "/latest/api/token",
                headers={"X-aws-ec2-metadata-token-ttl-seconds": str(AWS_TOKEN_TTL_S)},
            )
            self._token = r.text if r.status_code == 200 else None  # else IMDSv1
            self._token_until = self._now() + AWS_TOKEN_TTL_S / 2
        if self._token is not None:
            headers["X-aws-ec2-metadata-token"] = self._token
        r = client.get(base + "/latest/meta-data/spot/instance-action", headers=headers)
        if r.status_code == 404:
            return None
        if r.status_code == 401:  # the token expired early: fetch a new one next time
            self._token = None
            return None
        r.raise_for_status()
        when = datetime.fromisoformat(str(r.json()["time"]).replace("Z", "+00:00"))
        return max(when.timestamp() - self._now(), 0.0)

    def _gce(self, client: httpx.Client) -> float | None:
        r = client.get(
            self.config.base_url + "/computeMetadata/v1/instance/preempted",
            headers={"Metadata-Flavor": "Google"},
        )
        r.raise_for_status()
        if r.text.strip().upper() != "TRUE":
            self._gce_seen = None
            return None
        if self._gce_seen is None:
            self._gce_seen = self._now()
        return max(GCE_NOTICE_S - (self._now() - self._gce_seen), 0.0)
