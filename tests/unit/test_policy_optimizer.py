"""Latency profile parsing and the parallel-configuration optimizer."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from policy_fixtures import H6144_DICT

from ember.errors import ConfigError, ProfileError
from ember.policy import (
    LatencyProfile,
    OptimizerConfig,
    ParallelConfig,
    choose_config,
    estimate,
)
from ember.policy.optimizer import queue_wait_s

PROFILES = Path("/work/shared/profiles/spotserve")
H6144 = PROFILES / "T4-4x" / "megatron_h6144_profile.json"
needs_profiles = pytest.mark.skipif(not H6144.exists(), reason="shared profiles not present")


def toy_profile(**overrides: Any) -> dict[str, Any]:
    """4 layers; TP2 is five times faster than TP1; no pipeline or embedding cost."""
    d: dict[str, Any] = {
        "name": "toy",
        "layer_num": 4,
        "final_fix_factor": 1.0,
        "pp_init_comm": 0.0,
        "pp_incr_comm": 0.0,
        "embed": [0.0],
        "tp-1": {"bsz-1": {"init": 100.0, "incr": 10.0}},
        "tp-2": {"bsz-1": {"init": 20.0, "incr": 2.0}},
    }
    d.update(overrides)
    return d


TOY = LatencyProfile.from_dict(toy_profile())

TOY_OPT = OptimizerConfig(max_batch=1, output_tokens=10)


@needs_profiles
@pytest.mark.parametrize("path", sorted(PROFILES.glob("*/*.json")), ids=lambda p: p.name)
def test_every_shared_profile_parses_and_round_trips(path: Path) -> None:
    p = LatencyProfile.from_dict(json.loads(path.read_text()))
    assert p.padded_layer_num >= p.layer_num
    assert LatencyProfile.from_dict(p.to_dict()) == p


@needs_profiles
def test_profile_fields_are_read_as_written() -> None:
    p = LatencyProfile.from_dict(json.loads(H6144.read_text()))
    assert (p.layer_num, p.padded_layer_num, p.hidden_size, p.max_tp) == (44, 48, 6144, 8)
    assert p.tp_degrees() == (1, 2, 4, 8)  # tp-16 is in the file but above max_tp
    assert p.cost(1, 1).init_ms == 107.203 and p.cost(8, 1).incr_ms == 1.758
    assert p.embed_cost_ms(4) == 0.607 and p.embed_cost_ms(64) == 1.079


@pytest.mark.parametrize(
    ("drop", "field"),
    [
        ("layer_num", "layer_num"),
        ("final_fix_factor", "final_fix_factor"),
        ("pp_init_comm", "pp_init_comm"),
        ("embed", "embed"),
    ],
)
def test_profile_missing_field_is_named(drop: str, field: str) -> None:
    d = toy_profile()
    del d[drop]
    with pytest.raises(ProfileError, match=field) as info:
        LatencyProfile.from_dict(d)
    assert info.value.field == field


def test_profile_bad_entries_are_named() -> None:
    with pytest.raises(ProfileError, match=r"tp-2\.bsz-1\.incr"):
        LatencyProfile.from_dict(toy_profile(**{"tp-2": {"bsz-1": {"init": 1.0}}}))
    with pytest.raises(ProfileError, match="pp_incr_comm"):
        LatencyProfile.from_dict(toy_profile(pp_incr_comm=-1))
    with pytest.raises(ProfileError, match="tp-1"):
        LatencyProfile.from_dict({k: v for k, v in toy_profile().items() if not k.startswith("tp")})


def test_latency_model_on_a_hand_worked_configuration() -> None:
    # TP2, P2, B1: L_s = 2; t1 = 20*2*2 = 80 ms; t2 = 2*2*2 = 8 ms; l = 80 + 10*8 = 160 ms
    lat, t1, t2 = estimate(TOY, ParallelConfig(1, 2, 2, 1), output_tokens=10)
    assert (lat, t1, t2) == pytest.approx((0.160, 0.080, 0.008))


def test_fast_tensor_parallel_configuration_clearly_wins() -> None:
    c = choose_config(TOY, 4, 10.0, TOY_OPT)
    assert c is not None and c.meets_rate
    assert c.config == ParallelConfig(dp=2, tp=2, pp=1, batch=1)
    assert c.latency_s == pytest.approx(0.160)
    assert c.throughput_rps == pytest.approx(12.5)


def test_unreachable_rate_falls_back_to_highest_throughput() -> None:
    c = choose_config(TOY, 4, 20.0, TOY_OPT)
    assert c is not None and not c.meets_rate
    assert c.config == ParallelConfig(2, 2, 1, 1)  # 12.5 req/s beats TP1 x4's 5 req/s


def test_near_tie_goes_to_fewer_gpus_only_in_ember_mode() -> None:
    # 6 GPUs: (D3, M2, P1) and (D1, M2, P2) both take 160 ms; the second uses 4 GPUs.
    published = choose_config(TOY, 6, 4.0, TOY_OPT)
    ember = choose_config(
        TOY, 6, 4.0, OptimizerConfig(max_batch=1, output_tokens=10, tie_tolerance=0.02)
    )
    assert published is not None and ember is not None
    assert published.config == ParallelConfig(3, 2, 1, 1)
    assert ember.config == ParallelConfig(1, 2, 2, 1)


def test_on_demand_gpus_top_up_when_spot_cannot_meet_the_rate() -> None:
    opt = OptimizerConfig(
        max_batch=1, output_tokens=10, max_on_demand_gpus=4, on_demand_step_gpus=2
    )
    c = choose_config(TOY, 2, 10.0, opt)
    assert c is not None and c.meets_rate
    assert c.on_demand_gpus == 2 and c.config == ParallelConfig(2, 2, 1, 1)
    spot_only = choose_config(TOY, 2, 10.0, TOY_OPT)
    assert spot_only is not None and not spot_only.meets_rate and spot_only.on_demand_gpus == 0


def test_rate_headroom_buys_throughput_on_48_gpus() -> None:
    # Published picks B2 at 0.495 req/s for 0.4 req/s (utilisation 0.81); 25% headroom wants
    # 0.5 req/s and so takes B4.
    p = LatencyProfile.from_dict(H6144_DICT)
    c = choose_config(p, 48, 0.4, OptimizerConfig(min_gpus=12, rate_headroom=0.25))
    assert c is not None
    assert c.config == ParallelConfig(3, 8, 2, 4, 4, 1)
    assert c.throughput_rps >= 0.5
    assert choose_config(p, 48, 0.4, OptimizerConfig.ember(min_gpus=12)) == choose_config(
        p, 48, 0.4, OptimizerConfig.spotserve(min_gpus=12)
    )


def test_queue_aware_ranking_trades_latency_for_a_shorter_queue() -> None:
    p = LatencyProfile.from_dict(H6144_DICT)
    poisson = choose_config(p, 48, 0.4, OptimizerConfig(min_gpus=12, queue_aware=True))
    periodic = choose_config(
        p, 48, 0.4, OptimizerConfig(min_gpus=12, queue_aware=True, arrival_cv=0.05)
    )
    assert poisson is not None and periodic is not None
    assert poisson.config.batch == 4  # 6 slots at utilisation 0.81 queue ~3 s; 12 slots barely
    assert periodic.config.batch == 2  # near-periodic arrivals hardly queue: lowest latency


def test_queue_wait_grows_with_utilisation_and_burstiness() -> None:
    assert queue_wait_s(0.0, 10.0, 4) == 0.0
    assert queue_wait_s(1.0, 10.0, 10) == math.inf  # utilisation 1
    low, high = queue_wait_s(0.2, 10.0, 4), queue_wait_s(0.35, 10.0, 4)
    assert 0 < low < high
    assert queue_wait_s(0.35, 10.0, 4, arrival_cv=2.0) == pytest.approx(4 * high)


def test_too_few_gpus_for_the_model_gives_no_configuration() -> None:
    assert choose_config(TOY, 3, 1.0, OptimizerConfig(max_batch=1, min_gpus=4)) is None
    assert choose_config(TOY, 0, 1.0, TOY_OPT) is None


def test_negative_rate_and_gpu_count_are_rejected() -> None:
    with pytest.raises(ConfigError, match="arrival_rate_rps"):
        choose_config(TOY, 4, -1.0)
    with pytest.raises(ConfigError, match="n_gpus"):
        choose_config(TOY, -4, 1.0)


@pytest.mark.parametrize(
    ("n", "config", "latency_s", "meets"),
    [
        (48, ParallelConfig(3, 8, 2, 2, 2, 1), 12.1, True),
        (32, ParallelConfig(2, 8, 2, 4, 4, 1), 13.0, True),
        (24, ParallelConfig(2, 4, 3, 4, 4, 1), 14.5, True),
        (12, ParallelConfig(1, 4, 3, 4, 4, 1), 14.5, False),
    ],
)
def test_spotserve_worked_example_on_the_20b_t4_profile(
    n: int, config: ParallelConfig, latency_s: float, meets: bool
) -> None:
    p = LatencyProfile.from_dict(H6144_DICT)
    c = choose_config(p, n, 0.4, OptimizerConfig.spotserve(min_gpus=12))
    assert c is not None
    assert c.config == config and c.meets_rate is meets
    assert c.latency_s == pytest.approx(latency_s, abs=0.05)


@settings(max_examples=60, deadline=None)
@given(n=st.integers(0, 40), rate=st.floats(0, 30), tie=st.sampled_from([0.0, 0.05]))
def test_choice_fits_the_gpus_and_meets_the_rate_when_it_says_so(
    n: int, rate: float, tie: float
) -> None:
    opt = OptimizerConfig(max_batch=1, output_tokens=10, tie_tolerance=tie)
    c = choose_config(TOY, n, rate, opt)
    if n == 0:
        assert c is None
        return
    assert c is not None
    assert c.config.gpus <= n
    assert c.meets_rate == (c.throughput_rps >= rate)
    assert choose_config(TOY, n, rate, opt) == c  # same inputs, same choice
