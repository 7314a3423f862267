"""`ember push SRC s3://bucket/prefix [--tp N] [--dtype D] [--endpoint-url URL]`: convert a
Hugging Face folder to an ember checkpoint (in a temporary directory) and upload it, index
last; an ember checkpoint directory is uploaded as it is. Credentials come from the usual
AWS_* environment variables or ~/.aws; `--endpoint-url` (or EMBER_S3_ENDPOINT_URL) selects any
S3-compatible server."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", help="Hugging Face model folder, or an ember checkpoint directory")
    parser.add_argument("url", help="destination, s3://bucket/prefix")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (default 1)")
    parser.add_argument("--dtype", default=None, help="cast to bf16, fp16 or fp32 when converting")
    parser.add_argument(
        "--endpoint-url",
        default=os.environ.get("EMBER_S3_ENDPOINT_URL"),
        help="S3-compatible endpoint (default: AWS, or $EMBER_S3_ENDPOINT_URL)",
    )
    parser.add_argument(
        "--create-bucket", action="store_true", help="create the bucket if it does not exist"
    )


def run(args: argparse.Namespace) -> int:
    from ember.store import convert, read_index
    from ember.store.remote import RemoteConfig, RemoteStore, parse_s3_url

    url = parse_s3_url(args.url)
    src = Path(args.src).expanduser()
    remote = RemoteStore(RemoteConfig(endpoint_url=args.endpoint_url))
    if args.create_bucket:
        remote.ensure_bucket(url.bucket)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ember-push-") as tmp:
        if (src / "index.json").is_file():
            checkpoint = src
        else:
            checkpoint = convert(
                src, Path(tmp) / "ck", tp=args.tp, dtype=args.dtype,
                progress=sys.stderr.isatty(),
            )  # fmt: skip
        index = read_index(checkpoint)
        nbytes = remote.upload_checkpoint(checkpoint, url)
    dt = time.perf_counter() - t0
    print(
        f"pushed {src} -> {url}: tp={index.tp}, {len(index.partitions)} partition files, "
        f"{nbytes / 1e9:.3f} GB in {dt:.1f} s"
    )
    return 0
