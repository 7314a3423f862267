"""The `ember` command: one subcommand per module under `ember.cli`, imported only when run.

Each command module defines `add_arguments(parser)` and `run(args) -> int`. Keeping imports lazy
keeps `ember --help` and light commands (status, deploy) fast: torch and Ray load only for the
commands that need them. Errors ember raises on purpose print as one line and exit non-zero.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys
from collections.abc import Sequence

from ember.errors import EmberError

# command name -> (module under ember.cli, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "make-model": ("make_model", "write a random-weight Hugging Face model folder (tests, demo)"),
    "convert": ("convert", "convert a Hugging Face folder or safetensors file to ember's format"),
    "verify": ("verify", "check every checksum of an ember checkpoint"),
    "cache": ("cache", "list or prune the caches of converted Hugging Face folders"),
    "bench": ("bench", "run a benchmark (load, engine, serve, coldstart, policy, sim)"),
    "serve": ("serve", "start the controller and the OpenAI-compatible API"),
    "deploy": ("deploy", "create or update a deployment on a running server"),
    "delete": ("delete", "delete a deployment on a running server"),
    "status": ("status", "show deployments, instances and where checkpoints are cached"),
    "prefetch": ("prefetch", "bring a deployment's checkpoint into a node's SSD or DRAM"),
    "evict": ("evict", "drop a deployment's s3:// checkpoint from the nodes' DRAM or SSD tier"),
    "notice": ("notice", "tell a running server a node will be preempted: move its requests off"),
    "push": ("push", "convert a model and upload it to an S3 bucket"),
    "sim": ("sim", "simulate policies on spot and workload traces"),
    "replay": ("replay", "replay a spot trace against a live local cluster"),
}


def _available() -> dict[str, tuple[str, str]]:
    """Commands whose module exists in this build."""
    out = {}
    for name, (module, help_text) in COMMANDS.items():
        if importlib.util.find_spec(f"ember.cli.{module}") is not None:
            out[name] = (module, help_text)
    return out


def _requested(argv: Sequence[str]) -> str | None:
    """The command named on the line (the first word that is one), without importing anything."""
    for word in argv:
        if word in COMMANDS:
            return word
        if not word.startswith("-"):
            return None
    return None


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The parser; only the requested command's module is imported (torch and Ray load late)."""
    parser = argparse.ArgumentParser(
        prog="ember",
        description="ember: serverless LLM serving on spot and on-demand GPU fleets.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log at DEBUG level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    requested = _requested(argv)
    for name, (module, help_text) in _available().items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        if name == requested:
            importlib.import_module(f"ember.cli.{module}").add_arguments(p)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    mod = importlib.import_module(f"ember.cli.{args._module}")
    try:
        return int(mod.run(args) or 0)
    except EmberError as e:
        print(f"ember {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"ember {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
