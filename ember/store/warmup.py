"""Warming a process that will host an engine before it has a model (the worker pool).

`warm_engine_process()` imports what building an engine imports (torch, the model code, the
tokenizer library, the DRAM-tier mapper) and runs each kind of op a decode step uses once, on
tiny tensors, in every float dtype: the thread pool starts and first-call kernel setup
(oneDNN, bf16 paths) happens now, not during a request's first token.
"""

from __future__ import annotations

import time


def warm_engine_process() -> float:
    """Do the warm-up; returns the seconds it took."""
    t0 = time.perf_counter()
    import torch
    import torch.nn.functional as F

    import ember.engine.engine  # noqa: F401
    import ember.engine.model_runner  # noqa: F401
    import ember.engine.tokenizer  # noqa: F401
    import ember.store.shm  # noqa: F401

    with torch.inference_mode():
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            x = torch.randn(4, 8, 64, dtype=torch.float32).to(dtype)
            w = torch.randn(64, 64, dtype=torch.float32).to(dtype)
            y = F.silu(F.linear(x, w)) * x
            F.scaled_dot_product_attention(y, y, y, is_causal=True)
            torch.softmax(y.float(), dim=-1).argmax(dim=-1)
            F.embedding(torch.tensor([1, 2]), w)
    return time.perf_counter() - t0
