"""KV transfer or recomputation: what a live migration's target gets besides the tokens.

A moving request's target needs the K/V of every token the request has. It can recompute them
(a prefill of the whole context on the target) or receive them from the source (the source's
cache read out between two steps and pulled by the target straight from the source's node,
`ember.migration.kv_link`, then written into the target's blocks). Which
is cheaper depends on the model (bytes of K/V per token: grouped-query models hold few), the
hardware (how fast the target prefills) and the link. The source decides, when it is asked for
the request's state: it has measured its own prefill speed (`Engine.prefill_tokens_per_s`; the
target runs the same deployment on the same kind of machine) and weighs `tokens / prefill speed`
against `overhead + bytes / link` with the policy's `prefer_recompute`, the rule the simulator
uses too.

A moved cache also continues the request on exactly the numbers the source had: a recompute in
bf16 can flip a near-tied token (docs/serving.md), a transferred cache cannot.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ember.errors import ConfigError
from ember.policy.grace import prefer_recompute

if TYPE_CHECKING:
    from ember.controller.types import KvBlob
    from ember.engine.engine import Engine


class KvMode(str, enum.Enum):
    AUTO = "auto"  # the cheaper one, by the cost rule above
    ALWAYS = "always"  # move the cache whenever the request has one
    NEVER = "never"  # always recompute (send token ids only)


@dataclass(frozen=True, slots=True)
class MoveLink:
    """How a live migration moves a request's K/V: `mode`, and for AUTO the link's bytes per
    second between two instances (source node to target node) and a fixed cost per transfer
    (reading the cache out, serializing, writing it in), in seconds."""

    mode: KvMode = KvMode.AUTO
    transfer_Bps: float = 1e9  # noqa: N815  (a 10 Gb/s network, with room to spare)
    overhead_s: float = 0.05

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", KvMode(self.mode))
        if not self.transfer_Bps > 0:
            raise ConfigError(f"transfer_Bps must be > 0, got {self.transfer_Bps}")
        if not self.overhead_s >= 0:
            raise ConfigError(f"overhead_s must be >= 0, got {self.overhead_s}")

    def wants_kv(
        self, tokens: int, kv_bytes_per_token: int, prefill_tokens_per_s: float | None
    ) -> bool:
        """Whether `tokens` cached tokens are better sent than recomputed (an unmeasured
        prefill speed sends them: the engine has prefilled nothing of size yet, so it is
        probably slow to)."""
        if self.mode is not KvMode.AUTO or tokens <= 0:
            return self.mode is KvMode.ALWAYS and tokens > 0
        if prefill_tokens_per_s is None:
            return True
        return not prefer_recompute(
            tokens,
            tokens * kv_bytes_per_token,
            transfer_Bps=self.transfer_Bps,
            prefill_tokens_per_s=prefill_tokens_per_s,
            overhead_s=self.overhead_s,
        )


def export_for_move(engine: Engine, request_id: str, link: MoveLink) -> KvBlob | None:
    """The K/V of `request_id`'s cached tokens on `engine` when `link` says sending them beats
    recomputing them, else None (the request keeps running here)."""
    cached = engine.cached_tokens(request_id)  # (RequestError for an id not running here)
    if link.wants_kv(cached, engine.kv_bytes_per_token, engine.prefill_tokens_per_s):
        return engine.export_kv(request_id)
    return None
