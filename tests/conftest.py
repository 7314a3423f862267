"""Shared test setup: loopback-only networking for Ray and torch.distributed, few threads."""

from __future__ import annotations

import os

# Ray binds 127.0.0.1 for a local instance with this set; torch.distributed rendezvous on loopback.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
