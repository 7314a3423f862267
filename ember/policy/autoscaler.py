"""Autoscaler: how many instances of one deployment should exist, as a pure function.

Reactive term (ServerlessLLM's rule): ceil((queued + in_flight) / target_concurrency).
Predictive term (optional, `predictive_window_s > 0`): Little's law on the recent arrival
rate, ceil(arrival_rate_per_s * mean_service_s / target_concurrency); the caller measures the
rate over the last `predictive_window_s` seconds. The larger of the two wins.
With no load at all (neither term), the current count is kept until `keep_alive_s` has passed
since the deployment was last busy, then the count drops to `min_instances` (scale to zero when
that is 0). The result is always within [min_instances, max_instances].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ember.errors import ConfigError


@dataclass(frozen=True, slots=True)
class AutoscalerConfig:
    """Scaling knobs of one deployment.

    min_instances: instances kept even when idle (0 allows scale to zero).
    max_instances: upper bound on instances (>= 1 and >= min_instances).
    target_concurrency: requests (queued + running) one instance should carry.
    keep_alive_s: idle seconds before scaling down to min_instances.
    predictive_window_s: window the caller measures the arrival rate over; 0 turns the
        predictive term off.
    """

    min_instances: int = 0
    max_instances: int = 1
    target_concurrency: int = 4
    keep_alive_s: float = 60.0
    predictive_window_s: float = 0.0  # 0 = off

    def __post_init__(self) -> None:
        if self.min_instances < 0:
            raise ConfigError(f"min_instances must be >= 0, got {self.min_instances}")
        if self.max_instances < 1:
            raise ConfigError(f"max_instances must be >= 1, got {self.max_instances}")
        if self.max_instances < self.min_instances:
            raise ConfigError(
                f"max_instances ({self.max_instances}) must be >= min_instances "
                f"({self.min_instances})"
            )
        if self.target_concurrency < 1:
            raise ConfigError(f"target_concurrency must be >= 1, got {self.target_concurrency}")
        if not (math.isfinite(self.keep_alive_s) and self.keep_alive_s >= 0):
            raise ConfigError(f"keep_alive_s must be a finite value >= 0, got {self.keep_alive_s}")
        if not (math.isfinite(self.predictive_window_s) and self.predictive_window_s >= 0):
            raise ConfigError(
                f"predictive_window_s must be a finite value >= 0, got {self.predictive_window_s}"
            )


def _check_count(name: str, value: int) -> None:
    if value < 0:
        raise ConfigError(f"{name} must be >= 0, got {value}")


def _check_rate(name: str, value: float | None) -> None:
    if value is not None and not (math.isfinite(value) and value >= 0):
        raise ConfigError(f"{name} must be a finite value >= 0, got {value}")


def predicted_instances(
    config: AutoscalerConfig, arrival_rate_per_s: float | None, mean_service_s: float | None
) -> int:
    """Instances the recent arrival rate needs (Little's law); 0 when off or without data."""
    if config.predictive_window_s <= 0 or arrival_rate_per_s is None or mean_service_s is None:
        return 0
    concurrency = arrival_rate_per_s * mean_service_s
    # Tolerate float noise so that exactly k * target does not round up to k + 1.
    return math.ceil(concurrency / config.target_concurrency - 1e-9)


def desired_instances(
    config: AutoscalerConfig,
    *,
    queued: int,
    in_flight: int,
    current: int,
    now_s: float,
    last_busy_s: float | None,
    arrival_rate_per_s: float | None = None,
    mean_service_s: float | None = None,
) -> int:
    """Desired instance count, within [config.min_instances, config.max_instances].

    `last_busy_s` is the last time (same scale as `now_s`) the deployment had any queued or
    running request; None means never, so an idle deployment goes straight to min_instances.
    """
    _check_count("queued", queued)
    _check_count("in_flight", in_flight)
    _check_count("current", current)
    _check_rate("arrival_rate_per_s", arrival_rate_per_s)
    _check_rate("mean_service_s", mean_service_s)
    if not math.isfinite(now_s):
        raise ConfigError(f"now_s must be finite, got {now_s}")

    reactive = -(-(queued + in_flight) // config.target_concurrency)
    wanted = max(reactive, predicted_instances(config, arrival_rate_per_s, mean_service_s))
    if wanted > 0:
        return _clamp(config, wanted)
    idle_s = math.inf if last_busy_s is None else now_s - last_busy_s
    if idle_s >= config.keep_alive_s:
        return config.min_instances
    return _clamp(config, current)


def _clamp(config: AutoscalerConfig, n: int) -> int:
    return min(config.max_instances, max(config.min_instances, n))
