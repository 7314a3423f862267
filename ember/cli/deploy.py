"""`ember deploy NAME SOURCE [...]`: create or update a deployment on a running server."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ember.cli.admin_client import AdminClient, add_connection_arguments
from ember.controller.types import DeploymentSpec


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="the model name clients will send")
    parser.add_argument(
        "source", help="a local Hugging Face folder, ember checkpoint or s3://bucket/prefix"
    )
    parser.add_argument("--min-instances", type=int, default=0, help="kept even when idle")
    parser.add_argument("--max-instances", type=int, default=1, help="upper bound")
    parser.add_argument(
        "--keep-alive-s", type=float, default=60.0, help="idle seconds before scaling down"
    )
    parser.add_argument(
        "--target-concurrency", type=int, default=4, help="requests one instance should carry"
    )
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks per instance")
    parser.add_argument(
        "--dtype", default="auto", help="auto (the checkpoint's), float32, float16, bfloat16"
    )
    parser.add_argument("--max-model-len", type=int, help="longest prompt + output, in tokens")
    parser.add_argument("--max-num-seqs", type=int, default=16, help="batch size per instance")
    parser.add_argument(
        "--max-num-batched-tokens", type=int, default=2048,
        help="tokens per engine step; longer prompts are prefilled in chunks of what is left",
    )  # fmt: skip
    parser.add_argument("--max-queue", type=int, default=64, help="queued requests before 429")
    parser.add_argument(
        "--request-timeout-s", type=float, default=60.0, help="wait + run limit per request"
    )
    parser.add_argument(
        "--prefetch", choices=("ssd", "dram", "none"), default="ssd",
        help="the tier one node brings the checkpoint into at deploy time (a local model: "
        "ssd converts it there, dram also loads it into DRAM)",
    )  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print the server's answer as JSON")
    add_connection_arguments(parser)


def run(args: argparse.Namespace) -> int:
    source = Path(args.source).expanduser()
    # The server resolves paths against its own working directory: send an absolute one.
    source_text = str(source.resolve()) if source.exists() else args.source
    spec = DeploymentSpec(
        name=args.name,
        source=source_text,
        min_instances=args.min_instances,
        max_instances=args.max_instances,
        keep_alive_s=args.keep_alive_s,
        target_concurrency=args.target_concurrency,
        tp=args.tp,
        dtype=args.dtype,
        max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        max_queue=args.max_queue,
        request_timeout_s=args.request_timeout_s,
        prefetch=args.prefetch,
    )
    spec.validate()
    answer = AdminClient.from_args(args).deploy(spec.to_dict())
    if args.json:
        print(json.dumps(answer, indent=2))
    else:
        verb = "created" if answer.get("created", True) else "updated"
        print(f"deployment {spec.name} {verb} (source {spec.source})")
    return 0
