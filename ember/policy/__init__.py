"""ember.policy: pure, deterministic decision code shared by the controller and the simulator.

No I/O, no Ray, no torch. Time enters as `now_s` values (callers hold a `Clock`), randomness
only through a seeded `random.Random` passed in. See docs/policy.md for the interfaces.
"""

from __future__ import annotations

from ember.policy.autoscaler import AutoscalerConfig, desired_instances, predicted_instances
from ember.policy.clock import Clock, FakeClock, SystemClock
from ember.policy.device_map import DeviceMapping, MappingStrategy, map_devices, weight_matrix
from ember.policy.layout import Gpu, ModelShape, Placement, Position, positions, stage_layers
from ember.policy.optimizer import (
    ConfigEstimate,
    OptimizerConfig,
    ParallelConfig,
    choose_config,
    estimate,
)
from ember.policy.profile import LatencyProfile, LayerCost

__all__ = [
    "AutoscalerConfig",
    "Clock",
    "ConfigEstimate",
    "DeviceMapping",
    "FakeClock",
    "Gpu",
    "LatencyProfile",
    "LayerCost",
    "MappingStrategy",
    "ModelShape",
    "OptimizerConfig",
    "ParallelConfig",
    "Placement",
    "Position",
    "SystemClock",
    "choose_config",
    "desired_instances",
    "estimate",
    "map_devices",
    "positions",
    "predicted_instances",
    "stage_layers",
    "weight_matrix",
]
