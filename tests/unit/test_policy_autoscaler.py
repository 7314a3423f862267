"""Autoscaler and clocks: hand-worked cases at the boundaries, and properties over all inputs."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ember.errors import ConfigError
from ember.policy import AutoscalerConfig, FakeClock, SystemClock, desired_instances


def _desired(cfg: AutoscalerConfig, **kw: object) -> int:
    args: dict[str, object] = dict(queued=0, in_flight=0, current=0, now_s=100.0, last_busy_s=None)
    args.update(kw)
    return desired_instances(cfg, **args)  # type: ignore[arg-type]


CFG = AutoscalerConfig(min_instances=0, max_instances=5, target_concurrency=4, keep_alive_s=60.0)


@pytest.mark.parametrize(
    ("queued", "in_flight", "expected"),
    [(1, 0, 1), (0, 4, 1), (1, 4, 2), (8, 0, 2), (9, 0, 3), (20, 0, 5), (100, 100, 5)],
)
def test_reactive_count_is_ceiling_of_load_over_target_clamped_to_max(
    queued: int, in_flight: int, expected: int
) -> None:
    assert _desired(CFG, queued=queued, in_flight=in_flight, current=1, last_busy_s=100.0) == (
        expected
    )


def test_load_below_min_instances_keeps_min() -> None:
    cfg = AutoscalerConfig(min_instances=2, max_instances=4, target_concurrency=4)
    assert _desired(cfg, queued=1, current=3, last_busy_s=100.0) == 2


def test_idle_deployment_keeps_current_until_keep_alive_expires() -> None:
    kw = dict(current=3, last_busy_s=40.0)
    assert _desired(CFG, now_s=99.999, **kw) == 3
    assert _desired(CFG, now_s=100.0, **kw) == 0  # exactly keep_alive_s idle: scale to zero
    assert _desired(CFG, now_s=500.0, **kw) == 0


def test_idle_keep_alive_clamps_current_into_bounds() -> None:
    cfg = AutoscalerConfig(min_instances=1, max_instances=2, keep_alive_s=10.0)
    assert _desired(cfg, current=7, now_s=5.0, last_busy_s=0.0) == 2
    assert _desired(cfg, current=0, now_s=5.0, last_busy_s=0.0) == 1
    assert _desired(cfg, current=2, now_s=10.0, last_busy_s=0.0) == 1


def test_never_busy_deployment_sits_at_min_instances() -> None:
    cfg = AutoscalerConfig(min_instances=1, max_instances=3)
    assert _desired(cfg, current=3, last_busy_s=None) == 1


def test_predictive_term_only_counts_when_window_is_on() -> None:
    off = CFG
    on = AutoscalerConfig(max_instances=5, target_concurrency=4, predictive_window_s=30.0)
    kw = dict(queued=1, current=1, last_busy_s=100.0, arrival_rate_per_s=2.0, mean_service_s=6.0)
    assert _desired(off, **kw) == 1
    assert _desired(on, **kw) == 3  # 2 req/s * 6 s = 12 concurrent -> 3 instances of 4
    # exactly 2 * target: no spurious extra instance from float rounding
    assert _desired(on, **{**kw, "arrival_rate_per_s": 0.8, "mean_service_s": 10.0}) == 2


def test_predictive_term_wakes_an_idle_deployment_before_requests_queue() -> None:
    on = AutoscalerConfig(max_instances=5, target_concurrency=4, predictive_window_s=30.0)
    assert _desired(on, current=0, arrival_rate_per_s=0.1, mean_service_s=5.0) == 1
    assert _desired(on, current=0, arrival_rate_per_s=0.0, mean_service_s=5.0) == 0
    assert _desired(on, current=0, arrival_rate_per_s=None, mean_service_s=5.0) == 0


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"min_instances": -1}, "min_instances"),
        ({"max_instances": 0}, "max_instances"),
        ({"min_instances": 3, "max_instances": 2}, "max_instances"),
        ({"target_concurrency": 0}, "target_concurrency"),
        ({"keep_alive_s": -1.0}, "keep_alive_s"),
        ({"keep_alive_s": float("nan")}, "keep_alive_s"),
        ({"predictive_window_s": -0.5}, "predictive_window_s"),
    ],
)
def test_invalid_config_names_the_field(kwargs: dict[str, float], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        AutoscalerConfig(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"queued": -1}, "queued"),
        ({"in_flight": -2}, "in_flight"),
        ({"current": -1}, "current"),
        ({"arrival_rate_per_s": -0.1}, "arrival_rate_per_s"),
        ({"mean_service_s": float("inf")}, "mean_service_s"),
    ],
)
def test_invalid_inputs_name_the_argument(kwargs: dict[str, float], field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        _desired(CFG, **kwargs)


@settings(deadline=None)
@given(
    lo=st.integers(0, 8),
    span=st.integers(0, 8),
    target=st.integers(1, 16),
    queued=st.integers(0, 500),
    in_flight=st.integers(0, 500),
    current=st.integers(0, 50),
    idle=st.one_of(st.none(), st.floats(0, 1000)),
    rate=st.one_of(st.none(), st.floats(0, 100)),
)
def test_desired_is_always_within_bounds_and_monotone_in_load(
    lo: int,
    span: int,
    target: int,
    queued: int,
    in_flight: int,
    current: int,
    idle: float | None,
    rate: float | None,
) -> None:
    cfg = AutoscalerConfig(
        min_instances=lo,
        max_instances=max(1, lo + span),
        target_concurrency=target,
        predictive_window_s=10.0,
    )
    last = None if idle is None else 1000.0 - idle
    common = dict(current=current, now_s=1000.0, last_busy_s=last, arrival_rate_per_s=rate)
    n = desired_instances(cfg, queued=queued, in_flight=in_flight, mean_service_s=2.0, **common)  # type: ignore[arg-type]
    more = desired_instances(
        cfg,
        queued=queued + target,
        in_flight=in_flight,
        mean_service_s=2.0,
        **common,  # type: ignore[arg-type]
    )
    assert cfg.min_instances <= n <= cfg.max_instances
    if queued + in_flight > 0:
        assert more >= n


def test_fake_clock_moves_only_forward() -> None:
    clock = FakeClock(5.0)
    assert clock.now() == 5.0
    assert clock.advance(2.5) == 7.5
    clock.set(10.0)
    assert clock.now() == 10.0
    with pytest.raises(ConfigError, match="seconds"):
        clock.advance(-1.0)
    with pytest.raises(ConfigError, match="now_s"):
        clock.set(9.0)


def test_system_clock_is_monotonic() -> None:
    clock = SystemClock()
    a = clock.now()
    assert clock.now() >= a
