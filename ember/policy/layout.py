"""Where a model's pieces live: positions of a parallel configuration, placements, model shape.

A position (replica d, pipeline stage p, tensor shard m) of a configuration with P stages and
M shards holds decoder layers `stage_layers(p, P, L)` (ceil(L / P) per stage, the last stage
shorter) and the hidden-dimension slice [m / M, (m + 1) / M) of each; stage 0 also holds the
embedding and the last stage the LM head, sliced the same way. A `Placement` maps every position
of a configuration to one GPU id; it is what the device mapper returns and the migration
planner reads.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from ember.errors import ConfigError, PolicyError
from ember.policy.optimizer import ParallelConfig


@dataclass(frozen=True, slots=True, order=True)
class Position:
    """One GPU's role in a configuration: replica, pipeline stage, tensor shard."""

    replica: int
    stage: int
    shard: int


@dataclass(frozen=True, slots=True)
class Gpu:
    """A usable GPU and the host it sits in (tensor-parallel groups stay within a host)."""

    gpu_id: str
    host_id: str


@dataclass(frozen=True, slots=True)
class ModelShape:
    """Bytes per piece of the model: one decoder layer, the embedding, the LM head (unsharded),
    and the KV cache one token adds to one layer (all shards)."""

    layers: int
    layer_bytes: int
    embed_bytes: int = 0
    head_bytes: int = 0
    kv_token_layer_bytes: int = 0

    def __post_init__(self) -> None:
        if self.layers < 1:
            raise ConfigError(f"layers must be >= 1, got {self.layers}")
        for name in ("layer_bytes", "embed_bytes", "head_bytes", "kv_token_layer_bytes"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")

    @classmethod
    def gpt(
        cls, layers: int, hidden: int, *, vocab: int = 50257, bytes_per_param: int = 4
    ) -> ModelShape:
        """A GPT-style decoder: 12h^2 + 13h parameters per layer, vocab x h embedding and head."""
        layer = (12 * hidden * hidden + 13 * hidden) * bytes_per_param
        embed = vocab * hidden * bytes_per_param
        return cls(layers, layer, embed, embed, 2 * hidden * bytes_per_param)

    @property
    def weight_bytes(self) -> int:
        return self.layers * self.layer_bytes + self.embed_bytes + self.head_bytes

    @staticmethod
    def kv_bytes_per_token_layer(hidden: int, bytes_per_param: int = 4) -> int:
        """KV cache bytes one token adds to one layer (keys and values)."""
        return 2 * hidden * bytes_per_param


def stage_layers(stage: int, pp: int, layers: int) -> tuple[int, int]:
    """Half-open decoder-layer range [lo, hi) of `stage` among `pp` stages."""
    per = -(-layers // pp)
    lo = min(stage * per, layers)
    return lo, min(lo + per, layers)


def shard_range(shard: int, tp: int) -> tuple[float, float]:
    """The hidden-dimension fraction [lo, hi) that tensor shard `shard` of `tp` holds."""
    return shard / tp, (shard + 1) / tp


def positions(config: ParallelConfig) -> Iterator[Position]:
    """Every position of `config`, replica-major, then stage, then shard."""
    for d in range(config.dp):
        for p in range(config.pp):
            for m in range(config.tp):
                yield Position(d, p, m)


def position_bytes(pos: Position, config: ParallelConfig, shape: ModelShape) -> int:
    """Weight bytes a position holds (its layers, plus embedding/head slices at the ends)."""
    lo, hi = stage_layers(pos.stage, config.pp, shape.layers)
    total = (hi - lo) * shape.layer_bytes
    if pos.stage == 0:
        total += shape.embed_bytes
    if pos.stage == config.pp - 1:
        total += shape.head_bytes
    return total // config.tp


@dataclass(frozen=True, slots=True)
class Placement:
    """A configuration and the GPU that fills each of its positions (one GPU per position)."""

    config: ParallelConfig
    assignment: Mapping[Position, str]

    def __post_init__(self) -> None:
        want = set(positions(self.config))
        got = set(self.assignment)
        if want != got:
            missing = sorted(want - got)[:3]
            extra = sorted(got - want)[:3]
            raise PolicyError(f"placement positions differ: missing {missing}, extra {extra}")
        gpus = list(self.assignment.values())
        if len(set(gpus)) != len(gpus):
            raise PolicyError("placement puts two positions on one GPU")
        object.__setattr__(
            self, "assignment", MappingProxyType(dict(sorted(self.assignment.items())))
        )

    def by_gpu(self) -> dict[str, Position]:
        return {g: p for p, g in self.assignment.items()}

    def gpus(self) -> frozenset[str]:
        return frozenset(self.assignment.values())

    def __hash__(self) -> int:
        return hash((self.config, tuple(self.assignment.items())))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Placement):
            return NotImplemented
        return self.config == other.config and dict(self.assignment) == dict(other.assignment)
