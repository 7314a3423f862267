"""Start-up-time placement (ServerlessLLM), its comparisons, and the policy sets."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ember.errors import ConfigError
from ember.policy import (
    POLICY_NAMES,
    MappingStrategy,
    ModelSpec,
    PlacementConfig,
    PolicyName,
    ResumeMode,
    RunningInstance,
    ServerState,
    Tier,
    load_s,
    place,
    place_locality,
    place_random,
    place_round_robin,
    policy_set,
)

GB = 10**9
BW = {Tier.DRAM: 10 * GB, Tier.SSD: 2 * GB, Tier.PEER: 1 * GB, Tier.REMOTE: 0.1 * GB}
MODEL = ModelSpec("m", 10 * GB)
OTHER = ModelSpec("other", 5 * GB)


def _servers(*, s1_risk: float = 0.0) -> list[ServerState]:
    busy = RunningInstance("i1", OTHER, request_tokens=(600, 400))
    return [
        # s1: model in DRAM, but its only GPU runs i1
        ServerState("s1", 0, {"m": Tier.DRAM}, BW, instances=(busy,), preemption_risk=s1_risk),
        # s2: a free GPU, "other" on SSD, "m" only at a peer
        ServerState("s2", 1, {"other": Tier.SSD}, BW),
        # s3: model already on its GPU, but under a preemption notice
        ServerState("s3", 1, {"m": Tier.GPU}, BW, under_notice=True),
    ]


def test_startup_time_is_queue_wait_plus_bytes_over_the_fastest_tier() -> None:
    servers = _servers()
    assert load_s(servers[0], MODEL, servers) == pytest.approx(1.0)  # DRAM 10 GB/s
    assert load_s(servers[1], MODEL, servers) == pytest.approx(10.0)  # a peer's copy, 1 GB/s
    queued = ServerState("q", 1, {}, BW, queue_s=4.0)
    assert load_s(queued, ModelSpec("nowhere", GB), [queued]) == pytest.approx(4.0 + 10.0)  # remote
    assert load_s(servers[2], MODEL, servers) == 0.0  # GPU-resident


def test_locality_without_migration_takes_the_fastest_free_server() -> None:
    d = place_locality(_servers(), MODEL)
    assert d is not None and d.server_id == "s2" and d.tier is Tier.PEER  # s3 is under notice
    assert d.startup_s == pytest.approx(10.0)


def test_live_migration_frees_the_server_that_holds_the_model() -> None:
    d = place(_servers(), MODEL, PlacementConfig.serverlessllm())
    assert d is not None and d.server_id == "s1"
    # move i1 to s2: load "other" from SSD (2.5 s) + re-prefill 1000 tokens at 5000 tok/s (0.2 s)
    (mig,) = d.migrations
    assert (mig.instance_id, mig.src, mig.dst) == ("i1", "s1", "s2")
    assert mig.estimated_s == pytest.approx(2.7)
    assert d.startup_s == pytest.approx(2.7 + 1.0)


def test_migration_that_would_pause_requests_too_long_is_refused() -> None:
    d = place(_servers(), MODEL, PlacementConfig(max_migration_delay_s=0.1))
    assert d is not None and d.server_id == "s2" and d.migrations == ()


def test_ember_score_avoids_a_risky_server() -> None:
    d = place(_servers(s1_risk=0.5), MODEL, PlacementConfig.ember())
    assert d is not None and d.server_id == "s2"  # 3.7 s + 60 s * 0.5 risk > 10 s
    assert place(_servers(s1_risk=0.5), MODEL, PlacementConfig.serverlessllm()).server_id == "s1"  # type: ignore[union-attr]


def test_random_and_round_robin_ignore_locality_and_notices() -> None:
    servers = [ServerState(f"s{i}", 1, {}, BW) for i in range(4)]
    servers.append(ServerState("s9", 1, {}, BW, under_notice=True))
    picks = [place_random(servers, MODEL, random.Random(7)) for _ in range(2)]
    assert picks[0] == picks[1]  # same seed, same choice
    rng = random.Random(1)
    seen = {place_random(servers, MODEL, rng).server_id for _ in range(50)}  # type: ignore[union-attr]
    assert seen == {"s0", "s1", "s2", "s3"}
    cursor, order = 0, []
    for _ in range(5):
        d, cursor = place_round_robin(servers, MODEL, cursor)
        assert d is not None
        order.append(d.server_id)
    assert order == ["s0", "s1", "s2", "s3", "s0"]


def test_no_server_with_room_gives_no_decision() -> None:
    full = [ServerState("s", 0, {}, BW)]
    assert place(full, MODEL) is None
    assert place_random(full, MODEL, random.Random(0)) is None
    assert place_round_robin(full, MODEL, 3) == (None, 3)


def test_missing_bandwidth_names_server_and_tier() -> None:
    s = ServerState("lonely", 1, {"m": Tier.SSD}, {})
    with pytest.raises(ConfigError, match="lonely.*ssd"):
        load_s(s, MODEL, [s])


@settings(max_examples=50, deadline=None)
@given(
    free=st.lists(st.integers(0, 2), min_size=1, max_size=6),
    notice=st.lists(st.booleans(), min_size=6, max_size=6),
    tiers=st.lists(st.sampled_from([None, Tier.GPU, Tier.DRAM, Tier.SSD]), min_size=6, max_size=6),
)
def test_placement_never_picks_a_server_under_notice_or_without_room(
    free: list[int], notice: list[bool], tiers: list[Tier | None]
) -> None:
    inst = RunningInstance("i", OTHER, (100,))
    servers = [
        ServerState(
            f"s{i}",
            f,
            {} if tiers[i] is None else {"m": tiers[i]},  # type: ignore[dict-item]
            BW,
            instances=(inst,) if f == 0 else (),
            under_notice=notice[i],
        )
        for i, f in enumerate(free)
    ]
    by_id = {s.server_id: s for s in servers}
    d = place(servers, MODEL)
    if d is None:
        return
    assert not by_id[d.server_id].under_notice
    assert by_id[d.server_id].free_gpus >= MODEL.gpus or d.migrations
    assert all(not by_id[m.dst].under_notice and m.dst != d.server_id for m in d.migrations)
    assert place(servers, MODEL) == d


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), free=st.lists(st.integers(0, 2), min_size=1, max_size=8))
def test_random_placement_sequence_is_reproducible_for_a_seed(seed: int, free: list[int]) -> None:
    servers = [ServerState(f"s{i}", f, {}, BW) for i, f in enumerate(free)]

    def run() -> list[str | None]:
        rng = random.Random(seed)
        out = []
        for _ in range(5):
            d = place_random(servers, MODEL, rng)
            out.append(None if d is None else d.server_id)
        return out

    first = run()
    assert run() == first
    assert all(x is None or free[int(x[1:])] >= 1 for x in first)


def test_policy_sets_switch_exactly_the_published_differences() -> None:
    assert POLICY_NAMES == ("ember", "spotserve", "reroute", "reparallelize", "restart")
    ember, spot = policy_set("ember", min_gpus=12), policy_set(PolicyName.SPOTSERVE, min_gpus=12)
    assert spot.optimizer.rate_headroom == 0 and spot.optimizer.tie_tolerance == 0
    assert ember.optimizer == spot.optimizer and ember.optimizer.min_gpus == 12
    assert spot.keep_kv and spot.dropped is ResumeMode.RESTART and spot.published_budget
    assert ember.dropped is ResumeMode.RECOMPUTE and not ember.published_budget
    reroute, repar, restart = (policy_set(n) for n in ("reroute", "reparallelize", "restart"))
    assert not reroute.reparallelize and not reroute.reuse_context and not reroute.keep_kv
    assert repar.reparallelize and repar.restart_all and repar.mapping is MappingStrategy.PLAIN
    assert not restart.use_grace_period and not restart.reparallelize
    assert ember.with_optimizer(max_batch=8).optimizer.max_batch == 8
    with pytest.raises(ConfigError, match="unknown policy 'fast'"):
        policy_set("fast")
