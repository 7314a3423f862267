"""ember.engine: one model replica (paged KV cache, continuous batching, tensor parallelism).

Public names: `Engine`, `EngineConfig` (streaming API for the server), `LLM` (offline batch
API), `SamplingParams`, `RequestOutput`, `RequestState` (export/import). Imported lazily so that
`import ember.engine.sampling` does not pull in the model code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ember.engine.config import EngineConfig
    from ember.engine.engine import Engine
    from ember.engine.llm import LLM
    from ember.engine.request import RequestOutput, RequestState
    from ember.engine.sampling import SamplingParams

__all__ = ["LLM", "Engine", "EngineConfig", "RequestOutput", "RequestState", "SamplingParams"]

_WHERE = {
    "Engine": "ember.engine.engine",
    "EngineConfig": "ember.engine.config",
    "LLM": "ember.engine.llm",
    "RequestOutput": "ember.engine.request",
    "RequestState": "ember.engine.request",
    "SamplingParams": "ember.engine.sampling",
}


def __getattr__(name: str) -> Any:
    if name in _WHERE:
        import importlib

        return getattr(importlib.import_module(_WHERE[name]), name)
    raise AttributeError(f"module 'ember.engine' has no attribute {name!r}")
