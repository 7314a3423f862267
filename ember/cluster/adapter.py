"""The one thin layer over Ray: every `ray.*` call ember makes goes through this module.

Owns: starting or joining a Ray cluster (the embedded default keeps every Ray process on
127.0.0.1 with no dashboard), listing nodes with their labels and free resources, creating
instance actors (node affinity, or a placement group for tensor-parallel instances), calling
and streaming actor methods from asyncio, and killing actors with their placement groups.

Ray's exceptions stop here: an actor that died surfaces as `InstanceLostError`, an error the
actor raised on purpose surfaces as itself.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, remove_placement_group
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from ember.controller.types import NodeInfo
from ember.errors import ConfigError, DeploymentError, InstanceLostError

logger = logging.getLogger(__name__)

NAMESPACE = "ember"
ACTOR_PREFIX = "ember-instance:"
LOOPBACK = "127.0.0.1"


WORKER_LOG_LEVEL_ENV = "EMBER_WORKER_LOG_LEVEL"


def _plain_log_prefixes() -> None:
    """The actors' lines Ray forwards to this process carry no colour codes unless it writes to
    a terminal (a log file or journal gets plain text)."""
    if not (sys.stdout.isatty() and sys.stderr.isatty()):
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")


def worker_logging() -> None:
    """In an actor's process: ember's loggers write INFO and up to stderr, which Ray forwards to
    the driver's output (`log_to_driver`: `ember serve`'s log), each line prefixed with the
    actor's class and pid. A Ray worker's root logger has no handler, so only warnings reached
    stderr (through logging's last resort) and an instance's INFO lines (ready, K/V pulled, the
    node store's fetches) were lost. `EMBER_WORKER_LOG_LEVEL` (default INFO) sets the level;
    other libraries' loggers are left as they are."""
    log = logging.getLogger("ember")
    if any(getattr(h, "ember_worker", False) for h in log.handlers):
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    handler.ember_worker = True  # type: ignore[attr-defined]
    log.addHandler(handler)
    level = os.environ.get(WORKER_LOG_LEVEL_ENV, "INFO").upper()
    log.setLevel(level if isinstance(logging.getLevelName(level), int) else "INFO")
    log.propagate = False  # (a handler Ray may put on the root logger would print it twice)


@dataclass(frozen=True, slots=True)
class ActorRef:
    """An actor handle and what was reserved for it; opaque outside ember.cluster."""

    name: str
    actor: Any  # ray.actor.ActorHandle
    placement_group: PlacementGroup | None = None


class RayAdapter:
    """A connection to one Ray cluster (local or joined); `shutdown()` leaves it."""

    def __init__(self, *, owns_cluster: bool) -> None:
        self.owns_cluster = owns_cluster

    @classmethod
    def start_local(
        cls, *, num_cpus: int | None = None, labels: dict[str, str] | None = None
    ) -> RayAdapter:
        """Start a private Ray instance bound to 127.0.0.1 (GCS, raylet, workers; no dashboard)."""
        # Ray keeps a local instance on loopback only with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0:
        # the processes ray.init starts read it from the environment, and this one read it into
        # `ray_constants` when it imported ray, before this ran. Without both, the GCS, the
        # raylet and the workers listened on every interface and took the machine's address.
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        from ray._private import ray_constants

        ray_constants.ENABLE_RAY_CLUSTER = False
        if ray.is_initialized():
            raise DeploymentError("Ray is already initialised in this process")
        _plain_log_prefixes()
        try:
            ray.init(
                # "local" always starts a new instance: with no address, ray.init would join
                # a cluster that `ray start` left running on this machine.
                address="local",
                num_cpus=num_cpus,
                labels=labels or None,
                include_dashboard=False,
                dashboard_host=LOOPBACK,
                _node_ip_address=LOOPBACK,
                namespace=NAMESPACE,
                logging_level=logging.WARNING,
                log_to_driver=True,
                # At shutdown the driver flushes its task events (for Ray's task listing) to the
                # GCS, waiting up to 5 s by default. When a service manager stops the whole
                # process group (systemd's default), the GCS is already gone and every stop took
                # ~9 s; on loopback a live GCS answers within milliseconds.
                _system_config={"task_events_shutdown_flush_timeout_ms": 100},
            )
        except Exception as e:  # Ray's own errors are many and untyped: one line for the user
            raise DeploymentError(f"cannot start a local Ray instance: {_first_line(e)}") from e
        logger.info("ray started address=%s num_cpus=%s", _gcs_address(), num_cpus)
        return cls(owns_cluster=True)

    @classmethod
    def connect(cls, address: str) -> RayAdapter:
        """Join an existing cluster ("auto" or HOST:PORT of its GCS)."""
        if not address:
            raise ConfigError("address: must be 'auto' or HOST:PORT")
        if ray.is_initialized():
            raise DeploymentError("Ray is already initialised in this process")
        if address != "auto":
            _check_reachable(address)  # ray.init would retry an unreachable GCS for minutes
        _plain_log_prefixes()
        try:
            ray.init(address=address, namespace=NAMESPACE, logging_level=logging.WARNING)
        except Exception as e:  # ConnectionError, timeouts, version mismatches, auth
            raise DeploymentError(
                f"cannot join the Ray cluster at {address}: {_first_line(e)}"
            ) from None
        logger.info("ray joined address=%s", _gcs_address())
        return cls(owns_cluster=False)

    @classmethod
    def attach(cls) -> RayAdapter:
        """Use the Ray connection this process already has (tests sharing one cluster)."""
        if not ray.is_initialized():
            raise DeploymentError("Ray is not initialised in this process")
        return cls(owns_cluster=False)

    def shutdown(self) -> None:
        if self.owns_cluster and ray.is_initialized():
            ray.shutdown()

    @property
    def address(self) -> str:
        return _gcs_address()

    # --- nodes ---------------------------------------------------------------------------

    def nodes(self) -> list[NodeInfo]:
        """Alive and dead nodes with labels and free resources (one GCS round trip each)."""
        available = _available_by_node()
        out = []
        for n in ray.nodes():
            node_id = n["NodeID"]
            total = n.get("Resources", {})
            free = available.get(node_id, {})
            labels = {
                k: v for k, v in (n.get("Labels") or {}).items() if not k.startswith("ray.io/")
            }
            out.append(
                NodeInfo(
                    node_id=node_id,
                    address=n.get("NodeManagerAddress", ""),
                    alive=bool(n.get("Alive")),
                    labels=tuple(sorted(labels.items())),
                    cpus_total=float(total.get("CPU", 0.0)),
                    cpus_available=float(free.get("CPU", 0.0)),
                    gpus_total=float(total.get("GPU", 0.0)),
                    gpus_available=float(free.get("GPU", 0.0)),
                )
            )
        return out

    # --- actors --------------------------------------------------------------------------

    def create_actor(
        self,
        cls: type,
        name: str,
        args: tuple[Any, ...],
        *,
        cpus: float,
        gpus: float,
        node_id: str | None,
        ranks: int = 1,
        env: dict[str, str] | None = None,
    ) -> ActorRef:
        """Create a named actor without waiting for it to be scheduled.

        Soft node affinity to `node_id` (Ray falls back to any node if it is full). Several
        ranks: the actor reserves every rank's CPUs and GPUs itself, so they are on one node
        and Ray makes all of the GPUs visible to it (CUDA_VISIBLE_DEVICES lists `ranks *
        gpus` devices); the engine's own launcher starts ranks 1..ranks-1 as processes beside
        it, which inherit that list, and rank r uses `cuda:r`. (A placement group with one
        bundle per rank, the first design, showed the actor only bundle 0's GPU.)
        """
        cpus, gpus = cpus * ranks, gpus * ranks
        if node_id is not None:
            strategy: Any = NodeAffinitySchedulingStrategy(node_id=node_id, soft=True)
        else:
            strategy = "DEFAULT"
        remote_cls: Any = ray.remote(cls)
        actor = remote_cls.options(
            name=name,
            namespace=NAMESPACE,
            num_cpus=cpus,
            num_gpus=gpus,
            max_restarts=0,
            max_concurrency=1000,
            scheduling_strategy=strategy,
            runtime_env={"env_vars": env} if env else None,
        ).remote(*args)
        return ActorRef(name=name, actor=actor)

    async def call(
        self, ref: ActorRef, method: str, *args: Any, timeout_s: float | None = None
    ) -> Any:
        """Await one actor method call; Ray's errors are translated (see module docstring)."""
        obj = getattr(ref.actor, method).remote(*args)
        try:
            if timeout_s is None:
                return await obj
            return await asyncio.wait_for(_await_ref(obj), timeout_s)
        except ray.exceptions.RayTaskError as e:
            raise _cause(e) from None
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
            raise InstanceLostError(f"{ref.name}: {_first_line(e)}") from None

    def send(self, ref: ActorRef, method: str, *args: Any) -> None:
        """Call an actor method without waiting for it (its result and errors are dropped).

        Calls from one caller to one actor start in the order they were sent.
        """
        getattr(ref.actor, method).remote(*args)

    async def stream(self, ref: ActorRef, method: str, *args: Any) -> AsyncGenerator[Any, None]:
        """Iterate a streaming actor method; closing this iterator cancels the remote one."""
        gen = getattr(ref.actor, method).options(num_returns="streaming").remote(*args)
        done = False
        try:
            async for obj in gen:
                yield await obj
            done = True
        except ray.exceptions.RayTaskError as e:
            done = True
            raise _cause(e) from None
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
            done = True
            raise InstanceLostError(f"{ref.name}: {_first_line(e)}") from None
        finally:
            if not done:
                try:
                    ray.cancel(gen)
                except Exception:  # the stream may have ended in the meantime
                    logger.debug("cancel of a stream from %s failed", ref.name, exc_info=True)

    async def kill(self, ref: ActorRef, *, graceful_s: float = 5.0) -> None:
        """Ask the actor to shut down, then kill it and free its placement group."""
        try:
            await self.call(ref, "shutdown", timeout_s=graceful_s)
        except Exception as e:  # dead, stuck or never started: killing is all that is left
            logger.debug("graceful shutdown of %s failed: %s", ref.name, e)
        ray.kill(ref.actor, no_restart=True)
        if ref.placement_group is not None:
            remove_placement_group(ref.placement_group)

    def actor_names(self) -> list[str]:
        """Names of ember's live named actors in the ember namespace."""
        names = ray.util.list_named_actors(all_namespaces=True)
        return sorted(
            n["name"]
            for n in names
            if n.get("namespace") == NAMESPACE and n["name"].startswith(ACTOR_PREFIX)
        )


def alive_actor_classes() -> list[str]:
    """Class names of every ALIVE actor in the cluster, from the GCS actor table.

    Works without the dashboard (which `ray.util.state.list_actors` needs and the embedded
    default does not start); it reads Ray's private state API, so it is for checks and tests.
    """
    from ray._private.state import actors

    return sorted(
        str(a.get("ActorClassName", "?")) for a in actors().values() if a.get("State") == "ALIVE"
    )


def node_ip() -> str:
    """The address Ray knows the calling process's node by (127.0.0.1 for the embedded Ray)."""
    return str(ray.util.get_node_ip_address())


def current_node_id() -> str:
    """The Ray node id of the calling process (inside an actor: the node it runs on)."""
    return str(ray.get_runtime_context().get_node_id())


async def _await_ref(obj: Any) -> Any:
    return await obj


def _available_by_node() -> dict[str, dict[str, float]]:
    """Free resources per node, from the GCS's per-node resource view."""
    # ray.available_resources() is summed over nodes; placement needs each node's own view.
    from ray._private.state import available_resources_per_node

    try:
        return {k: dict(v) for k, v in available_resources_per_node().items()}
    except Exception:  # an older or newer Ray without this view: treat every node as full
        logger.warning("per-node free resources unavailable; placement falls back to Ray")
        return {}


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    host, sep, port = address.removeprefix("ray://").rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(f"address: {address!r} must be 'auto' or HOST:PORT")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise DeploymentError(
            f"cannot join the Ray cluster at {address}: nothing answers there ({e.strerror or e}); "
            "is `ray start --head` running?"
        ) from None


def _cause(e: Any) -> BaseException:
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException):
        return cause
    return InstanceLostError(_first_line(e))


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _gcs_address() -> str:
    try:
        return str(ray.get_runtime_context().gcs_address)
    except Exception:
        return "?"
