"""`ember bench NAME [ARGS...]`: run benchmarks/bench_NAME.py from the source checkout.

Benchmarks live beside the package, not in it (they pull in baselines such as transformers and
peer loaders through the `bench` extra); this command finds them and passes the arguments on.
"""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

from ember.errors import ConfigError

BENCH_DIR = Path(__file__).resolve().parents[2] / "benchmarks"


def available() -> list[str]:
    return sorted(p.stem.removeprefix("bench_") for p in BENCH_DIR.glob("bench_*.py"))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="benchmark to run: " + ", ".join(available()))
    parser.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark")


def run(args: argparse.Namespace) -> int:
    script = BENCH_DIR / f"bench_{args.name}.py"
    if not script.is_file():
        raise ConfigError(
            f"unknown benchmark {args.name!r}; available: {', '.join(available()) or 'none'}"
            f" (looked in {BENCH_DIR})"
        )
    sys.argv = [str(script), *args.args]
    # As when a script is run directly: the scripts import their shared benchmarks/machine.py.
    if str(BENCH_DIR) not in sys.path:
        sys.path.insert(0, str(BENCH_DIR))
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 1
    return 0
