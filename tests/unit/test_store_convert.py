"""The converter: every dtype round-trips bit-equal, shards rejoin, ties are stored once, output
is deterministic and atomic, and bad sources raise named CheckpointErrors."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ember.errors import (
    CheckpointCorruptError,
    CheckpointNotFoundError,
    ConfigError,
    NoWeightsError,
    UnsupportedDtypeError,
)
from ember.store import convert, load, read_index
from ember.store.format import ALIGN_BYTES
from ember.store.sharding import shard_rule, unshard

CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 16,
    "tie_word_embeddings": True,
}


def every_dtype_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    r = torch.randn(8, 6, generator=g)
    return {
        "model.embed_tokens.weight": r.bfloat16(),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(8, 6, generator=g).bfloat16(),
        "model.layers.0.self_attn.q_proj.bias": torch.randn(8, generator=g),
        "model.layers.0.self_attn.o_proj.weight": torch.randn(6, 8, generator=g).half(),
        "model.layers.0.mlp.up_proj.weight": torch.randn(16, 6, generator=g).double(),
        "model.layers.0.mlp.down_proj.weight": (r * 100).to(torch.float8_e4m3fn).t().contiguous(),
        "model.layers.0.mlp.gate_proj.weight": (r * 100).to(torch.float8_e5m2).repeat(2, 1),
        "model.layers.0.extra.i8": torch.randint(-128, 127, (3, 5), dtype=torch.int8, generator=g),
        "model.layers.0.extra.u8": torch.randint(0, 255, (7,), dtype=torch.uint8, generator=g),
        "model.layers.0.extra.i16": torch.randint(-999, 999, (4,), dtype=torch.int16, generator=g),
        "model.layers.0.extra.i32": torch.randint(-(2**31), 2**31 - 1, (2, 2), dtype=torch.int32),
        "model.layers.0.extra.i64": torch.tensor([2**62, -1, 0], dtype=torch.int64),
        "model.layers.0.extra.mask": torch.rand(9, generator=g) > 0.5,
        "model.layers.0.extra.scalar": torch.tensor(3.5),
        "model.layers.0.extra.empty": torch.zeros(0, 4),
        "model.norm.weight": torch.ones(6),
    }


def write_hf(folder: Path, tensors: dict[str, torch.Tensor], config: dict | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config or CONFIG))
    (folder / "tokenizer.json").write_text('{"model": "fake"}')
    return folder


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).view(torch.uint8) if t.dtype != torch.bool else t


@pytest.mark.parametrize("tp", [1, 2])
def test_every_dtype_round_trips_bit_equal(tmp_path: Path, tp: int) -> None:
    src = every_dtype_tensors()
    ck = convert(write_hf(tmp_path / "hf", src), tmp_path / "ck", tp=tp, progress=False)
    ranks = [load(ck, rank=r) for r in range(tp)]
    assert set(ranks[0]) == set(src)
    for name, want in src.items():
        got = unshard([r[name] for r in ranks], shard_rule(name) if tp > 1 else shard_rule(""))
        assert got.dtype == want.dtype and got.shape == want.shape, name
        assert torch.equal(bits(got), bits(want)), name


def test_column_and_row_shards_hold_their_slice(tmp_path: Path) -> None:
    src = every_dtype_tensors()
    ck = convert(write_hf(tmp_path / "hf", src), tmp_path / "ck", tp=2, progress=False)
    r1 = load(ck, rank=1)
    assert torch.equal(
        r1["model.layers.0.self_attn.q_proj.weight"],
        src["model.layers.0.self_attn.q_proj.weight"][4:],
    )
    assert torch.equal(
        r1["model.layers.0.self_attn.o_proj.weight"],
        src["model.layers.0.self_attn.o_proj.weight"][:, 4:],
    )
    index = read_index(ck)
    q1 = next(t for t in index.tensors if t.rank == 1 and t.name.endswith("q_proj.weight"))
    assert (q1.split, q1.split_dim, q1.shape, q1.partition) == (
        "column",
        0,
        (4, 6),
        "rank1-part0000.bin",
    )


def test_tied_weights_are_stored_once_and_load_under_both_names(tmp_path: Path) -> None:
    emb = torch.randn(32, 8).bfloat16()
    src = {
        "lm_head.weight": emb.clone(),
        "model.embed_tokens.weight": emb,
        "model.norm.weight": torch.ones(8),
    }
    ck = convert(write_hf(tmp_path / "hf", src), tmp_path / "ck", progress=False)
    index = read_index(ck)
    tied = {t.name: t for t in index.tensors}
    assert tied["model.embed_tokens.weight"].tied_to == "lm_head.weight"
    assert tied["model.embed_tokens.weight"].offset == tied["lm_head.weight"].offset
    assert index.partitions[0].nbytes == 2 * ALIGN_BYTES  # one page each: embedding, norm
    out = load(ck)
    assert torch.equal(out["lm_head.weight"], emb) and torch.equal(
        out["model.embed_tokens.weight"], emb
    )
    assert out["lm_head.weight"].data_ptr() == out["model.embed_tokens.weight"].data_ptr()


def test_untied_equal_embeddings_are_kept_apart_when_config_says_untied(tmp_path: Path) -> None:
    emb = torch.randn(16, 8)
    src = {"lm_head.weight": emb.clone(), "model.embed_tokens.weight": emb}
    cfg = {**CONFIG, "tie_word_embeddings": False}
    index = read_index(
        convert(write_hf(tmp_path / "hf", src, cfg), tmp_path / "ck", progress=False)
    )
    assert all(t.tied_to is None for t in index.tensors)
    assert len({t.offset for t in index.tensors}) == 2


def test_bin_source_with_shared_storage_is_stored_once(tmp_path: Path) -> None:
    (tmp_path / "hf").mkdir()
    emb = torch.randn(16, 8)
    torch.save(
        {
            "model.embed_tokens.weight": emb,
            "lm_head.weight": emb,
            "model.norm.weight": torch.ones(8),
        },
        tmp_path / "hf" / "pytorch_model.bin",
    )
    (tmp_path / "hf" / "config.json").write_text(
        json.dumps({**CONFIG, "tie_word_embeddings": False})
    )
    ck = convert(tmp_path / "hf", tmp_path / "ck", progress=False)
    assert sum(t.tied_to is not None for t in read_index(ck).tensors) == 1
    assert torch.equal(load(ck)["lm_head.weight"], emb)


def test_offsets_are_4k_aligned_and_files_padded(tmp_path: Path) -> None:
    ck = convert(write_hf(tmp_path / "hf", every_dtype_tensors()), tmp_path / "ck", progress=False)
    index = read_index(ck)
    assert all(t.offset % ALIGN_BYTES == 0 for t in index.tensors)
    for p in index.partitions:
        assert (ck / p.file).stat().st_size == p.nbytes and p.nbytes % ALIGN_BYTES == 0


def test_small_partition_limit_spreads_tensors_over_files(tmp_path: Path) -> None:
    src = {
        f"model.layers.{i}.mlp.up_proj.weight": torch.full((16, 256), float(i)) for i in range(5)
    }
    ck = convert(
        write_hf(tmp_path / "hf", src), tmp_path / "ck", progress=False, partition_bytes=40000
    )
    assert len(read_index(ck).partitions) == 3  # 16 KiB tensors, two per 40 kB file
    out = load(ck)
    assert all(torch.equal(out[k], v) for k, v in src.items())


def test_converting_twice_gives_identical_bytes(tmp_path: Path) -> None:
    hf = write_hf(tmp_path / "hf", every_dtype_tensors())
    a = convert(hf, tmp_path / "a", tp=2, progress=False)
    b = convert(hf, tmp_path / "b", tp=2, progress=False)
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    assert "tokenizer.json" in names and "config.json" in names
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n


def test_dtype_cast_changes_floats_only(tmp_path: Path) -> None:
    src = every_dtype_tensors()
    ck = convert(write_hf(tmp_path / "hf", src), tmp_path / "ck", dtype="fp16", progress=False)
    out = load(ck)
    assert out["model.layers.0.self_attn.q_proj.bias"].dtype == torch.float16
    assert torch.equal(out["model.embed_tokens.weight"], src["model.embed_tokens.weight"].half())
    assert out["model.layers.0.mlp.down_proj.weight"].dtype == torch.float8_e4m3fn
    assert out["model.layers.0.extra.i64"].dtype == torch.int64


def test_failed_conversion_leaves_no_checkpoint_behind(tmp_path: Path) -> None:
    hf = write_hf(tmp_path / "hf", {"a.weight": torch.ones(4)})
    save_file({"z.weight": torch.ones(1024)}, str(hf / "model-2.safetensors"))
    with open(hf / "model-2.safetensors", "r+b") as f:  # cut the second file short
        f.truncate(f.seek(0, 2) - 100)
    with pytest.raises(CheckpointCorruptError, match="model-2.safetensors"):
        convert(hf, tmp_path / "ck", progress=False)
    assert list(tmp_path.iterdir()) == [hf]


def test_existing_destination_is_refused_unless_overwrite(tmp_path: Path) -> None:
    hf = write_hf(tmp_path / "hf", {"a.weight": torch.ones(4)})
    ck = convert(hf, tmp_path / "ck", progress=False)
    with pytest.raises(ConfigError, match="already exists"):
        convert(hf, ck, progress=False)
    save_file({"b.weight": torch.zeros(2)}, str(hf / "model.safetensors"))
    convert(hf, ck, progress=False, overwrite=True)
    assert set(load(ck)) == {"b.weight"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "hf"]


def test_single_safetensors_file_source(tmp_path: Path) -> None:
    save_file({"w": torch.arange(10)}, str(tmp_path / "one.safetensors"))
    (tmp_path / "unrelated.json").write_text("{}")
    ck = convert(tmp_path / "one.safetensors", tmp_path / "ck", progress=False)
    assert read_index(ck).config == {}
    assert sorted(p.name for p in ck.iterdir()) == ["index.json", "rank0-part0000.bin"]
    assert torch.equal(load(ck)["w"], torch.arange(10))


def test_sharded_safetensors_source_with_index(tmp_path: Path) -> None:
    hf = tmp_path / "hf"
    hf.mkdir()
    save_file({"a": torch.ones(3)}, str(hf / "model-00001-of-00002.safetensors"))
    save_file({"b": torch.zeros(2)}, str(hf / "model-00002-of-00002.safetensors"))
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (hf / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    ck = convert(hf, tmp_path / "ck", progress=False)
    assert not (ck / "model.safetensors.index.json").exists()
    assert set(load(ck)) == {"a", "b"}


def test_folder_without_weights_raises_no_weights(tmp_path: Path) -> None:
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    with pytest.raises(NoWeightsError, match="hf"):
        convert(tmp_path / "hf", tmp_path / "ck", progress=False)


def test_missing_source_raises_not_found(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFoundError, match="nowhere"):
        convert(tmp_path / "nowhere", tmp_path / "ck", progress=False)


def test_unsupported_source_dtype_names_file_and_tensor(tmp_path: Path) -> None:
    header = json.dumps({"w": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}).encode()
    (tmp_path / "bad.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + bytes(8))
    with pytest.raises(UnsupportedDtypeError, match=r"bad\.safetensors: tensor w has dtype C64"):
        convert(tmp_path / "bad.safetensors", tmp_path / "ck", progress=False)


def test_tp_that_does_not_divide_kv_heads_is_refused(tmp_path: Path) -> None:
    hf = write_hf(tmp_path / "hf", {"a": torch.ones(4)})
    with pytest.raises(ConfigError, match="num_key_value_heads=2"):
        convert(hf, tmp_path / "ck", tp=4, progress=False)


def test_source_file_is_left_as_it_was(tmp_path: Path) -> None:
    src = every_dtype_tensors()
    hf = write_hf(tmp_path / "hf", src)
    convert(hf, tmp_path / "ck", tp=2, progress=False)
    again = load_file(str(hf / "model.safetensors"))
    assert all(torch.equal(bits(again[k]), bits(v)) for k, v in src.items())


def test_concurrent_conversions_to_one_destination_all_succeed(tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    src = every_dtype_tensors()
    hf = write_hf(tmp_path / "hf", src)
    dst = tmp_path / "ck"
    with ThreadPoolExecutor(4) as pool:
        done = list(
            pool.map(lambda _: convert(hf, dst, tp=2, progress=False, overwrite=True), range(4))
        )
    assert done == [dst] * 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "hf"]
    out = load(dst, rank=0)
    assert torch.equal(out["model.norm.weight"], src["model.norm.weight"])


def test_a_destination_moved_away_between_a_clash_and_the_look_is_published_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Three conversions at once: ours finds `dst` taken (another published it), but by the
    time it looks, a third has moved that one away to replace it. Ours is renamed in after
    all, rather than failing (a CI run met this once in the four-thread test above)."""
    import errno
    import importlib
    import os

    convert_module = importlib.import_module("ember.store.convert")  # the module, not the function

    tmp, dst = tmp_path / ".ck.converting", tmp_path / "ck"
    tmp.mkdir()
    (tmp / "index.json").write_text("{}")
    real_rename = os.rename
    clashes = []

    def rename(src: object, target: object) -> None:
        if Path(str(src)) == tmp and not clashes:
            clashes.append(1)  # dst was there a moment ago, and is gone (moved away) now
            raise OSError(errno.ENOTEMPTY, "Directory not empty")
        real_rename(src, target)  # type: ignore[arg-type]

    monkeypatch.setattr(convert_module.os, "rename", rename)
    convert_module._publish(tmp, dst)
    assert clashes == [1] and (dst / "index.json").is_file() and not tmp.exists()


def test_partitions_are_written_in_whole_aligned_blocks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whole 4 MiB blocks at block-aligned offsets (only a file's last write is shorter): written
    so, the page cache holds the file in 2 MiB folios that a mapping takes whole."""
    import os

    from ember.store.format import CHECKSUM_BLOCK_BYTES

    src = {
        f"model.layers.{i}.mlp.up_proj.weight": torch.rand(1000, 1500 + i) for i in range(3)
    }  # 6 MB each: every write of a tensor-by-tensor copy would straddle blocks
    hf = write_hf(tmp_path / "hf", src)
    writes: dict[str, list[tuple[int, int]]] = {}
    real_write = os.write

    def recording_write(fd: int, data: bytes | memoryview) -> int:
        path = os.readlink(f"/proc/self/fd/{fd}")
        if path.endswith(".bin"):
            writes.setdefault(Path(path).name, []).append((os.lseek(fd, 0, os.SEEK_CUR), len(data)))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", recording_write)
    ck = convert(hf, tmp_path / "ck", progress=False)
    monkeypatch.undo()
    assert set(writes) == {p.file for p in read_index(ck).partitions}
    for name, calls in writes.items():
        assert all(pos % CHECKSUM_BLOCK_BYTES == 0 for pos, _ in calls), name
        assert all(n == CHECKSUM_BLOCK_BYTES for _, n in calls[:-1]), name
        assert sum(n for _, n in calls) == (ck / name).stat().st_size
    out = load(ck)
    assert all(torch.equal(out[k], v) for k, v in src.items())
