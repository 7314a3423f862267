"""Warming a process that will host an engine before it has a model (the worker pool).

`warm_engine_process(device)` imports what building an engine imports (torch, the model code,
the tokenizer library, the DRAM-tier mapper) and runs each kind of op a decode step uses once,
on tiny tensors, in every float dtype: the thread pool starts and first-call kernel setup
(oneDNN, bf16 paths) happens now, not during a request's first token. On CUDA it also creates
the device's context, runs the same ops there (cuBLAS handles, attention kernels) and pins the
loader's staging buffers.
"""

from __future__ import annotations

import time


def warm_engine_process(device: str = "cpu") -> float:
    """Do the warm-up for engines on `device` ("cpu" or "cuda[:N]"); returns the seconds it took."""
    t0 = time.perf_counter()
    import torch
    import torch.nn.functional as F

    import ember.engine.engine  # noqa: F401
    import ember.engine.model_runner  # noqa: F401
    import ember.engine.tokenizer  # noqa: F401
    import ember.store.shm  # noqa: F401

    devices = ["cpu"]
    if device.startswith("cuda"):
        from ember.store.cuda_loader import reserve_staging
        from ember.store.loader import LoaderConfig

        if torch.device(device).index is not None:
            torch.cuda.set_device(torch.device(device))
        devices.append(device)
        reserve_staging(LoaderConfig())
    with torch.inference_mode():
        for dev in devices:
            for dtype in (torch.float32, torch.bfloat16, torch.float16):
                x = torch.randn(4, 8, 64, dtype=torch.float32).to(dev, dtype)
                w = torch.randn(64, 64, dtype=torch.float32).to(dev, dtype)
                y = F.silu(F.linear(x, w)) * x
                F.scaled_dot_product_attention(y, y, y, is_causal=True)
                torch.softmax(y.float(), dim=-1).argmax(dim=-1).tolist()
                F.embedding(torch.tensor([1, 2], device=dev), w)
    return time.perf_counter() - t0
