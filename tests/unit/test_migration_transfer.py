"""The live migration's choice between sending a request's K/V and recomputing it."""

from __future__ import annotations

import pytest

from ember.errors import ConfigError
from ember.migration.transfer import KvMode, MoveLink
from ember.policy import prefer_recompute

KV_PER_TOKEN = 45_056  # TinyLlama-1.1B's shape in fp32: 22 layers x 2 x 4 heads x 64 x 4 bytes


def test_auto_sends_the_cache_when_the_link_beats_the_prefill() -> None:
    link = MoveLink(KvMode.AUTO, transfer_Bps=1e9, overhead_s=0.05)
    # 1,000 tokens: 45 MB = 0.045 s + 0.05 s on the link, against 1 s of prefill at 1k tok/s.
    assert link.wants_kv(1000, KV_PER_TOKEN, prefill_tokens_per_s=1000.0)
    # A GPU that prefills 100k tokens/s recomputes them in 0.01 s: cheaper.
    assert not link.wants_kv(1000, KV_PER_TOKEN, prefill_tokens_per_s=100_000.0)
    # A short context costs less to prefill than the transfer's fixed part.
    assert not link.wants_kv(20, KV_PER_TOKEN, prefill_tokens_per_s=1000.0)
    # Not measured yet: send.
    assert link.wants_kv(20, KV_PER_TOKEN, prefill_tokens_per_s=None)
    assert not link.wants_kv(0, KV_PER_TOKEN, prefill_tokens_per_s=None)  # nothing cached


def test_always_and_never_ignore_the_costs() -> None:
    assert MoveLink(KvMode.ALWAYS).wants_kv(1, KV_PER_TOKEN, prefill_tokens_per_s=1e9)
    assert not MoveLink(KvMode.ALWAYS).wants_kv(0, KV_PER_TOKEN, prefill_tokens_per_s=1.0)
    assert not MoveLink("never").wants_kv(10**5, KV_PER_TOKEN, prefill_tokens_per_s=1.0)  # type: ignore[arg-type]


def test_the_break_even_point_follows_the_overhead() -> None:
    # 100 tokens at 1k tok/s = 0.1 s against 0.0045 s of bytes plus the overhead.
    for overhead, recompute in ((0.05, False), (0.2, True)):
        assert (
            prefer_recompute(
                100,
                100 * KV_PER_TOKEN,
                transfer_Bps=1e9,
                prefill_tokens_per_s=1000.0,
                overhead_s=overhead,
            )  # fmt: skip
            is recompute
        )


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ConfigError, match="transfer_Bps"):
        MoveLink(transfer_Bps=0)
    with pytest.raises(ConfigError, match="overhead_s"):
        MoveLink(overhead_s=-1)
    with pytest.raises(ValueError, match="sometimes"):
        MoveLink("sometimes")  # type: ignore[arg-type]
