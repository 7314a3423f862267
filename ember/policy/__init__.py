"""ember.policy: pure, deterministic decision code shared by the controller and the simulator.

No I/O, no Ray, no torch. Time enters as `now_s` values (callers hold a `Clock`), randomness
only through a seeded `random.Random` passed in. See docs/policy.md for the interfaces.
"""

from __future__ import annotations

from ember.policy.autoscaler import AutoscalerConfig, desired_instances, predicted_instances
from ember.policy.clock import Clock, FakeClock, SystemClock

__all__ = [
    "AutoscalerConfig",
    "Clock",
    "FakeClock",
    "SystemClock",
    "desired_instances",
    "predicted_instances",
]
