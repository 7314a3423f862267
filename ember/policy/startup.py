"""Start-up-time estimator and placement (ServerlessLLM §scheduler), plus its comparisons.

Start-up of model m on server s = s's loading-queue wait + m's bytes / bandwidth of the fastest
tier holding m there (GPU-resident: no load; DRAM; SSD; a peer's copy; remote storage), the
bandwidths being measured inputs. When s lacks free GPUs, running instances there may be
live-migrated away: each migration costs the destination's start-up time for that instance's
model plus re-prefilling its requests' tokens; the migrations run in parallel before m loads.
A plan is valid only if no moved request is paused longer than `max_migration_delay_s`.
ember's score adds the server's preemption risk and price (ServerlessLLM has neither); servers
under a preemption notice are never chosen, neither as target nor as migration destination.
Comparisons: `place_random` (seeded), `place_round_robin` (cursor in, cursor out) and
`place_locality` (fastest start among servers with free GPUs, no migration).
"""

from __future__ import annotations

import enum
import itertools
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from ember.errors import ConfigError

RISK_WINDOW_S = 3600.0  # node losses this recent count toward a zone's preemption risk


def zone_risk(recent_losses: int, zone_nodes: int) -> float:
    """A spot server's preemption risk: the share of its zone's servers lost within the last
    RISK_WINDOW_S (capped at 1)."""
    return min(1.0, recent_losses / max(1, zone_nodes))


class Tier(str, enum.Enum):
    GPU = "gpu"
    DRAM = "dram"
    SSD = "ssd"
    PEER = "peer"
    REMOTE = "remote"


@dataclass(frozen=True, slots=True)
class ModelSpec:
    model_id: str
    size_bytes: int
    gpus: int = 1


@dataclass(frozen=True, slots=True)
class RunningInstance:
    instance_id: str
    model: ModelSpec
    request_tokens: tuple[int, ...] = ()  # prompt + generated tokens of each running request


@dataclass(frozen=True, slots=True)
class ServerState:
    server_id: str
    free_gpus: int
    tiers: Mapping[str, Tier] = field(default_factory=dict)  # model id -> fastest local tier
    bandwidth_Bps: Mapping[Tier, float] = field(default_factory=dict)  # noqa: N815
    queue_s: float = 0.0  # wait before this server's loader is free
    instances: tuple[RunningInstance, ...] = ()
    under_notice: bool = False
    preemption_risk: float = 0.0  # probability of losing the server within the next hour
    price_per_gpu_hour: float = 0.0


@dataclass(frozen=True, slots=True)
class PlacementConfig:
    """Knobs of `place`; `serverlessllm()` has no risk or price term."""

    migrate: bool = True
    max_migration_delay_s: float = 10.0
    prefill_tokens_per_s: float = 5000.0  # re-prefill speed at a migration destination
    risk_penalty_s: float = 0.0  # seconds added per unit of preemption risk
    price_weight_s: float = 0.0  # seconds added per $ / GPU-hour of the model's GPUs
    max_subset: int = 8  # instances considered for one migration set (2^n subsets)

    def __post_init__(self) -> None:
        for name in ("max_migration_delay_s", "risk_penalty_s", "price_weight_s"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ConfigError(f"{name} must be a finite value >= 0, got {v}")
        if not self.prefill_tokens_per_s > 0:
            raise ConfigError(f"prefill_tokens_per_s must be > 0, got {self.prefill_tokens_per_s}")

    @classmethod
    def serverlessllm(cls) -> PlacementConfig:
        return cls()

    @classmethod
    def ember(cls) -> PlacementConfig:
        return cls(risk_penalty_s=60.0, price_weight_s=1.0)


@dataclass(frozen=True, slots=True)
class Migration:
    instance_id: str
    src: str
    dst: str
    estimated_s: float


@dataclass(frozen=True, slots=True)
class PlacementDecision:
    server_id: str
    tier: Tier
    startup_s: float
    score: float
    migrations: tuple[Migration, ...] = ()


class _Holders:
    """Servers (not under notice) holding each model in a local tier, computed once per call."""

    __slots__ = ("_by_model", "_servers")

    def __init__(self, servers: Sequence[ServerState]) -> None:
        self._servers = servers
        self._by_model: dict[str, set[str]] = {}

    def of(self, model_id: str) -> set[str]:
        if model_id not in self._by_model:
            self._by_model[model_id] = {
                s.server_id
                for s in self._servers
                if not s.under_notice and s.tiers.get(model_id) in (Tier.GPU, Tier.DRAM, Tier.SSD)
            }
        return self._by_model[model_id]


def tier_of(server: ServerState, model_id: str, servers: Sequence[ServerState] | _Holders) -> Tier:
    """The fastest tier holding the model for `server`: local, else a peer's copy, else remote."""
    if model_id in server.tiers:
        return server.tiers[model_id]
    holders = servers if isinstance(servers, _Holders) else _Holders(servers)
    held = holders.of(model_id)
    if len(held) > 1 or (held and server.server_id not in held):
        return Tier.PEER
    return Tier.REMOTE


def load_s(
    server: ServerState, model: ModelSpec, servers: Sequence[ServerState] | _Holders
) -> float:
    """Loading-queue wait + bytes / bandwidth of the fastest tier (0 bytes to move if on GPU)."""
    tier = tier_of(server, model.model_id, servers)
    if tier is Tier.GPU:
        return server.queue_s
    bw = server.bandwidth_Bps.get(tier)
    if bw is None or not bw > 0:
        raise ConfigError(f"server {server.server_id}: no bandwidth for tier {tier.value!r}")
    return server.queue_s + model.size_bytes / bw


def score(server: ServerState, model: ModelSpec, startup: float, cfg: PlacementConfig) -> float:
    """What placement minimises: start-up + risk and price terms (`PlacementConfig`)."""
    risk = cfg.risk_penalty_s * server.preemption_risk
    return startup + risk + cfg.price_weight_s * server.price_per_gpu_hour * model.gpus


def _eligible(servers: Sequence[ServerState], model: ModelSpec) -> list[ServerState]:
    return sorted(
        (s for s in servers if not s.under_notice and s.free_gpus >= model.gpus),
        key=lambda s: s.server_id,
    )


def place_locality(
    servers: Sequence[ServerState], model: ModelSpec, cfg: PlacementConfig | None = None
) -> PlacementDecision | None:
    """Fastest start among servers with enough free GPUs (no migration); None if none."""
    cfg = cfg or PlacementConfig(migrate=False)
    holders = _Holders(servers)
    best: PlacementDecision | None = None
    for s in _eligible(servers, model):
        t = load_s(s, model, holders)
        tier = tier_of(s, model.model_id, holders)
        d = PlacementDecision(s.server_id, tier, t, score(s, model, t, cfg))
        if best is None or (d.score, d.startup_s) < (best.score, best.startup_s):
            best = d
    return best


def place_random(
    servers: Sequence[ServerState], model: ModelSpec, rng: random.Random
) -> PlacementDecision | None:
    """A seeded random server among those with enough free GPUs (no locality)."""
    pool = _eligible(servers, model)
    if not pool:
        return None
    s = rng.choice(pool)
    holders = _Holders(servers)
    t = load_s(s, model, holders)
    return PlacementDecision(s.server_id, tier_of(s, model.model_id, holders), t, t)


def place_round_robin(
    servers: Sequence[ServerState], model: ModelSpec, cursor: int
) -> tuple[PlacementDecision | None, int]:
    """The next server (by id order, from `cursor`) with enough free GPUs; returns new cursor."""
    ordered = sorted(servers, key=lambda s: s.server_id)
    n = len(ordered)
    for k in range(n):
        i = (cursor + k) % n
        s = ordered[i]
        if not s.under_notice and s.free_gpus >= model.gpus:
            holders = _Holders(servers)
            t = load_s(s, model, holders)
            return PlacementDecision(s.server_id, tier_of(s, model.model_id, holders), t, t), i + 1
    return None, cursor


def place(
    servers: Sequence[ServerState], model: ModelSpec, cfg: PlacementConfig | None = None
) -> PlacementDecision | None:
    """The server (and migrations) with the lowest score; None when nothing can host the model."""
    cfg = cfg or PlacementConfig()
    best = place_locality(servers, model, cfg)
    if not cfg.migrate:
        return best
    holders = _Holders(servers)
    for s in sorted(servers, key=lambda s: s.server_id):
        if s.under_notice or s.free_gpus >= model.gpus or not s.instances:
            continue
        t_load = load_s(s, model, holders)
        if best is not None and score(s, model, t_load, cfg) >= best.score:
            continue  # even a free migration would not beat the best so far
        plan = _migration_plan(s, model.gpus - s.free_gpus, servers, holders, cfg)
        if plan is None:
            continue
        moves, move_s = plan
        t = move_s + t_load
        tier = tier_of(s, model.model_id, holders)
        d = PlacementDecision(s.server_id, tier, t, score(s, model, t, cfg), moves)
        if best is None or (d.score, d.startup_s) < (best.score, best.startup_s):
            best = d
    return best


def _migration_plan(
    target: ServerState,
    deficit: int,
    servers: Sequence[ServerState],
    holders: _Holders,
    cfg: PlacementConfig,
) -> tuple[tuple[Migration, ...], float] | None:
    """Cheapest set of instances on `target` to move away, freeing `deficit` GPUs."""
    cands = sorted(target.instances, key=lambda i: (i.model.gpus, i.instance_id))[: cfg.max_subset]
    movable = [
        i
        for i in cands
        if sum(i.request_tokens) / cfg.prefill_tokens_per_s <= cfg.max_migration_delay_s
    ]
    options = {i.instance_id: _options(target, i, servers, holders, cfg) for i in movable}
    free = {s.server_id: s.free_gpus for s in servers}
    best: tuple[tuple[Migration, ...], float] | None = None
    for n in range(1, len(movable) + 1):
        for subset in itertools.combinations(movable, n):
            if sum(i.model.gpus for i in subset) < deficit:
                continue
            moves = _destinations(target, subset, options, dict(free))
            if moves is None:
                continue
            cost = max(m.estimated_s for m in moves)
            if best is None or cost < best[1]:
                best = (moves, cost)
    return best


def _options(
    target: ServerState,
    inst: RunningInstance,
    servers: Sequence[ServerState],
    holders: _Holders,
    cfg: PlacementConfig,
) -> list[tuple[float, str, int]]:
    """(migration estimate, destination, GPUs) for every server that could take `inst`, best first."""
    reprefill = sum(inst.request_tokens) / cfg.prefill_tokens_per_s
    return sorted(
        (load_s(s, inst.model, holders) + reprefill, s.server_id, inst.model.gpus)
        for s in servers
        if s.server_id != target.server_id and not s.under_notice and s.free_gpus >= inst.model.gpus
    )


def _destinations(
    target: ServerState,
    subset: Sequence[RunningInstance],
    options: Mapping[str, list[tuple[float, str, int]]],
    free: dict[str, int],
) -> tuple[Migration, ...] | None:
    """Each instance to its fastest destination that still has room (greedy, in subset order)."""
    moves: list[Migration] = []
    for inst in subset:
        pick = next(
            ((est, dst, g) for est, dst, g in options[inst.instance_id] if free[dst] >= g), None
        )
        if pick is None:
            return None
        est, dst, gpus = pick
        free[dst] -= gpus
        moves.append(Migration(inst.instance_id, target.server_id, dst, est))
    return tuple(moves)
