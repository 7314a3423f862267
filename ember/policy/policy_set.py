"""Policy sets: the named bundles of decisions the simulator (and controller) switch between.

A `PolicySet` only says *which* pure functions and knobs to use; the caller runs them. The
names and what each one means:

| name | config on change | context kept | interrupted requests | grace period |
|---|---|---|---|---|
| `ember` | optimizer (published ranking), current shape held unless a change pays | KM map, KV + weights (weights from storage when faster) | KV kept, else recompute with tokens kept; shrinking-batch budget | used |
| `spotserve` | optimizer as published | KM map, KV + weights | KV kept for the most-progressed, others restart | used, published budget |
| `reroute` | TP/PP fixed at the first choice, only D changes | none: new replicas load from storage | restart from scratch elsewhere | used until the kill |
| `reparallelize` | optimizer as published | none: every replica restarts and reloads | restart from scratch | used until the kill |
| `restart` | fixed first config | none: lost replicas reload when GPUs return | restart from scratch | ignored |

Serverless placement (ServerlessLLM's comparisons) is the `placement` field: `ember` (start-up
time + migration + risk and price), `serverlessllm` (start-up time + migration), `locality`
(start-up time, no migration), `round_robin`, `random`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field, replace
from typing import Any

from ember.errors import ConfigError
from ember.policy.device_map import MappingStrategy
from ember.policy.grace import ResumeMode
from ember.policy.hysteresis import HysteresisConfig
from ember.policy.optimizer import OptimizerConfig
from ember.policy.startup import PlacementConfig


class PolicyName(str, enum.Enum):
    EMBER = "ember"
    SPOTSERVE = "spotserve"
    REROUTE = "reroute"
    REPARALLELIZE = "reparallelize"
    RESTART = "restart"


class PlacementStrategy(str, enum.Enum):
    EMBER = "ember"
    SERVERLESSLLM = "serverlessllm"
    LOCALITY = "locality"
    ROUND_ROBIN = "round_robin"
    RANDOM = "random"


@dataclass(frozen=True, slots=True)
class PolicySet:
    """Which decisions a policy makes; see the module table.

    reparallelize: re-run the optimizer on every change (False: TP/PP stay at the first choice
        and only the replica count D follows the GPUs).
    mapping: KM keeps context in place; PLAIN fills positions in order.
    reuse_context: surviving GPUs keep their weights (and KV when `keep_kv`) and missing pieces
        move peer to peer per the migration plan; False: every new or changed replica loads
        its weights from storage.
    restart_all: every replica stops and reloads on any change (reparallelization baseline).
    keep_kv: running requests of kept replicas resume at the same decode step.
    dropped: how requests that cannot keep KV resume (RECOMPUTE keeps generated tokens).
    use_grace_period: keep decoding during the notice (step budget from `arrange_grace`).
    published_budget: SpotServe's budget (one step held back, fixed batch step time);
        False: ember's shrinking-batch budget.
    survivors_by_tokens: rank replicas to keep by tokens saved (ember) or by decode step.
    progressive: the new configuration starts once the front layers arrive (`prefix_ready_s`).
    memory_limit: order transfers to respect each GPU's memory.
    load_when_faster: read the built replicas' weights from storage instead when that is faster
        than the peer transfers (few senders and many receivers: a growing fleet); KV still
        moves peer to peer.
    hysteresis: keep the current shape unless a change pays for its pause (hysteresis.py);
        None: take the optimizer's choice on every change (SpotServe).
    """

    name: PolicyName
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig.spotserve)
    reparallelize: bool = True
    mapping: MappingStrategy = MappingStrategy.KM
    reuse_context: bool = True
    restart_all: bool = False
    keep_kv: bool = True
    dropped: ResumeMode = ResumeMode.RESTART
    use_grace_period: bool = True
    published_budget: bool = True
    survivors_by_tokens: bool = False
    progressive: bool = True
    memory_limit: bool = True
    load_when_faster: bool = False
    hysteresis: HysteresisConfig | None = None
    placement: PlacementStrategy = PlacementStrategy.SERVERLESSLLM
    placement_config: PlacementConfig = field(default_factory=PlacementConfig.serverlessllm)

    def with_optimizer(self, **changes: Any) -> PolicySet:
        """The same policy with optimizer fields changed (e.g. min_gpus, max_batch)."""
        return replace(self, optimizer=replace(self.optimizer, **changes))


def policy_set(name: str | PolicyName, *, min_gpus: int = 1, max_batch: int = 4) -> PolicySet:
    """The named policy set, its optimizer sized for a model needing `min_gpus` GPUs."""
    try:
        key = PolicyName(name)
    except ValueError:
        known = ", ".join(p.value for p in PolicyName)
        raise ConfigError(f"unknown policy {name!r}; known: {known}") from None
    published = OptimizerConfig.spotserve(min_gpus=min_gpus, max_batch=max_batch)
    if key is PolicyName.EMBER:
        return PolicySet(
            key,
            optimizer=OptimizerConfig.ember(min_gpus=min_gpus, max_batch=max_batch),
            dropped=ResumeMode.RECOMPUTE,
            published_budget=False,
            survivors_by_tokens=True,
            load_when_faster=True,
            hysteresis=HysteresisConfig(),
            placement=PlacementStrategy.EMBER,
            placement_config=PlacementConfig.ember(),
        )
    if key is PolicyName.SPOTSERVE:
        return PolicySet(key, optimizer=published)
    baseline = PolicySet(
        key,
        optimizer=published,
        mapping=MappingStrategy.PLAIN,
        reuse_context=False,
        keep_kv=False,
        dropped=ResumeMode.RESTART,
        progressive=False,
        memory_limit=False,
        placement=PlacementStrategy.LOCALITY,
        placement_config=PlacementConfig(migrate=False),
    )
    if key is PolicyName.REROUTE:
        return replace(baseline, reparallelize=False)
    if key is PolicyName.REPARALLELIZE:
        return replace(baseline, restart_all=True)
    return replace(baseline, reparallelize=False, use_grace_period=False)


POLICY_NAMES: tuple[str, ...] = tuple(p.value for p in PolicyName)
