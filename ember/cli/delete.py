"""`ember delete NAME`: delete a deployment on a running server (its instances stop)."""

from __future__ import annotations

import argparse

from ember.cli.admin_client import AdminClient, add_connection_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="the deployment to delete")
    add_connection_arguments(parser)


def run(args: argparse.Namespace) -> int:
    AdminClient.from_args(args).delete(args.name)
    print(f"deployment {args.name} deleted")
    return 0
