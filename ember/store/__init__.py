"""ember.store: the checkpoint format, the streaming converter and the parallel loader.

- `convert(src, dst, tp=1, dtype=None)`: a Hugging Face folder or safetensors file to an ember
  checkpoint directory (see ember.store.format for the layout).
- `load(path, device="cpu", rank=0, config=LoaderConfig())`: one rank's tensors, by HF name,
  as views into one allocation on the device.
- `read_index(path)`: the validated index. `verify(path)`: check every checksum.
- `ember.store.sharding`: how each weight splits for tensor parallelism.
"""

from __future__ import annotations

from ember.store.convert import convert
from ember.store.format import CheckpointIndex, PartitionEntry, TensorEntry, read_index
from ember.store.loader import LoaderConfig, load, tensors_from_buffer
from ember.store.verify import VerifyReport, verify

__all__ = [
    "CheckpointIndex",
    "LoaderConfig",
    "PartitionEntry",
    "TensorEntry",
    "VerifyReport",
    "convert",
    "load",
    "read_index",
    "tensors_from_buffer",
    "verify",
]
