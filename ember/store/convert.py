"""The streaming converter: a Hugging Face source in, an ember checkpoint directory out.

Tensors go through one at a time. A tensor that is neither split nor cast is copied through a
fixed 16 MiB buffer, so it never sits whole in memory; one that is split (tp > 1) or cast is
materialised once, which bounds the peak at about the largest tensor plus that buffer.

The output is built in a hidden sibling directory (`.NAME.converting-PID-RANDOM`) whose index is
written last, then renamed into place: an interrupted conversion leaves no directory that
looks like a checkpoint. Output bytes depend only on the source and the arguments (tensor order
is the source's file order, no timestamps), so converting twice gives identical files.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import secrets
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import xxhash
from tqdm import tqdm

from ember.errors import ConfigError
from ember.store.dtypes import BY_TORCH, CASTABLE, DType, parse_target_dtype
from ember.store.format import (
    ALIGN_BYTES,
    CHECKSUM_BLOCK_BYTES,
    FORMAT_VERSION,
    INDEX_FILE,
    CheckpointIndex,
    PartitionEntry,
    TensorEntry,
    align_up,
    partition_file_name,
)
from ember.store.sharding import REPLICATED, ShardRule, check_tp, shard, shard_rule
from ember.store.source import ModelSource, SourceTensor, open_source, shared_storage_key

logger = logging.getLogger(__name__)

COPY_CHUNK_BYTES = 16 << 20
DEFAULT_PARTITION_BYTES = 1 << 30
# Names that hold the same matrix when config.tie_word_embeddings is true (the default in HF).
_TIE_GROUPS = (
    frozenset({"lm_head.weight", "model.embed_tokens.weight", "model.decoder.embed_tokens.weight"}),
)
_ZEROS = bytes(ALIGN_BYTES)


@dataclass(slots=True)
class _PartitionWriter:
    """Appends one rank's tensors to its partition files, aligned, with block checksums.

    Bytes are staged in one checksum block (4 MiB) and written a whole block at a time, at a
    block-aligned file offset. Written so, the file's pages sit in the page cache as 2 MiB
    folios, which a mapping of the file then takes with one page-table entry per 2 MiB instead
    of 512 (see `pagecache.populate`)."""

    directory: Path
    rank: int
    partition_bytes: int
    do_fsync: bool
    done: list[PartitionEntry] = field(default_factory=list)
    _fd: int = -1
    _name: str = ""
    _pos: int = 0
    _stage: bytearray = field(default_factory=lambda: bytearray(CHECKSUM_BLOCK_BYTES))
    _in_block: int = 0
    _blocks: list[str] = field(default_factory=list)

    def begin_tensor(self, nbytes: int) -> tuple[str, int]:
        """Start a tensor of `nbytes`; returns its (partition, offset)."""
        if self._fd >= 0 and self._pos and self._pos + nbytes > self.partition_bytes:
            self.close()
        if self._fd < 0:
            self._name = partition_file_name(self.rank, len(self.done))
            self._fd = os.open(
                self.directory / self._name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644
            )
            self._pos, self._in_block, self._blocks = 0, 0, []
        return self._name, self._pos

    def write(self, data: memoryview) -> None:
        while len(data):
            take = min(len(data), CHECKSUM_BLOCK_BYTES - self._in_block)
            self._stage[self._in_block : self._in_block + take] = data[:take]
            self._pos += take
            self._in_block += take
            data = data[take:]
            if self._in_block == CHECKSUM_BLOCK_BYTES:
                self._flush_block()

    def _flush_block(self) -> None:
        block = memoryview(self._stage)[: self._in_block]
        self._blocks.append(xxhash.xxh3_64_hexdigest(block))
        written = 0
        while written < len(block):
            written += os.write(self._fd, block[written:])
        self._in_block = 0

    def pad(self) -> None:
        gap = align_up(self._pos) - self._pos
        if gap:
            self.write(memoryview(_ZEROS)[:gap])

    def close(self) -> None:
        if self._fd < 0:
            return
        self.pad()
        if self._in_block:
            self._flush_block()
        if self.do_fsync:
            os.fsync(self._fd)
        os.close(self._fd)
        self._fd = -1
        self.done.append(PartitionEntry(self._name, self.rank, self._pos, tuple(self._blocks)))


def convert(
    src: str | Path,
    dst: str | Path,
    tp: int = 1,
    dtype: str | torch.dtype | None = None,
    progress: bool = True,
    *,
    overwrite: bool = False,
    partition_bytes: int = DEFAULT_PARTITION_BYTES,
    fsync: bool = True,
) -> Path:
    """Convert the HF folder or safetensors file `src` into the checkpoint directory `dst`.

    tp: tensor-parallel degree; each rank gets its own partition files (see sharding).
    dtype: cast fp32/fp16/bf16 tensors to this (bf16, fp16, fp32); others are kept as they are.
    overwrite: replace an existing `dst` (atomically) instead of refusing.
    """
    source = open_source(src)
    dst = Path(dst)
    target = parse_target_dtype(dtype) if dtype is not None else None
    check_tp(source.config, tp)
    if dst.exists() and not overwrite:
        raise ConfigError(f"{dst} already exists; remove it or pass overwrite=True (--overwrite)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.converting-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        index = _write(source, tmp, tp, target, progress, partition_bytes, fsync)
        _copy_side_files(source, tmp, target)
        _write_file(tmp / INDEX_FILE, index.dumps(), fsync)
        _publish(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("converted src=%s dst=%s tp=%d tensors=%d", src, dst, tp, len(index.tensors))
    return dst


def _write(
    source: ModelSource,
    tmp: Path,
    tp: int,
    target: DType | None,
    progress: bool,
    partition_bytes: int,
    do_fsync: bool,
) -> CheckpointIndex:
    config = dict(source.config)
    tie = bool(config.get("tie_word_embeddings", True))
    writers = [_PartitionWriter(tmp, r, partition_bytes, do_fsync) for r in range(tp)]
    entries: list[TensorEntry] = []
    stored: dict[Any, str] = {}  # tie key -> name of the stored tensor
    seen: set[str] = set()
    tensors = list(source.tensors())
    total = sum(t.nbytes for t in tensors)
    buf = bytearray(COPY_CHUNK_BYTES)
    with tqdm(total=total, unit="B", unit_scale=True, desc="convert", disable=not progress) as bar:
        for st in tensors:
            if st.name in seen:
                raise ConfigError(f"tensor {st.name} appears in two source files ({st.file})")
            seen.add(st.name)
            rule = shard_rule(st.name) if tp > 1 else REPLICATED
            cast = target if target and st.dtype.name in CASTABLE and st.dtype != target else None
            full = None
            key: Any = shared_storage_key(st)
            if key is None and tie and any(st.name in g for g in _TIE_GROUPS):
                full = _cast(st.to_tensor(), cast)
                key = ("tie", _group(st.name), full.dtype, tuple(full.shape), _checksum(full))
            if key is not None and key in stored:
                entries += _tied_entries(entries, st.name, stored[key])
            else:
                if key is not None:
                    stored[key] = st.name
                if full is None and (cast is not None or rule.is_split or st.loaded is not None):
                    full = _cast(st.to_tensor(), cast)
                if full is None:
                    entries += _stream(st, writers, buf)
                else:
                    entries += _write_tensor(st.name, full, rule, writers)
            bar.update(st.nbytes)
    for w in writers:
        w.close()
    if target is not None:
        for k in ("torch_dtype", "dtype"):
            if k in config:
                config[k] = str(target.torch_dtype).removeprefix("torch.")
    return CheckpointIndex(
        format_version=FORMAT_VERSION,
        config=config,
        tp=tp,
        tensors=tuple(entries),
        partitions=tuple(p for w in writers for p in w.done),
    )


def _group(name: str) -> int:
    return next(i for i, g in enumerate(_TIE_GROUPS) if name in g)


def _cast(t: torch.Tensor, cast: DType | None) -> torch.Tensor:
    return t if cast is None else t.to(cast.torch_dtype)


def _bytes_of(t: torch.Tensor) -> memoryview:
    flat = t.contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().data if flat.numel() else memoryview(b"")


def _checksum(t: torch.Tensor) -> str:
    return xxhash.xxh3_64_hexdigest(_bytes_of(t))


def _stream(st: SourceTensor, writers: list[_PartitionWriter], buf: bytearray) -> list[TensorEntry]:
    """Copy an unsplit, uncast safetensors tensor through `buf` to every rank."""
    places = [w.begin_tensor(st.nbytes) for w in writers]
    h = xxhash.xxh3_64()
    mv = memoryview(buf)
    fd = os.open(st.file, os.O_RDONLY)
    try:
        for start in range(0, st.nbytes, len(buf)):
            chunk = mv[: min(len(buf), st.nbytes - start)]
            st.read_into(fd, chunk, start)
            h.update(chunk)
            for w in writers:
                w.write(chunk)
    finally:
        os.close(fd)
    for w in writers:
        w.pad()
    return [
        TensorEntry(st.name, st.dtype.name, st.shape, w.rank, part, off, st.nbytes, h.hexdigest())
        for w, (part, off) in zip(writers, places, strict=True)
    ]


def _write_tensor(
    name: str, full: torch.Tensor, rule: ShardRule, writers: list[_PartitionWriter]
) -> list[TensorEntry]:
    dtype = BY_TORCH[full.dtype]
    tp = len(writers)
    out = []
    for w in writers:
        part = shard(full, rule, w.rank, tp)
        data = _bytes_of(part)
        place, offset = w.begin_tensor(len(data))
        w.write(data)
        w.pad()
        out.append(
            TensorEntry(
                name,
                dtype.name,
                tuple(part.shape),
                w.rank,
                place,
                offset,
                len(data),
                xxhash.xxh3_64_hexdigest(data),
                split=rule.kind.value if tp > 1 else "replicated",
                split_dim=rule.dim if tp > 1 and rule.is_split else None,
            )
        )
    return out


def _tied_entries(entries: list[TensorEntry], name: str, target: str) -> list[TensorEntry]:
    """Entries for `name` that share the stored bytes of `target` on every rank."""
    return [replace(e, name=name, tied_to=target) for e in entries if e.name == target]


def _copy_side_files(source: ModelSource, tmp: Path, target: DType | None) -> None:
    for f in source.side_files():
        if f.name == "config.json" and target is not None:
            cfg = json.loads(f.read_text())
            for k in ("torch_dtype", "dtype"):
                if k in cfg:
                    cfg[k] = str(target.torch_dtype).removeprefix("torch.")
            (tmp / f.name).write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        else:
            shutil.copyfile(f, tmp / f.name)


def _write_file(path: Path, text: str, do_fsync: bool) -> None:
    with open(path, "w") as f:
        f.write(text)
        if do_fsync:
            f.flush()
            os.fsync(f.fileno())


def _publish(tmp: Path, dst: Path) -> None:
    """Rename `tmp` to `dst`, replacing an old `dst` only once the new one is complete.

    Two processes converting the same source to the same `dst` at once (ranks of one engine)
    write identical bytes; if another one publishes between our check and our rename, ours is
    discarded and theirs kept. (With three or more, a third may have moved that one away
    again by the time we look: then ours is renamed in after all.)
    """
    fd = os.open(tmp, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    old = None
    if dst.exists():
        old = dst.parent / f".{dst.name}.replaced-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            os.rename(dst, old)
        except FileNotFoundError:  # another conversion moved it away first
            old = None
    for attempt in range(20):
        try:
            os.rename(tmp, dst)
            break
        except OSError as e:
            if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            if (dst / INDEX_FILE).is_file():
                logger.info("another conversion published dst=%s first; keeping it", dst)
                shutil.rmtree(tmp, ignore_errors=True)
                break
            # Between their publish and our look, a third conversion moved `dst` away to
            # replace it: try again (it is about to publish, or gone).
            if attempt == 19:
                raise
            time.sleep(0.01)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
