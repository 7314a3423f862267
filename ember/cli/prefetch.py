"""`ember prefetch NAME [--tier ssd|dram] [--node ID]` and `ember evict NAME [--tier dram|ssd]
[--node ID]`: move a deployment's checkpoint between a running server's node store tiers.
A local model is converted on the node (ssd) and loaded into its DRAM tier (dram); evict
takes `s3://` deployments only.

Prefetch returns at once (the node's store fetches in the background; `ember status` shows
the copy when it is there); by default it targets the node the next instance would start on.
Evict drops the copy from every node holding it in that tier, or from `--node`; a copy an
instance is using is refused (HTTP 409) and left in place.
"""

from __future__ import annotations

import argparse

from ember.cli.admin_client import AdminClient, add_connection_arguments


def add_arguments(parser: argparse.ArgumentParser, default_tier: str = "ssd") -> None:
    parser.add_argument("name", help="the deployment (evict: its source must be s3://...)")
    parser.add_argument("--tier", choices=("ssd", "dram"), default=default_tier)
    parser.add_argument("--node", help="node id or a prefix of one (as `ember status` shows)")
    add_connection_arguments(parser)


def run(args: argparse.Namespace) -> int:
    answer = AdminClient.from_args(args).prefetch(args.name, args.tier, args.node)
    print(
        f"prefetching {answer['source']} to {answer['tier']} on node {answer['node'][:12]} "
        "(`ember status` lists it when done)"
    )
    return 0
