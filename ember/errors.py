"""ember's exception hierarchy: every error ember raises on purpose derives from `EmberError`.

Callers catch the narrowest class they can act on. Errors carry what a person needs to fix
the problem: the file, field or knob at fault, and the value that was wrong.
"""

from __future__ import annotations


class EmberError(Exception):
    """Base class of every error ember raises on purpose."""


class ConfigError(EmberError, ValueError):
    """A configuration value or request parameter is invalid; the message names the field."""


# --- checkpoint store -------------------------------------------------------------------------


class CheckpointError(EmberError):
    """A checkpoint or model source cannot be read; the message names the file and the fault."""

    def __init__(self, path: object, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self) -> tuple[type, tuple[str, str]]:
        # Pickle with both arguments so the error crosses process boundaries (Ray actors).
        return (type(self), (self.path, self.reason))


class CheckpointNotFoundError(CheckpointError):
    """The checkpoint directory, index or a partition file does not exist."""


class CheckpointCorruptError(CheckpointError):
    """Bytes on disk do not match the index: checksum mismatch, truncation, bad offsets."""


class CheckpointFormatError(CheckpointError):
    """The index is unreadable or has an unknown format version."""


class UnsupportedDtypeError(CheckpointError):
    """A source tensor has a dtype the format cannot hold."""


class NoWeightsError(CheckpointError):
    """A source folder holds no weight files."""


class RemoteStoreError(CheckpointError):
    """The remote object store (S3 API) failed after every retry; the message names the object."""


class StoreCapacityError(CheckpointError):
    """A node-store tier cannot make room: the checkpoint is larger than the tier, or every
    other checkpoint in it is pinned (in use or being loaded)."""


# --- engine -----------------------------------------------------------------------------------


class EngineError(EmberError):
    """The engine cannot serve a request or load a model."""


class UnsupportedArchitectureError(EngineError, ValueError):
    """config.json names an architecture the engine has no model code for."""


class RequestError(EngineError, ValueError):
    """A request is invalid (empty prompt, too long, bad sampling parameter); names the field."""


class OutOfKVCacheError(EngineError):
    """The KV cache cannot hold even one request of the requested length."""


# --- serving ----------------------------------------------------------------------------------


class ServingError(EmberError):
    """Base class for errors raised by the controller, router and API."""


class ModelNotFoundError(ServingError):
    """No deployment has the requested name."""


class QueueFullError(ServingError):
    """The deployment's request queue is at its bound."""


class RequestTimeoutError(ServingError):
    """A request waited longer than its timeout."""


class DeploymentError(ServingError):
    """A deployment cannot be created, changed or started."""


class InstanceLostError(ServingError):
    """An instance died (its actor or node is gone) while serving or starting."""


class RequestQuarantinedError(ServingError):
    """A request lost with its instance again and again, the last time as the only suspect
    there (`ember.api.router`): not resumed again, and refused for a while if sent again."""


class KvPullError(ServingError):
    """A moving request's K/V could not be pulled from its source instance (the reason named);
    the target recomputes them instead."""


class InvalidRequestError(ServingError, ValueError):
    """An API request has a bad parameter; `param` names it (OpenAI's error `param` field)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        self.param = param
        super().__init__(message)


class AuthenticationError(ServingError):
    """An API request carries no API key, or one the server does not accept."""


# --- policy and simulator ---------------------------------------------------------------------


class PolicyError(EmberError):
    """A policy was given inputs it cannot decide on (no feasible configuration, etc.)."""


class TraceError(EmberError):
    """A trace, workload or profile file is malformed; the message names the file and line."""

    def __init__(self, path: object, line: int | None, reason: str) -> None:
        self.path = str(path)
        self.line = line
        self.reason = reason
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {reason}")


class ProfileError(PolicyError, ValueError):
    """A latency profile is missing a field or holds a bad value; the message names the field."""

    def __init__(self, field: str, reason: str) -> None:
        self.field = field
        self.reason = reason
        super().__init__(f"profile field {field!r}: {reason}")
