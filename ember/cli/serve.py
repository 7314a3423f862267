"""`ember serve`: start (or join) Ray, the controller and the OpenAI-compatible API.

With no --address, a private Ray instance starts with every process bound to 127.0.0.1; with
--address auto|HOST:PORT the server joins an existing cluster. With no model anywhere (flags,
config file, or the controller's state file) it writes a small random-weight demo model and
deploys it as `ember-demo`. A host that is not a loopback address needs API keys.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import re
import signal
import socket
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from ember.controller.config import ServeConfig, load_config
from ember.controller.types import DeploymentSpec
from ember.errors import ConfigError

logger = logging.getLogger("ember.serve")

DEMO_NAME = "ember-demo"
# `ember serve` listens once the node stores and pre-started workers are up, or after this.
WARM_TIMEOUT_S = 60.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="address the HTTP API binds (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port of the HTTP API (default 8000)")
    parser.add_argument(
        "--address",
        help="join a Ray cluster: 'auto' or HOST:PORT (default: start a private one on loopback)",
    )
    parser.add_argument("--config", help="ember.yaml with server settings and deployments")
    parser.add_argument(
        "--model",
        nargs="+",
        action="extend",
        default=[],
        metavar="[NAME=]PATH",
        help="deploy these models (HF folders or ember checkpoints); NAME defaults to the folder",
    )
    parser.add_argument(
        "--api-key",
        action="append",
        default=[],
        help="accepted Bearer token for /v1 (repeatable; also EMBER_API_KEYS, comma-separated)",
    )
    parser.add_argument("--admin-key", help="Bearer token for /admin (also EMBER_ADMIN_KEY)")
    parser.add_argument("--state-dir", help="where the controller keeps ember.db")
    parser.add_argument("--cache-dir", help="converted checkpoints and the demo model")
    parser.add_argument("--num-cpus", type=int, help="logical CPUs of the private Ray instance")
    parser.add_argument(
        "--no-demo", action="store_true", help="do not create the demo model when none is deployed"
    )


def run(args: argparse.Namespace) -> int:
    config = _merge(load_config(args.config), args)
    api_config = _api_config(config)
    api_config.validate()  # refuses a non-loopback host without keys before anything starts
    # Bound now, before Ray starts, and held: Ray's own servers take random free ports, and one
    # (its metrics exporter answers any path with 200) once took a port ember had checked was
    # free and not yet bound, so a client's /health reached Ray while ember was still starting.
    # Unlike a check, the bound socket is ours; connections are refused until the API listens.
    sock = _bind(config.host, config.port)
    models = [_model_spec(m) for m in args.model]
    try:
        asyncio.run(_serve(config, api_config, models, sock))
    except SystemExit as e:
        # Ray's driver turns SIGTERM into exit(15) (uvicorn passes the signal on once it has
        # stopped). A stop asked for with SIGTERM is a clean one: exit 0, which service
        # managers (systemd, container runtimes) count as success; 15 they count as a failure.
        if e.code != signal.SIGTERM:
            raise
        logger.info("stopped on SIGTERM")
    return 0


def _merge(config: ServeConfig, args: argparse.Namespace) -> ServeConfig:
    """Flags and environment over the file over the defaults."""
    kw: dict[str, Any] = {}
    for key in ("host", "port", "address", "admin_key", "state_dir", "cache_dir"):
        value = getattr(args, key, None)
        if value is not None:
            kw[key] = value
    keys = list(config.api_keys) + list(args.api_key)
    env_keys = os.environ.get("EMBER_API_KEYS", "")
    keys += [k.strip() for k in env_keys.split(",") if k.strip()]
    kw["api_keys"] = tuple(dict.fromkeys(keys))
    if "admin_key" not in kw and os.environ.get("EMBER_ADMIN_KEY"):
        kw["admin_key"] = os.environ["EMBER_ADMIN_KEY"]
    if args.num_cpus is not None:
        kw["ray"] = replace(config.ray, num_cpus=args.num_cpus)
    if args.no_demo:
        kw["demo"] = False
    merged = replace(config, **kw)
    merged.validate()
    return merged


def _api_config(config: ServeConfig) -> Any:
    from ember.api.config import ApiConfig

    extra = dict(config.api)
    try:
        return ApiConfig(
            host=config.host,
            port=config.port,
            api_keys=config.api_keys,
            admin_key=config.admin_key,
            **extra,
        )
    except TypeError as e:
        raise ConfigError(f"api: {e}") from None


def _bind(host: str, port: int) -> socket.socket:
    """The API's socket, bound (not yet listening: uvicorn listens once the server is warm)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((host, port))
    except OSError as e:
        s.close()
        raise ConfigError(
            f"port: cannot bind {host}:{port} ({e.strerror}); is another server running? "
            "choose another with --port"
        ) from None
    return s


def _model_spec(text: str) -> DeploymentSpec:
    name, sep, path = text.partition("=")
    if not sep:
        path = text
        name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(text.rstrip("/")).name).strip("-._")
    spec = DeploymentSpec(name=name, source=str(Path(path).expanduser().resolve()))
    spec.validate()
    return spec


def demo_model(cache_dir: str | Path) -> Path:
    """The demo model folder (random weights, tiny Llama), written once under `cache_dir`."""
    out = Path(cache_dir).expanduser() / "demo" / "llama-tiny-seed0"
    if not (out / "config.json").is_file():
        from ember.store.factory import make_model

        make_model(out, arch="llama", size="tiny", dtype="fp32", seed=0)
    return out


async def _serve(
    config: ServeConfig, api_config: Any, models: list[DeploymentSpec], sock: socket.socket
) -> None:
    import uvicorn

    from ember.api.app import create_app
    from ember.cluster.cluster import ClusterConfig, RayCluster
    from ember.controller.controller import Controller

    cluster = RayCluster(
        ClusterConfig(
            address=config.address,
            num_cpus=config.ray.num_cpus,
            instance_cpus=config.ray.instance_cpus,
            instance_gpus=config.ray.instance_gpus,
            device=config.ray.device,
            cache_dir=config.cache_dir,
            labels=config.ray.labels,
        )
    )
    controller = Controller(
        cluster, config.db_path, reconcile_interval_s=config.reconcile_interval_s
    )
    try:
        await controller.start()
        for spec in (*config.deployments, *models):
            controller.deploy(spec)
        if config.demo and not controller.list_deployments():
            path = demo_model(config.cache_dir)
            logger.warning(
                "no model given: serving the DEMO model %r from %s. It has RANDOM WEIGHTS and "
                "writes gibberish; it exists to try ember offline. Deploy a real model with "
                "`ember deploy NAME PATH` or `ember serve --model PATH`.",
                DEMO_NAME,
                path,
            )
            controller.deploy(
                DeploymentSpec(name=DEMO_NAME, source=str(path), max_instances=2, prefetch="dram")
            )
        t0 = time.perf_counter()
        if await cluster.warm(WARM_TIMEOUT_S):
            logger.info("node services warm in %.1f s", time.perf_counter() - t0)
        else:
            logger.warning(
                "node stores or pre-started workers not ready after %.0f s; serving anyway "
                "(the first requests may wait for them)",
                WARM_TIMEOUT_S,
            )
        app = create_app(controller, api_config)
        server = uvicorn.Server(
            uvicorn.Config(
                app,
                host=config.host,
                port=config.port,
                log_level="info",
                access_log=False,
                timeout_graceful_shutdown=5,
            )
        )
        names = ", ".join(s.name for s in controller.list_deployments()) or "none"
        logger.info(
            "ember serving url=http://%s:%d ray=%s state=%s deployments=%s auth=%s",
            config.host,
            config.port,
            cluster.address,
            config.db_path,
            names,
            "on" if api_config.auth_enabled else "off",
        )
        await server.serve(sockets=[sock])
    finally:
        await controller.stop()
        cluster.shutdown()
        logger.info("ember stopped")
