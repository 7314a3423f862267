"""`ember verify CHECKPOINT`: read every byte of a checkpoint and check every checksum.

Loads check sizes always but hash only with `LoaderConfig(verify_checksums=True)`; run this
after copying or downloading a checkpoint, or before publishing one.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="ember checkpoint directory")


def run(args: argparse.Namespace) -> int:
    from ember.store import verify

    report = verify(args.checkpoint)
    print(
        f"{report.path}: ok, {report.tensors} tensor entries in {report.partitions} partition "
        f"files, {report.nbytes / 1e9:.3f} GB checked in {report.seconds:.2f} s"
    )
    return 0
