"""ember: serverless LLM serving on spot and on-demand GPU fleets.

`from ember import LLM, SamplingParams` gives the offline engine API; everything else lives in
the component packages (store, engine, migration, policy, controller, cluster, api, sim, cli).
The engine is imported lazily so that `import ember` stays cheap for the CLI and the policy code.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from ember.engine.llm import LLM
    from ember.engine.sampling import SamplingParams

__all__ = ["LLM", "SamplingParams", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from ember.engine.llm import LLM

        return LLM
    if name == "SamplingParams":
        from ember.engine.sampling import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'ember' has no attribute {name!r}")
