"""`ember cache ls|prune`: the conversion caches (Hugging Face folders converted on first use).

Every entry is one model folder converted for one tensor-parallel degree and dtype, in
`$EMBER_CACHE_DIR/checkpoints/` (engines started by `LLM(...)`) and
`$EMBER_CACHE_DIR/nodes/<host>/checkpoints/` (instances of `ember serve`). A conversion removes
the entries it supersedes itself; `prune` removes the rest that can go: entries whose source
folder changed or is gone, interrupted conversions, and with `--unused-days` entries not used
for that long. Running engines keep the files they mapped; a later start converts again.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="cache root (default: $EMBER_CACHE_DIR or ~/.cache/ember; ember.yaml's cache_dir)",
    )
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    ls = sub.add_parser("ls", help="list every entry: status, size, last use, source")
    ls.add_argument("--json", action="store_true", help="one JSON object per entry")
    pr = sub.add_parser("prune", help="remove stale entries and interrupted conversions")
    pr.add_argument(
        "--unused-days", type=float, default=None, help="also remove entries unused this long"
    )
    pr.add_argument("--all", action="store_true", help="remove every entry")
    pr.add_argument("--dry-run", action="store_true", help="list what would go, remove nothing")


def run(args: argparse.Namespace) -> int:
    from ember.engine.checkpoint import cache_dirs, entries, prune
    from ember.errors import ConfigError

    root = args.cache_dir.expanduser() if args.cache_dir is not None else None
    if root is not None and not root.is_dir():
        raise ConfigError(f"--cache-dir: {root}: no such directory")
    if args.action == "ls":
        listed = sorted(
            (e for d in cache_dirs(root) for e in entries(d)), key=lambda e: e.last_used
        )
        if args.json:
            for e in listed:
                row = {
                    "path": str(e.path),
                    "status": e.status,
                    "bytes": e.nbytes,
                    "last_used": e.last_used,
                    **(e.record or {}),
                }
                print(json.dumps(row, sort_keys=True))
            return 0
        now = time.time()
        print(f"{'STATUS':8} {'SIZE':>9} {'UNUSED':>7}  ENTRY  (SOURCE)")
        for e in listed:
            source = f"  ({e.source})" if e.source else ""
            print(
                f"{e.status:8} {_size(e.nbytes):>9} {_age(now - e.last_used):>7}  {e.path}{source}"
            )
        total = sum(e.nbytes for e in listed)
        print(f"{len(listed)} entries, {_size(total)}")
        return 0
    if args.unused_days is not None and args.unused_days < 0:
        raise ConfigError(f"--unused-days: must be >= 0, got {args.unused_days:g}")
    gone = prune(root, unused_days=args.unused_days, everything=args.all, dry_run=args.dry_run)
    verb = "would remove" if args.dry_run else "removed"
    for e in gone:
        print(f"{verb} {e.status} {_size(e.nbytes)} {e.path}")
    print(f"{verb} {len(gone)} entries, {_size(sum(e.nbytes for e in gone))}")
    return 0


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _age(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    if seconds < 86400:
        return f"{seconds / 3600:.0f}h"
    return f"{seconds / 86400:.0f}d"
