"""Reading a Hugging Face model source one tensor at a time: a folder with single or sharded
safetensors, a folder with `pytorch_model*.bin`, or a single `.safetensors` file.

safetensors files are parsed here (8-byte header length, JSON header, raw bytes) and read with
`pread`, never mapped, so converting a model costs one tensor's memory (or one chunk's, when
the bytes are copied through unchanged) rather than the model's: mapped pages would count in
the converter's resident set. `.bin` files go through `torch.load(mmap=True)`.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ember.errors import (
    CheckpointCorruptError,
    CheckpointNotFoundError,
    NoWeightsError,
    UnsupportedDtypeError,
)
from ember.store.dtypes import BY_SAFETENSORS, BY_TORCH, DType

logger = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf")
_MAX_HEADER_BYTES = 100 << 20


@dataclass(frozen=True, slots=True)
class SourceTensor:
    """One tensor of the source: where its bytes are, or the tensor itself for `.bin` files."""

    name: str
    dtype: DType
    shape: tuple[int, ...]
    file: Path
    offset: int = 0  # absolute byte offset in `file` (safetensors only)
    nbytes: int = 0
    loaded: torch.Tensor | None = None  # `.bin` sources hand tensors over already loaded

    def read_into(self, fd: int, out: memoryview, start: int = 0) -> None:
        """Read `len(out)` bytes of this tensor from byte `start` on (safetensors only)."""
        assert self.loaded is None
        done = 0
        while done < len(out):
            n = os.preadv(fd, [out[done:]], self.offset + start + done)
            if n <= 0:
                raise CheckpointCorruptError(
                    self.file, f"tensor {self.name}: file ends before its last byte"
                )
            done += n

    def to_tensor(self) -> torch.Tensor:
        """The whole tensor in memory (contiguous)."""
        if self.loaded is not None:
            return self.loaded.contiguous()
        buf = bytearray(self.nbytes)
        if self.nbytes:
            fd = os.open(self.file, os.O_RDONLY)
            try:
                self.read_into(fd, memoryview(buf))
            finally:
                os.close(fd)
            flat = torch.frombuffer(buf, dtype=torch.uint8)
        else:
            flat = torch.empty(0, dtype=torch.uint8)
        return flat.view(self.dtype.torch_dtype).reshape(self.shape)


@dataclass(frozen=True, slots=True)
class ModelSource:
    root: Path  # the folder (or the file's folder for a single safetensors file)
    weight_files: tuple[Path, ...]
    config: dict[str, Any]
    single_file: bool = False

    def side_files(self) -> list[Path]:
        """Files copied next to the checkpoint: HF config, tokenizer, generation config..."""
        if self.single_file:  # a lone .safetensors: its folder's other files are not its own
            return []
        out = []
        for p in sorted(self.root.iterdir()):
            if not p.is_file() or p.name.startswith("."):
                continue
            if p.suffix in WEIGHT_SUFFIXES or p.name.endswith(".index.json"):
                continue
            if p.name == "index.json":  # would clash with ember's own index
                continue
            out.append(p)
        return out

    def tensors(self) -> Iterator[SourceTensor]:
        for f in self.weight_files:
            if f.suffix == ".safetensors":
                yield from _safetensors_entries(f)
            else:
                yield from _bin_entries(f)


def open_source(src: str | Path) -> ModelSource:
    """Find the weight files of `src`; raises NoWeightsError when there are none."""
    p = Path(src)
    if not p.exists():
        raise CheckpointNotFoundError(p, "no such model folder or file")
    if p.is_file():
        if p.suffix != ".safetensors":
            raise NoWeightsError(p, "a single-file source must be a .safetensors file")
        return ModelSource(root=p.parent, weight_files=(p,), config={}, single_file=True)
    config: dict[str, Any] = {}
    cfg = p / "config.json"
    if cfg.is_file():
        try:
            config = json.loads(cfg.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointCorruptError(cfg, f"config.json is not valid JSON: {e}") from e
    files = _listed_files(p, "model.safetensors.index.json") or sorted(p.glob("*.safetensors"))
    if not files:
        files = _listed_files(p, "pytorch_model.bin.index.json") or sorted(
            p.glob("pytorch_model*.bin")
        )
    if not files:
        raise NoWeightsError(p, "no *.safetensors or pytorch_model*.bin weight files in the folder")
    return ModelSource(root=p, weight_files=tuple(files), config=config)


def _listed_files(folder: Path, index_name: str) -> list[Path]:
    index = folder / index_name
    if not index.is_file():
        return []
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointCorruptError(index, f"unreadable weight index: {e!r}") from e
    files = [folder / f for f in sorted(set(weight_map.values()))]
    for f in files:
        if not f.is_file():
            raise CheckpointNotFoundError(f, f"listed in {index_name} but missing")
    return files


def _safetensors_entries(path: Path) -> list[SourceTensor]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointCorruptError(path, "too short to be a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, _MAX_HEADER_BYTES):
            raise CheckpointCorruptError(path, f"safetensors header length {n} is past the file")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointCorruptError(path, f"safetensors header is not JSON: {e}") from e
    base = 8 + n
    out = []
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        code = meta.get("dtype")
        dtype = BY_SAFETENSORS.get(code)
        if dtype is None:
            raise UnsupportedDtypeError(
                path, f"tensor {name} has dtype {code}, which ember cannot hold"
            )
        begin, end = meta["data_offsets"]
        shape = tuple(int(s) for s in meta["shape"])
        nbytes = end - begin
        expected = dtype.itemsize
        for s in shape:
            expected *= s
        if nbytes != expected or begin < 0 or base + end > size:
            raise CheckpointCorruptError(
                path, f"tensor {name}: bytes [{begin}, {end}) do not fit its shape or the file"
            )
        out.append(SourceTensor(name, dtype, shape, path, base + begin, nbytes))
    out.sort(key=lambda t: t.offset)  # sequential reads of the source
    return out


def _bin_entries(path: Path) -> Iterator[SourceTensor]:
    try:
        state = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
    except RuntimeError:
        # Legacy (non-zip) torch files cannot be mapped.
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointCorruptError(path, f"cannot read with torch.load: {e}") from e
    if not isinstance(state, dict):
        raise CheckpointCorruptError(path, "does not hold a state dict")
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):
            continue
        dtype = BY_TORCH.get(t.dtype)
        if dtype is None:
            raise UnsupportedDtypeError(
                path, f"tensor {name} has dtype {t.dtype}, which ember cannot hold"
            )
        yield SourceTensor(
            name, dtype, tuple(t.shape), path, nbytes=t.numel() * dtype.itemsize, loaded=t
        )


def shared_storage_key(t: SourceTensor) -> tuple[Any, ...] | None:
    """For `.bin` tensors: identifies tensors that share memory (tied weights saved once by
    torch.save); None for safetensors, which cannot share."""
    if t.loaded is None:
        return None
    x = t.loaded
    return (
        x.untyped_storage().data_ptr(),
        int(x.storage_offset()),
        tuple(x.shape),
        tuple(x.stride()),
    )
