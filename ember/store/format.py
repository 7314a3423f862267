"""ember's checkpoint format: the index (`index.json`) and the rules its partition files follow.

A checkpoint directory holds:

- `index.json`: format name and version, the model's HF config, the tensor-parallel degree,
  one entry per partition file (rank, byte length, one xxh3-64 checksum per `block_bytes`
  block) and one entry per tensor (HF name, dtype, shape, rank, partition file, offset, byte
  length, xxh3-64 checksum of its bytes, how it was split, and `tied_to` for a tied weight
  stored once).
- partition files `rank{R}-part{NNNN}.bin`: each rank's tensors back to back, every tensor
  starting on a 4 KiB boundary and every file padded with zeros to a multiple of 4 KiB, so a
  loader can read any rank's files with O_DIRECT in large aligned chunks.
- the HF config, tokenizer and generation files copied from the source.

Invariants `read_index` checks before anyone reads a byte: the version is known; every dtype
is known; every tensor lies inside its partition (`offset + nbytes <= partition nbytes`),
starts on the alignment and has `nbytes == prod(shape) * itemsize`; every partition length is
a multiple of the alignment and has one checksum per block.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ember.errors import CheckpointCorruptError, CheckpointFormatError, CheckpointNotFoundError
from ember.store.dtypes import BY_NAME

FORMAT_NAME = "ember-checkpoint"
FORMAT_VERSION = 1
INDEX_FILE = "index.json"
ALIGN_BYTES = 4096
CHECKSUM_ALGORITHM = "xxh3_64"
CHECKSUM_BLOCK_BYTES = 4 << 20


def partition_file_name(rank: int, number: int) -> str:
    return f"rank{rank}-part{number:04d}.bin"


def align_up(n: int, align: int = ALIGN_BYTES) -> int:
    return (n + align - 1) // align * align


@dataclass(frozen=True, slots=True)
class TensorEntry:
    """Where one tensor's bytes are. `name` is the original HF name; for tp > 1 each rank has
    its own entry with its shard's shape. `tied_to` names the entry whose bytes this one shares
    (same partition and offset): a tied weight is stored once and loaded under both names."""

    name: str
    dtype: str  # ember dtype name, see ember.store.dtypes
    shape: tuple[int, ...]
    rank: int
    partition: str  # file name inside the checkpoint directory
    offset: int  # byte offset inside the partition file, a multiple of ALIGN_BYTES
    nbytes: int
    checksum: str  # xxh3_64 of the tensor's bytes, 16 hex digits
    split: str = "replicated"  # ShardKind value: how the full tensor was split across ranks
    split_dim: int | None = None
    tied_to: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "rank": self.rank,
            "partition": self.partition,
            "offset": self.offset,
            "nbytes": self.nbytes,
            "checksum": self.checksum,
            "split": self.split,
            "split_dim": self.split_dim,
        }
        if self.tied_to is not None:
            out["tied_to"] = self.tied_to
        return out


@dataclass(frozen=True, slots=True)
class PartitionEntry:
    """One partition file: its rank, length (a multiple of ALIGN_BYTES) and block checksums."""

    file: str
    rank: int
    nbytes: int
    block_checksums: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "rank": self.rank,
            "nbytes": self.nbytes,
            "block_checksums": list(self.block_checksums),
        }


@dataclass(frozen=True, slots=True)
class CheckpointIndex:
    format_version: int
    config: dict[str, Any]  # the HF config.json contents ({} for a bare safetensors file)
    tp: int
    tensors: tuple[TensorEntry, ...]
    partitions: tuple[PartitionEntry, ...]
    block_bytes: int = CHECKSUM_BLOCK_BYTES
    alignment: int = ALIGN_BYTES
    checksum_algorithm: str = CHECKSUM_ALGORITHM
    path: Path | None = field(default=None, compare=False)  # the directory it was read from

    def tensors_for(self, rank: int) -> tuple[TensorEntry, ...]:
        return tuple(t for t in self.tensors if t.rank == rank)

    def partitions_for(self, rank: int) -> tuple[PartitionEntry, ...]:
        return tuple(p for p in self.partitions if p.rank == rank)

    def rank_nbytes(self, rank: int) -> int:
        return sum(p.nbytes for p in self.partitions_for(rank))

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_NAME,
            "format_version": self.format_version,
            "tp": self.tp,
            "alignment": self.alignment,
            "checksum": {"algorithm": self.checksum_algorithm, "block_bytes": self.block_bytes},
            "config": self.config,
            "partitions": [p.to_json() for p in self.partitions],
            "tensors": [t.to_json() for t in self.tensors],
        }

    def dumps(self) -> str:
        """Deterministic JSON text: same index, same bytes."""
        return json.dumps(self.to_json(), indent=1, sort_keys=False, ensure_ascii=True) + "\n"


def read_index(path: str | Path) -> CheckpointIndex:
    """Read and validate `path/index.json` (or an index file given directly)."""
    p = Path(path)
    index_path = p if p.is_file() else p / INDEX_FILE
    if not index_path.is_file():
        what = "no such checkpoint directory" if not p.exists() else f"no {INDEX_FILE}"
        raise CheckpointNotFoundError(index_path, what)
    return parse_index(index_path.read_bytes(), index_path, index_path.parent)


def parse_index(data: bytes, where: str | Path, directory: Path | None = None) -> CheckpointIndex:
    """Validate index bytes read from `where` (a file, or an `s3://` object: errors name it);
    `directory` is the checkpoint directory the index describes, if it is local."""
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointFormatError(where, f"index is not valid JSON: {e}") from e
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise CheckpointFormatError(where, f"not an {FORMAT_NAME} index")
    version = doc.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointFormatError(
            where,
            f"unknown format version {version!r} (this ember reads version {FORMAT_VERSION}); "
            "convert the model again with this ember",
        )
    try:
        index = _parse(doc, directory)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointFormatError(where, f"malformed index: {e!r}") from e
    validate(index, where)
    return index


def _parse(doc: Mapping[str, Any], directory: Path | None) -> CheckpointIndex:
    checksum = doc["checksum"]
    if checksum["algorithm"] != CHECKSUM_ALGORITHM:
        raise ValueError(f"unknown checksum algorithm {checksum['algorithm']!r}")
    tensors = tuple(
        TensorEntry(
            name=str(t["name"]),
            dtype=str(t["dtype"]),
            shape=tuple(int(s) for s in t["shape"]),
            rank=int(t["rank"]),
            partition=str(t["partition"]),
            offset=int(t["offset"]),
            nbytes=int(t["nbytes"]),
            checksum=str(t["checksum"]),
            split=str(t.get("split", "replicated")),
            split_dim=None if t.get("split_dim") is None else int(t["split_dim"]),
            tied_to=t.get("tied_to"),
        )
        for t in doc["tensors"]
    )
    partitions = tuple(
        PartitionEntry(
            file=str(p["file"]),
            rank=int(p["rank"]),
            nbytes=int(p["nbytes"]),
            block_checksums=tuple(str(c) for c in p["block_checksums"]),
        )
        for p in doc["partitions"]
    )
    config = doc.get("config") or {}
    if not isinstance(config, dict):
        raise ValueError("config is not an object")
    return CheckpointIndex(
        format_version=int(doc["format_version"]),
        config=config,
        tp=int(doc["tp"]),
        tensors=tensors,
        partitions=partitions,
        block_bytes=int(checksum["block_bytes"]),
        alignment=int(doc["alignment"]),
        checksum_algorithm=str(checksum["algorithm"]),
        path=directory,
    )


def validate(index: CheckpointIndex, where: str | Path) -> None:
    """Check the index against itself (not against the files: the loader checks sizes)."""
    if index.tp < 1:
        raise CheckpointFormatError(where, f"tp={index.tp} is not a positive degree")
    if index.alignment % ALIGN_BYTES or index.block_bytes % index.alignment:
        raise CheckpointFormatError(
            where, f"alignment {index.alignment} / block {index.block_bytes} not 4 KiB multiples"
        )
    parts: dict[str, PartitionEntry] = {}
    for p in index.partitions:
        if "/" in p.file or p.file.startswith("."):
            raise CheckpointFormatError(where, f"partition name {p.file!r} leaves the directory")
        if p.nbytes % index.alignment:
            raise CheckpointFormatError(where, f"{p.file}: length {p.nbytes} is not aligned")
        if len(p.block_checksums) != math.ceil(p.nbytes / index.block_bytes):
            raise CheckpointFormatError(where, f"{p.file}: wrong number of block checksums")
        parts[p.file] = p
    names: set[tuple[str, int]] = set()
    for t in index.tensors:
        dtype = BY_NAME.get(t.dtype)
        if dtype is None:
            raise CheckpointFormatError(where, f"tensor {t.name}: unknown dtype {t.dtype!r}")
        if (t.name, t.rank) in names:
            raise CheckpointFormatError(where, f"tensor {t.name} listed twice for rank {t.rank}")
        names.add((t.name, t.rank))
        part = parts.get(t.partition)
        if part is None or part.rank != t.rank:
            raise CheckpointFormatError(
                where, f"tensor {t.name}: partition {t.partition!r} is not a rank {t.rank} file"
            )
        if t.nbytes != math.prod(t.shape) * dtype.itemsize or t.nbytes < 0:
            raise CheckpointFormatError(
                where, f"tensor {t.name}: {t.nbytes} bytes do not fit shape {list(t.shape)}"
            )
        if t.offset % index.alignment or t.offset < 0:
            raise CheckpointFormatError(where, f"tensor {t.name}: offset {t.offset} not aligned")
        if t.offset + t.nbytes > part.nbytes:
            raise CheckpointCorruptError(
                where,
                f"tensor {t.name} at offset {t.offset} (+{t.nbytes} bytes) points past the end "
                f"of {t.partition} ({part.nbytes} bytes)",
            )
    for rank in range(index.tp):
        if not index.partitions_for(rank) and any(t.rank == rank for t in index.tensors):
            raise CheckpointFormatError(where, f"rank {rank} has tensors but no partition")


def open_partition(path: Path, nbytes: int) -> int:
    """A read-only fd on the partition file `path`, checked to hold the `nbytes` the index gives:
    a missing file or another size raises the `CheckpointError` that names it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise CheckpointNotFoundError(path, "partition file is missing") from None
    size = os.fstat(fd).st_size
    if size != nbytes:
        os.close(fd)
        what = "truncated" if size < nbytes else "longer than the index says"
        raise CheckpointCorruptError(path, f"partition {what}: {size} bytes, index says {nbytes}")
    return fd
