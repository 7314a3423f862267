"""Plain-data types shared by the controller, the cluster layer and the API.

Owns: `DeploymentSpec` (what a user asks for), `InstanceState` and its pure transition
function, `InstanceInfo` / `DeploymentStatus` (what `ember status` shows), `StreamDelta`
(one increment of a generation as it crosses from an instance to the router) and
`Continuation` (a request resumed on another instance after its own was lost, or the
target's copy in a live migration) and `Extension` (a later round of that migration).
Invariants: every type here is frozen and picklable; none holds a Ray or torch object.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from enum import Enum
from typing import Any

from ember.errors import ConfigError, DeploymentError

# The engine's names (ember.engine.config.DTYPE_NAMES), without importing torch here.
_DTYPES = ("auto", "float32", "float16", "bfloat16", "fp32", "fp16", "bf16", "float", "half")
_PREFETCH = ("ssd", "dram", "none")


@dataclass(frozen=True, slots=True)
class DeploymentSpec:
    """One deployment: a model source served under a name, with its scaling knobs.

    name: the model name clients send (`model` in the OpenAI API).
    source: a local Hugging Face folder, an ember checkpoint directory, or `s3://bucket/prefix`.
    min_instances / max_instances: bounds on instances; min 0 allows scale to zero.
    keep_alive_s: idle seconds before scaling down to min_instances.
    target_concurrency: requests (queued + running) one instance should carry.
    tp: tensor-parallel degree (ranks per instance).
    dtype: weight dtype: auto (the checkpoint's), float32, float16 or bfloat16.
    max_model_len: longest prompt + output in tokens; None = the model's own limit.
    max_num_seqs: sequences an instance batches at once.
    max_num_batched_tokens: tokens in one engine step (decodes first, then prompt chunks: a
        longer prompt is prefilled over several steps); lower bounds the stall a long prompt
        puts on running requests, higher prefills bursts in fewer steps.
    max_queue: requests the router queues for this deployment before answering 429.
    request_timeout_s: the longest a request may wait and run before a timeout error.
    prefetch: with min_instances 0, the tier ("ssd", "dram" or "none") one node's store
        brings the checkpoint into as soon as the deployment is created (or its source
        changes), so the first request starts from it: an `s3://` checkpoint is fetched; a
        local Hugging Face folder is converted on that node ("ssd") and loaded into its DRAM
        tier ("dram"). Ignored with min_instances > 0 (that instance fetches it). The same
        tier is used ahead of a scale-out, on the node the next instance would start on
        ("none" turns that off too).
    """

    name: str
    source: str
    min_instances: int = 0
    max_instances: int = 1
    keep_alive_s: float = 60.0
    target_concurrency: int = 4
    tp: int = 1
    dtype: str = "auto"
    max_model_len: int | None = None
    max_num_seqs: int = 16
    max_num_batched_tokens: int = 2048
    max_queue: int = 64
    request_timeout_s: float = 60.0
    prefetch: str = "ssd"

    def validate(self) -> None:
        """Raise ConfigError naming the first bad field."""
        if not self.name or len(self.name) > 128 or not _name_ok(self.name):
            raise ConfigError(
                f"name: {self.name!r} must be 1-128 characters of letters, digits, '.', '_', '-'"
            )
        if not self.source:
            raise ConfigError("source: must name a model folder or ember checkpoint")
        _at_least("min_instances", self.min_instances, 0)
        _at_least("max_instances", self.max_instances, 1)
        if self.max_instances < self.min_instances:
            raise ConfigError(
                f"max_instances: {self.max_instances} is below min_instances {self.min_instances}"
            )
        if not (math.isfinite(self.keep_alive_s) and self.keep_alive_s >= 0):
            raise ConfigError(f"keep_alive_s: must be a finite value >= 0, got {self.keep_alive_s}")
        _at_least("target_concurrency", self.target_concurrency, 1)
        _at_least("tp", self.tp, 1)
        if self.dtype not in _DTYPES:
            raise ConfigError(f"dtype: {self.dtype!r} is not one of {', '.join(_DTYPES)}")
        if self.max_model_len is not None:
            _at_least("max_model_len", self.max_model_len, 1)
        _at_least("max_num_seqs", self.max_num_seqs, 1)
        _at_least("max_num_batched_tokens", self.max_num_batched_tokens, 1)
        _at_least("max_queue", self.max_queue, 0)
        if not (math.isfinite(self.request_timeout_s) and self.request_timeout_s > 0):
            raise ConfigError(
                f"request_timeout_s: must be a finite value > 0, got {self.request_timeout_s}"
            )
        if self.prefetch not in _PREFETCH:
            raise ConfigError(f"prefetch: {self.prefetch!r} is not one of {', '.join(_PREFETCH)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeploymentSpec:
        """Build and validate a spec; unknown or missing fields raise ConfigError."""
        if not isinstance(data, dict):
            raise ConfigError(f"deployment: expected an object, got {type(data).__name__}")
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise ConfigError(f"{unknown[0]}: unknown deployment field")
        for required in ("name", "source"):
            if required not in data:
                raise ConfigError(f"{required}: missing")
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            kwargs[key] = _coerce(key, value, _field_kind(key))
        spec = cls(**kwargs)
        spec.validate()
        return spec


def _field_kind(name: str) -> str:
    if name in ("name", "source", "dtype", "prefetch"):
        return "str"
    if name in ("keep_alive_s", "request_timeout_s"):
        return "float"
    if name == "max_model_len":
        return "int?"
    return "int"


def _coerce(name: str, value: Any, kind: str) -> Any:
    if kind == "str":
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return value
    if kind == "int?" and value is None:
        return None
    if kind in ("int", "int?"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name}: expected a number, got {value!r}")
    return float(value)


def _at_least(name: str, value: int, low: int) -> None:
    if value < low:
        raise ConfigError(f"{name}: must be >= {low}, got {value}")


def _name_ok(name: str) -> bool:
    return all(c.isalnum() or c in "._-" for c in name) and name[0].isalnum()


class InstanceState(str, Enum):
    """Lifecycle of one instance (all its ranks together).

    pending: decided, actor not created yet. starting: actor created, engine loading.
    ready: serving. draining: takes no new requests, finishing its own. stopping: actor
    being killed. stopped / failed: terminal (failed keeps the error for `status`).
    """

    PENDING = "pending"
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    STOPPING = "stopping"
    STOPPED = "stopped"
    FAILED = "failed"

    def __str__(self) -> str:
        return self.value


class InstanceEvent(str, Enum):
    """What happens to an instance; `transition` maps (state, event) to the next state."""

    LAUNCHED = "launched"  # the actor (and its placement group) was created
    LOADED = "loaded"  # the engine reports ready
    DRAIN = "drain"  # scale-down chose this instance
    STOP = "stop"  # kill now (delete, drained, or scale-down of a non-ready instance)
    EXITED = "exited"  # the actor is gone
    ERROR = "error"  # start-up failed or the actor died

    def __str__(self) -> str:
        return self.value


_S = InstanceState
_E = InstanceEvent
_TRANSITIONS: dict[tuple[InstanceState, InstanceEvent], InstanceState] = {
    (_S.PENDING, _E.LAUNCHED): _S.STARTING,
    (_S.PENDING, _E.STOP): _S.STOPPED,
    (_S.PENDING, _E.ERROR): _S.FAILED,
    (_S.STARTING, _E.LOADED): _S.READY,
    (_S.STARTING, _E.STOP): _S.STOPPING,
    (_S.STARTING, _E.ERROR): _S.FAILED,
    (_S.READY, _E.DRAIN): _S.DRAINING,
    (_S.READY, _E.STOP): _S.STOPPING,
    (_S.READY, _E.ERROR): _S.FAILED,
    (_S.DRAINING, _E.STOP): _S.STOPPING,
    (_S.DRAINING, _E.ERROR): _S.FAILED,
    (_S.STOPPING, _E.EXITED): _S.STOPPED,
    (_S.STOPPING, _E.ERROR): _S.STOPPED,
    (_S.FAILED, _E.STOP): _S.FAILED,
    (_S.FAILED, _E.EXITED): _S.FAILED,
}

ACTIVE_STATES = frozenset({_S.PENDING, _S.STARTING, _S.READY})
TERMINAL_STATES = frozenset({_S.STOPPED, _S.FAILED})


def transition(state: InstanceState, event: InstanceEvent) -> InstanceState:
    """The state after `event`; raises DeploymentError for an event the state cannot take."""
    try:
        return _TRANSITIONS[(state, event)]
    except KeyError:
        raise DeploymentError(f"instance in state {state} cannot take event {event}") from None


@dataclass(frozen=True, slots=True)
class InstanceInfo:
    """One instance as `ember status` shows it."""

    instance_id: str
    deployment: str
    node_id: str | None
    state: InstanceState
    in_flight: int
    started_at_s: float
    load_s: float | None
    error: str | None = None
    tier: str | None = None  # where its weights came from: dram, ssd, remote, local or disk
    revision: int = 0  # the deployment revision it runs (`DeploymentStatus.revision`)
    # placement's estimate of its load (bytes over the tier's bandwidth), next to `load_s`
    estimated_load_s: float | None = None
    pid: int | None = None  # its process on its node (rank 0's for tensor parallelism)
    # its engine's counters at the controller's last health probe (ENGINE_STATS; None: none yet)
    engine: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["state"] = self.state.value
        return d


# The engine counters `ember status` shows per instance (from `EngineRunner.stats`): steps run,
# requests unfinished, moved requests whose K/V came from their source or had to be recomputed,
# K/V waiting on this instance for their targets, and the engine's failure if it failed.
ENGINE_STATS = ("steps", "unfinished", "kv_pulls", "kv_pull_failures", "kv_shelved", "broken")


def engine_counters(stats: dict[str, Any]) -> dict[str, Any]:
    """The `ENGINE_STATS` an instance's stats hold (what a health probe keeps)."""
    return {k: stats[k] for k in ENGINE_STATS if k in stats}


@dataclass(frozen=True, slots=True)
class DeploymentStatus:
    """One deployment with its instances and the autoscaler's current target."""

    spec: DeploymentSpec
    instances: tuple[InstanceInfo, ...]
    desired: int
    cached_on: tuple[str, ...] = ()  # nodes that converted the checkpoint (placement prefers them)
    revision: int = 0  # bumped by each update that replaces the instances (a rolling update)
    last_error: str | None = None  # why the last start failed (reset by a successful one)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.spec.name,
            "spec": self.spec.to_dict(),
            "desired": self.desired,
            "instances": [i.to_dict() for i in self.instances],
            "cached_on": list(self.cached_on),
            "revision": self.revision,
            "last_error": self.last_error,
        }


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """One cluster node as placement sees it: identity, labels and free capacity."""

    node_id: str
    address: str
    alive: bool
    labels: tuple[tuple[str, str], ...]  # sorted (key, value) pairs: spot, zone, ...
    cpus_total: float
    cpus_available: float
    gpus_total: float = 0.0
    gpus_available: float = 0.0

    def label(self, key: str) -> str | None:
        return dict(self.labels).get(key)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["labels"] = dict(self.labels)
        return d


@dataclass(frozen=True, slots=True)
class StreamDelta:
    """New output of one request since the previous delta (tokens, text, end of stream).

    prompt_tokens: the prompt's length in tokens (same in every delta of a request).
    logprobs: per new token, what the engine returns (None when not requested).
    """

    request_id: str
    new_token_ids: tuple[int, ...]
    new_text: str
    finished: bool
    finish_reason: str | None
    prompt_tokens: int
    logprobs: tuple[Any, ...] | None = None


@dataclass(frozen=True, slots=True)
class Continuation:
    """A request carried on after its instance was lost: it goes to the new instance where a
    prompt would (the engine's `resume_request` takes it) with what the client already has.

    output_token_ids: the ids streamed to the client so far.
    text: the text streamed so far (the new instance's text starts after it).
    hold: the target of a live migration: prefill, acknowledge, sample nothing until an
      `Extension` releases it (the engine's `resume_request(hold=True)`).
    kv: the K/V of the first tokens, from the migration's source (`ember.migration.transfer`):
      the bytes, or a ticket the target pulls them with from the source (`KvTicket`); None:
      all are recomputed.
    """

    prompt: str | list[int]
    output_token_ids: tuple[int, ...]
    text: str
    hold: bool = False
    kv: KvBlob | KvTicket | None = None


@dataclass(frozen=True, slots=True)
class KvBlob:
    """The K/V of a request's first `shape[2]` tokens as bytes, so that they cross processes
    (and the API server) without torch: a C-contiguous tensor of `shape`
    ([layers, 2, tokens, kv_heads, head_dim]) and torch dtype `dtype` ("bfloat16", ...)."""

    shape: tuple[int, ...]
    dtype: str
    data: bytes | bytearray

    @property
    def tokens(self) -> int:
        return self.shape[2]


@dataclass(frozen=True, slots=True)
class KvTicket:
    """A `KvBlob` left on its source instance's shelf for one pull (`ember.migration.kv_link`):
    where it is (`host`, `port`), which one (`ticket_id`) with its one-time `secret`, and what
    it holds, so the K/V go source -> target and only this crosses the API process."""

    host: str
    port: int
    ticket_id: str
    secret: bytes
    shape: tuple[int, ...]
    dtype: str
    nbytes: int

    @property
    def tokens(self) -> int:
        return self.shape[2]

    def __repr__(self) -> str:  # (no secret in logs)
        return f"KvTicket({self.host}:{self.port}, {self.ticket_id}, {self.shape}, {self.dtype})"


@dataclass(frozen=True, slots=True)
class Extension:
    """One round of a live migration for a held request (the engine's `extend_request`): the
    ids the source streamed since the previous round; with `release`, the text the client has
    and the end of the hold."""

    token_ids: tuple[int, ...]
    text: str = ""
    release: bool = False
