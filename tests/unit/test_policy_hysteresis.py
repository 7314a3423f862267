"""Reconfiguration hysteresis: when ember keeps its shape instead of the optimizer's choice."""

from __future__ import annotations

import math

import pytest
from policy_fixtures import H6144_DICT

from ember.errors import ConfigError
from ember.policy import (
    ConfigEstimate,
    HysteresisConfig,
    LatencyProfile,
    LinkBandwidth,
    ModelShape,
    ParallelConfig,
    estimate,
    expected_interval_s,
    hold_shape,
    latency_at_load,
    reshape_pause_s,
)

HELD = ConfigEstimate(ParallelConfig(4, 4, 2, 2), 10.0, 1.0, 0.07, 0.8, True)
NEW = ConfigEstimate(ParallelConfig(2, 4, 4, 2), 9.0, 1.0, 0.06, 0.44, True)
CFG = HysteresisConfig(rate_headroom=0.25)


def test_change_pays_only_when_the_saving_over_the_horizon_beats_the_pause() -> None:
    # pause 10 s: the change costs 10^2 / 2 = 50 request-seconds per unit rate; it saves 1 s
    # per request, so it pays when the next change is more than 50 s away (tail rule off)
    mean_only = HysteresisConfig(max_paused_fraction=1.0)
    kw = {"rate_rps": 0.3, "pause_s": 10.0, "saving_s": 1.0, "cfg": mean_only}
    assert hold_shape(HELD, NEW, horizon_s=50.0, **kw)  # type: ignore[arg-type]
    assert not hold_shape(HELD, NEW, horizon_s=50.1, **kw)  # type: ignore[arg-type]
    assert not hold_shape(HELD, NEW, horizon_s=math.inf, **kw)  # type: ignore[arg-type]


def test_change_that_pauses_more_than_the_tail_fraction_is_refused() -> None:
    # default 1%: a 10 s pause needs 1,000 s until the next change, though it pays after 50 s
    kw = {"rate_rps": 0.3, "pause_s": 10.0, "saving_s": 1.0, "cfg": CFG}
    assert hold_shape(HELD, NEW, horizon_s=999.0, **kw)  # type: ignore[arg-type]
    assert not hold_shape(HELD, NEW, horizon_s=1000.0, **kw)  # type: ignore[arg-type]


def test_current_shape_without_headroom_gives_way_to_more_capacity() -> None:
    bigger = ConfigEstimate(ParallelConfig(2, 4, 4, 4), 9.5, 1.0, 0.06, 0.84, True)
    kw = {"pause_s": 10.0, "horizon_s": 1.0, "saving_s": 0.5, "cfg": CFG}
    # 0.8 req/s held throughput: enough headroom for 0.64 req/s, not for 0.65
    assert hold_shape(HELD, bigger, rate_rps=0.64, **kw)  # type: ignore[arg-type]
    assert not hold_shape(HELD, bigger, rate_rps=0.65, **kw)  # type: ignore[arg-type]
    # a faster shape with less capacity than the held one must still pay for the switch
    assert hold_shape(HELD, NEW, rate_rps=0.65, **kw)  # type: ignore[arg-type]


def test_headroom_is_not_traded_for_speed() -> None:
    # NEW gives 0.44 req/s: below 1.25 x 0.36; the held 0.8 req/s is above it
    kw = {"pause_s": 1.0, "horizon_s": math.inf, "saving_s": 1.0, "cfg": CFG}
    assert hold_shape(HELD, NEW, rate_rps=0.36, **kw)  # type: ignore[arg-type]
    assert not hold_shape(HELD, NEW, rate_rps=0.35, **kw)  # type: ignore[arg-type]


def test_new_shape_no_faster_at_the_load_is_never_worth_a_switch() -> None:
    kw = {"rate_rps": 0.1, "pause_s": 0.0, "horizon_s": math.inf, "cfg": CFG}
    assert hold_shape(HELD, NEW, saving_s=0.0, **kw)  # type: ignore[arg-type]
    assert hold_shape(HELD, NEW, saving_s=-0.5, **kw)  # type: ignore[arg-type]


def test_latency_at_load_uses_the_batch_the_load_fills() -> None:
    profile = LatencyProfile.from_dict(H6144_DICT)
    cfg = ParallelConfig(3, 8, 2, 4, 4, 1)
    full = estimate(profile, cfg)[0]  # about 13 s
    one = estimate(profile, ParallelConfig(3, 8, 2, 1, 1, 1))[0]
    two = estimate(profile, ParallelConfig(3, 8, 2, 2, 2, 1))[0]
    assert latency_at_load(profile, cfg, 0.01, 128) == one  # 0.01 x 13 / 3 < 1 request
    assert latency_at_load(profile, cfg, 0.35, 128) == two  # 0.35 x 13 / 3 = 1.5
    assert latency_at_load(profile, cfg, 5.0, 128) == full  # capped at B = 4
    assert len({one, two, full}) == 3  # batch 2 with two micro-batches beats batch 1 here


def test_pause_is_drain_plus_per_host_transfer_bound_plus_engine_start() -> None:
    shape = ModelShape(layers=4, layer_bytes=100, embed_bytes=40, head_bytes=60)
    bw = LinkBandwidth(inter_host_Bps=50.0, overhead_s=0.5)
    # new PP 2, TP 1: the biggest position is 2 layers + head = 260 bytes; 4 GPUs per host
    pause = reshape_pause_s(HELD, ParallelConfig(1, 1, 2, 1), shape, 4, bw, engine_start_s=2.0)
    assert pause == pytest.approx(10.0 + 0.5 + 4 * 260 / 50.0 + 2.0)
    # only the batching changes: the weights stay, drain + engine start
    same = reshape_pause_s(HELD, ParallelConfig(8, 4, 2, 4), shape, 4, bw, engine_start_s=2.0)
    assert same == pytest.approx(12.0)


def test_expected_interval_is_the_mean_recent_gap() -> None:
    assert expected_interval_s([], 8) == math.inf
    assert expected_interval_s([5.0, 5.0], 8) == math.inf  # one distinct time
    assert expected_interval_s([0.0, 10.0, 10.0, 40.0], 8) == 20.0
    assert expected_interval_s([0.0, 100.0, 110.0, 120.0], 2) == 10.0  # last two gaps only
    # With min_gaps=2 one gap is no estimate; the second gap gives one.
    assert expected_interval_s([0.0, 240.0], 8, min_gaps=2) == math.inf
    assert expected_interval_s([0.0, 240.0, 300.0], 8, min_gaps=2) == 150.0


def test_hysteresis_config_rejects_min_gaps_outside_window() -> None:
    with pytest.raises(ConfigError, match="min_gaps"):
        HysteresisConfig(history_window=4, min_gaps=5)
    with pytest.raises(ConfigError, match="min_gaps"):
        HysteresisConfig(min_gaps=0)


def test_bad_knobs_name_the_field() -> None:
    with pytest.raises(ConfigError, match="rate_headroom"):
        HysteresisConfig(rate_headroom=-0.1)
    with pytest.raises(ConfigError, match="max_paused_fraction"):
        HysteresisConfig(max_paused_fraction=1.5)
    with pytest.raises(ConfigError, match="history_window"):
        HysteresisConfig(history_window=0)
