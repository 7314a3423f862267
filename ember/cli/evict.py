"""`ember evict NAME [--tier dram|ssd] [--node ID]`: see ember/cli/prefetch.py."""

from __future__ import annotations

import argparse

from ember.cli import prefetch
from ember.cli.admin_client import AdminClient


def add_arguments(parser: argparse.ArgumentParser) -> None:
    prefetch.add_arguments(parser, default_tier="dram")


def run(args: argparse.Namespace) -> int:
    answer = AdminClient.from_args(args).evict(args.name, args.tier, args.node)
    nodes = ", ".join(n[:12] for n in answer["nodes"]) or "no node held it there"
    print(f"evicted {answer['source']} from {answer['tier']}: {nodes}")
    return 0
