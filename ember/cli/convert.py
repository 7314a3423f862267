"""`ember convert SRC DST [--tp N] [--dtype bf16|fp16|fp32]`: a Hugging Face folder (or one
safetensors file) to an ember checkpoint directory."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="Hugging Face model folder, or a single .safetensors file")
    parser.add_argument("dst", help="checkpoint directory to create")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (default 1)")
    parser.add_argument(
        "--dtype", default=None, help="cast fp32/fp16/bf16 tensors to bf16, fp16 or fp32"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    from ember.store import convert, read_index

    dst = convert(
        args.src,
        args.dst,
        tp=args.tp,
        dtype=args.dtype,
        progress=not args.no_progress and sys.stderr.isatty(),
        overwrite=args.overwrite,
    )
    index = read_index(dst)
    nbytes = sum(p.nbytes for p in index.partitions)
    print(
        f"{dst}: {len({t.name for t in index.tensors})} tensors, tp={index.tp}, "
        f"{len(index.partitions)} partition files, {nbytes / 1e9:.3f} GB"
    )
    return 0
