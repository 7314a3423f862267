"""`ember serve`'s configuration: the ember.yaml file, merged with command-line flags.

Owns `ServeConfig` and its loader. Every key of the file is documented on the dataclass; an
unknown key is an error that names it (a typo must not be silently ignored). Flags given on
the command line win over the file; the file wins over the defaults.

Example ember.yaml:

    host: 127.0.0.1
    port: 8000
    address: null            # null: private Ray on 127.0.0.1; "auto" or HOST:PORT: join
    api_keys: [sk-user-1]
    admin_key: sk-admin
    state_dir: ~/.local/state/ember
    cache_dir: ~/.cache/ember  # default: $EMBER_CACHE_DIR if set
    reconcile_interval_s: 0.5
    ray: {num_cpus: 4, instance_cpus: 1, instance_gpus: 0, device: cpu,
          labels: {zone: a, spot: "false"}}
    api: {completion_default_max_tokens: 16}
    deployments:
      - {name: my-model, source: /models/my-model, max_instances: 2, keep_alive_s: 120}
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ember.controller.types import DeploymentSpec
from ember.errors import ConfigError


@dataclass(frozen=True, slots=True)
class RaySettings:
    """The `ray:` section (see ember.cluster.ClusterConfig for each field's meaning)."""

    num_cpus: int | None = None
    instance_cpus: float = 1.0
    instance_gpus: float = 0.0
    device: str = "cpu"
    labels: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class ServeConfig:
    """Everything `ember serve` needs.

    host, port: where the HTTP API binds (loopback unless told otherwise; a non-loopback
        host requires api_keys).
    address: None starts a private Ray on 127.0.0.1; "auto" or HOST:PORT joins a cluster.
    api_keys: Bearer tokens for /v1/*; admin_key: the token for /admin/*.
    state_dir: where the controller's SQLite file (ember.db) lives.
    cache_dir: converted checkpoints (per node), the node store's SSD tier and the demo model
        (default: $EMBER_CACHE_DIR, else ~/.cache/ember; what `LLM(...)` uses too).
    reconcile_interval_s: how often the controller compares desired and actual instances.
    ray: see RaySettings. api: extra ApiConfig fields, passed through.
    deployments: created (or updated) at start-up, in addition to those in the state file.
    demo: deploy the random-weight demo model when no deployment exists at all.
    """

    host: str = "127.0.0.1"
    port: int = 8000
    address: str | None = None
    api_keys: tuple[str, ...] = ()
    admin_key: str | None = None
    state_dir: str = "~/.local/state/ember"
    cache_dir: str = field(default_factory=lambda: default_cache_dir())
    reconcile_interval_s: float = 0.5
    ray: RaySettings = field(default_factory=RaySettings)
    api: tuple[tuple[str, Any], ...] = ()
    deployments: tuple[DeploymentSpec, ...] = ()
    demo: bool = True

    @property
    def db_path(self) -> Path:
        return Path(self.state_dir).expanduser() / "ember.db"

    def validate(self) -> None:
        if not 0 < self.port < 65536:
            raise ConfigError(f"port: {self.port} must be in 1..65535")
        if not (math.isfinite(self.reconcile_interval_s) and self.reconcile_interval_s > 0):
            raise ConfigError(f"reconcile_interval_s: must be > 0, got {self.reconcile_interval_s}")
        names = [d.name for d in self.deployments]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ConfigError(f"deployments: name {sorted(dup)[0]!r} appears twice")


def default_cache_dir() -> str:
    """$EMBER_CACHE_DIR, else ~/.cache/ember: one root for every ember cache on a machine."""
    return os.environ.get("EMBER_CACHE_DIR") or "~/.cache/ember"


def load_config(path: str | Path | None) -> ServeConfig:
    """Read ember.yaml (None: defaults). Errors name the file and the key."""
    if path is None:
        return ServeConfig()
    import yaml

    p = Path(path).expanduser()
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such config file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {str(e).splitlines()[0]}") from None
    try:
        return config_from_dict(data)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None


def config_from_dict(data: dict[str, Any]) -> ServeConfig:
    if not isinstance(data, dict):
        raise ConfigError("the top level must be a mapping")
    known = {f.name for f in fields(ServeConfig)}
    for key in data:
        if key not in known:
            raise ConfigError(f"{key}: unknown key (known: {', '.join(sorted(known))})")
    kw: dict[str, Any] = {}
    for key in ("host", "address", "admin_key", "state_dir", "cache_dir"):
        if key in data and data[key] is not None:
            kw[key] = _typed(key, data[key], str)
    if "port" in data:
        kw["port"] = _typed("port", data["port"], int)
    if "reconcile_interval_s" in data:
        kw["reconcile_interval_s"] = float(
            _typed("reconcile_interval_s", data["reconcile_interval_s"], (int, float))
        )
    if "demo" in data:
        kw["demo"] = _typed("demo", data["demo"], bool)
    if "api_keys" in data and data["api_keys"] is not None:
        keys = _typed("api_keys", data["api_keys"], list)
        kw["api_keys"] = tuple(_typed("api_keys[]", k, str) for k in keys)
    if "ray" in data and data["ray"] is not None:
        kw["ray"] = _ray_settings(_typed("ray", data["ray"], dict))
    if "api" in data and data["api"] is not None:
        kw["api"] = tuple(sorted(_typed("api", data["api"], dict).items()))
    if "deployments" in data and data["deployments"] is not None:
        specs = []
        for i, d in enumerate(_typed("deployments", data["deployments"], list)):
            try:
                specs.append(DeploymentSpec.from_dict(d))
            except ConfigError as e:
                raise ConfigError(f"deployments[{i}].{e}") from None
        kw["deployments"] = tuple(specs)
    config = ServeConfig(**kw)
    config.validate()
    return config


def _ray_settings(data: dict[str, Any]) -> RaySettings:
    known = {f.name for f in fields(RaySettings)}
    for key in data:
        if key not in known:
            raise ConfigError(f"ray.{key}: unknown key (known: {', '.join(sorted(known))})")
    kw: dict[str, Any] = {}
    if data.get("num_cpus") is not None:
        kw["num_cpus"] = _typed("ray.num_cpus", data["num_cpus"], int)
    for key in ("instance_cpus", "instance_gpus"):
        if key in data:
            kw[key] = float(_typed(f"ray.{key}", data[key], (int, float)))
    if "device" in data:
        kw["device"] = _typed("ray.device", data["device"], str)
    if data.get("labels") is not None:
        labels = _typed("ray.labels", data["labels"], dict)
        kw["labels"] = tuple(sorted((str(k), str(v)) for k, v in labels.items()))
    return RaySettings(**kw)


def _typed(name: str, value: Any, kind: type | tuple[type, ...]) -> Any:
    bad_bool = isinstance(value, bool) and kind is not bool
    if bad_bool or not isinstance(value, kind):
        want = kind.__name__ if isinstance(kind, type) else "number"
        raise ConfigError(f"{name}: expected {want}, got {value!r}")
    return value
