"""`ember notice NODE [--deadline-s S]`: a preemption notice for a node of a running server.

For cloud notice sources that ember does not poll itself, or a planned removal: the node gets
no new instance; its instances drain (no new request) while replacements start on other nodes,
and the requests they are streaming move there live, each with a pause of a few tokens' prefill
(docs/serving.md, "Preemption notices"). Requests still on the node when it goes are resumed
from the request journal.
"""

from __future__ import annotations

import argparse

from ember.cli.admin_client import AdminClient, add_connection_arguments


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("node", help="node id or a prefix of one (as `ember status` shows)")
    parser.add_argument(
        "--deadline-s", type=float, default=30.0,
        help="seconds until the node goes (default 30: a GCE notice; AWS gives 120)",
    )  # fmt: skip
    add_connection_arguments(parser)


def run(args: argparse.Namespace) -> int:
    answer = AdminClient.from_args(args).notice(args.node, args.deadline_s)
    draining = ", ".join(answer["draining"]) or "none"
    print(
        f"node {answer['node'][:12]} goes in {answer['deadline_s']:g} s: draining instances "
        f"{draining}; moving {answer['moving']} requests"
    )
    return 0
