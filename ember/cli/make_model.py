"""`ember make-model`: write a random-weight Hugging Face model folder (tests, benchmarks, demo)."""

from __future__ import annotations

import argparse
import json
import time

from ember.store.factory import ARCHS, DEFAULT_SHARD_BYTES, DTYPES, SIZES, make_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", metavar="OUT_DIR", help="folder to write (created if missing)")
    parser.add_argument(
        "--arch", choices=ARCHS, default="llama", help="architecture (default llama)"
    )
    parser.add_argument("--size", choices=SIZES, default="tiny", help="shape (default tiny)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="bf16", help="weights dtype")
    parser.add_argument("--seed", type=int, default=0, help="same seed, same bytes (default 0)")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="override a config.json field, e.g. --set tie_word_embeddings=true (repeatable)",
    )
    parser.add_argument(
        "--shard-bytes",
        type=int,
        default=DEFAULT_SHARD_BYTES,
        help=f"split weights into shards above this many bytes (default {DEFAULT_SHARD_BYTES})",
    )


def _parse_overrides(items: list[str]) -> dict[str, object]:
    out: dict[str, object] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"ember make-model: --set wants KEY=JSON, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    path = make_model(
        args.out_dir,
        arch=args.arch,
        size=args.size,
        dtype=args.dtype,
        seed=args.seed,
        overrides=_parse_overrides(args.set),
        shard_bytes=args.shard_bytes,
    )
    size_bytes = sum(p.stat().st_size for p in path.glob("*.safetensors"))
    print(
        f"wrote {args.arch} {args.size} {args.dtype} (seed {args.seed}) to {path}: "
        f"{size_bytes / 1e6:.1f} MB of weights in {time.perf_counter() - start:.1f} s"
    )
    return 0
