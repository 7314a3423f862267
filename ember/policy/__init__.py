"""ember.policy: pure, deterministic decision code shared by the controller and the simulator.

No I/O, no Ray, no torch. Time enters as `now_s` values (callers hold a `Clock`), randomness
only through a seeded `random.Random` passed in. See docs/policy.md for the interfaces.
"""

from __future__ import annotations

from ember.policy.autoscaler import AutoscalerConfig, desired_instances, predicted_instances
from ember.policy.clock import Clock, FakeClock, SystemClock
from ember.policy.device_map import DeviceMapping, MappingStrategy, map_devices, weight_matrix
from ember.policy.grace import (
    GraceBudget,
    ResumeMode,
    RunningRequest,
    Survival,
    arrange_grace,
    choose_survivors,
    grace_for_config,
    prefer_recompute,
    step_budget,
)
from ember.policy.hysteresis import (
    HysteresisConfig,
    expected_interval_s,
    hold_shape,
    latency_at_load,
    reshape_pause_s,
    same_shape,
)
from ember.policy.layout import (
    Gpu,
    ModelShape,
    Placement,
    Position,
    position_bytes,
    positions,
    stage_layers,
)
from ember.policy.migration_plan import (
    LinkBandwidth,
    MigrationPlan,
    Transfer,
    TransferKind,
    plan_migration,
)
from ember.policy.optimizer import (
    ConfigEstimate,
    OptimizerConfig,
    ParallelConfig,
    choose_config,
    estimate,
)
from ember.policy.policy_set import (
    POLICY_NAMES,
    PlacementStrategy,
    PolicyName,
    PolicySet,
    policy_set,
)
from ember.policy.profile import LatencyProfile, LayerCost
from ember.policy.reconfigure import (
    FleetView,
    Reconfiguration,
    Shortcuts,
    fixed_shape,
    kv_layer_bytes,
    plan_reconfiguration,
)
from ember.policy.startup import (
    Migration,
    ModelSpec,
    PlacementConfig,
    PlacementDecision,
    RunningInstance,
    ServerState,
    Tier,
    load_s,
    place,
    place_locality,
    place_random,
    place_round_robin,
    tier_of,
)

__all__ = [
    "POLICY_NAMES",
    "AutoscalerConfig",
    "Clock",
    "ConfigEstimate",
    "DeviceMapping",
    "FakeClock",
    "FleetView",
    "Gpu",
    "GraceBudget",
    "HysteresisConfig",
    "LatencyProfile",
    "LayerCost",
    "LinkBandwidth",
    "MappingStrategy",
    "Migration",
    "MigrationPlan",
    "ModelShape",
    "ModelSpec",
    "OptimizerConfig",
    "ParallelConfig",
    "Placement",
    "PlacementConfig",
    "PlacementDecision",
    "PlacementStrategy",
    "PolicyName",
    "PolicySet",
    "Position",
    "Reconfiguration",
    "ResumeMode",
    "RunningInstance",
    "RunningRequest",
    "ServerState",
    "Shortcuts",
    "Survival",
    "SystemClock",
    "Tier",
    "Transfer",
    "TransferKind",
    "arrange_grace",
    "choose_config",
    "choose_survivors",
    "desired_instances",
    "estimate",
    "expected_interval_s",
    "fixed_shape",
    "grace_for_config",
    "hold_shape",
    "kv_layer_bytes",
    "latency_at_load",
    "load_s",
    "map_devices",
    "place",
    "place_locality",
    "place_random",
    "place_round_robin",
    "plan_migration",
    "plan_reconfiguration",
    "policy_set",
    "position_bytes",
    "positions",
    "predicted_instances",
    "prefer_recompute",
    "reshape_pause_s",
    "same_shape",
    "stage_layers",
    "step_budget",
    "tier_of",
    "weight_matrix",
]
