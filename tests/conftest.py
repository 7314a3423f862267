"""Shared test setup: loopback-only networking for Ray and torch.distributed, few threads."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

# Ray binds 127.0.0.1 for a local instance with this set; torch.distributed rendezvous on loopback.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# No pre-started workers unless a test asks (tests count instance processes); node store tests
# turn the pool on themselves.
os.environ.setdefault("EMBER_WORKER_POOL_SIZE", "0")


@pytest.fixture(scope="session", autouse=True)
def _session_ember_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Hugging Face folders that tests load are converted into this session's own cache, not
    the user's ~/.cache/ember (which grew by a few checkpoints with every run), and servers'
    node stores keep their DRAM tier in this session's own directory of /dev/shm, not the
    user's (which outlives a server, so it collected every test model). Set before any test
    starts Ray or a server, so their processes inherit them."""
    import shutil
    import uuid

    dram = Path("/dev/shm") / f"ember-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    values = {
        "EMBER_CACHE_DIR": str(tmp_path_factory.mktemp("ember-cache")),
        "EMBER_DRAM_DIR": str(dram / "dram"),
    }
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    yield
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    shutil.rmtree(dram, ignore_errors=True)


@pytest.fixture(scope="session")
def model_factory(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """`make(arch="llama", size="tiny", dtype="fp32", seed=0, **overrides) -> Path`.

    Each distinct request is written once per session (by `ember.store.factory.make_model`)
    and shared; treat the folder as read-only. Keyword overrides replace config.json fields,
    e.g. `make("llama", tie_word_embeddings=True)` or `make(rope_scaling=LLAMA3_ROPE_SCALING)`.
    """
    from ember.store.factory import make_model

    root = tmp_path_factory.mktemp("models")
    made: dict[str, Path] = {}

    def make(
        arch: str = "llama",
        size: str = "tiny",
        dtype: str = "fp32",
        seed: int = 0,
        **overrides: Any,
    ) -> Path:
        key = json.dumps([arch, size, dtype, seed, overrides], sort_keys=True)
        if key not in made:
            out = root / f"{arch}-{size}-{dtype}-s{seed}-{len(made)}"
            made[key] = make_model(out, arch, size, dtype, seed, overrides=overrides)
        return made[key]

    return make
