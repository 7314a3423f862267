"""The peer wire (`ember.store.peer`) on 127.0.0.1: what a peer server hands out and what it
refuses. The fetches through it (node stores, S3 behind them) are tested in
tests/integration/test_node_store_s3.py and test_node_store_ray.py."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from ember.store.peer import PeerError, PeerServer, PeerSource

INDEX = b'{"format_version": 1}'


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[PeerServer, Path]]:
    copy = tmp_path / "copies" / "k1"
    copy.mkdir(parents=True)
    (copy / "index.json").write_bytes(INDEX)
    (copy / "tokenizer.json").write_bytes(b"{}")
    (copy / "rank0-part0000.bin").write_bytes(os.urandom(3 << 20))
    (copy / ".ember-source").write_text("s3://models/k1")
    (tmp_path / "secret").write_bytes(b"not a checkpoint")
    server = PeerServer(lambda key: copy if key == "k1" else None, "127.0.0.1")
    try:
        yield server, copy
    finally:
        server.close()


def test_a_peer_hands_out_its_copys_files_and_ranges_byte_for_byte(
    served: tuple[PeerServer, Path],
) -> None:
    server, copy = served
    src = PeerSource.connect(server.offer("node-a", "dram"), "k1", INDEX, 1 << 20)
    assert src.extra_files() == ["index.json", "tokenizer.json"]  # no partitions, no dot files
    assert src.read_file("tokenizer.json") == b"{}"
    data = (copy / "rank0-part0000.bin").read_bytes()
    out = bytearray(1 << 20)
    reader = src.open_range("rank0-part0000.bin", 12345, len(out))
    try:
        reader.read_exact(memoryview(out)[:4096])
        reader.read_exact(memoryview(out)[4096:])
    finally:
        reader.close()
    assert bytes(out) == data[12345 : 12345 + len(out)]
    # The authority unreachable (None): the peer's index is taken.
    assert PeerSource.connect(server.offer("a", "dram"), "k1", None, 1 << 20).extra_files()


def test_a_peer_refuses_another_version_a_wrong_token_and_anything_outside_its_copies(
    served: tuple[PeerServer, Path],
) -> None:
    server, _ = served
    offer = server.offer("node-a", "ssd")
    with pytest.raises(PeerError, match="another version"):
        PeerSource.connect(offer, "k1", b'{"format_version": 2}', 1 << 20)
    with pytest.raises(PeerError, match="bad token"):
        PeerSource.connect(dataclasses.replace(offer, token="guess"), "k1", INDEX, 1 << 20)
    with pytest.raises(PeerError, match="no copy of k2 here"):
        PeerSource.connect(offer, "k2", INDEX, 1 << 20)
    src = PeerSource.connect(offer, "k1", INDEX, 1 << 20)
    for name in ("../secret", ".ember-source", ""):
        with pytest.raises(PeerError, match="no file"):
            src.open_range(name, 0, 1)
    with pytest.raises(PeerError, match="outside rank0-part0000.bin"):
        src.open_range("rank0-part0000.bin", 3 << 20, 1)
    with pytest.raises(PeerError, match="no file missing.bin"):
        src.open_range("missing.bin", 0, 1)
    server.close()  # the peer is gone
    with pytest.raises(PeerError, match="cannot connect"):
        src.open_range("rank0-part0000.bin", 0, 1)


def test_a_copy_the_peer_cannot_read_is_refused_with_the_reason(tmp_path: Path) -> None:
    """A copy with a fetch's `.progress` but an index the peer cannot parse: the requester is
    told why (and falls back), the server thread does not die silently."""
    copy = tmp_path / "k1"
    copy.mkdir()
    (copy / "index.json").write_bytes(INDEX)  # not an ember index
    (copy / "rank0-part0000.bin").write_bytes(bytes(4096))
    (copy / ".progress").write_bytes(b"\x00")
    server = PeerServer(lambda key: copy, "127.0.0.1")
    try:
        src = PeerSource.connect(server.offer("node-a", "fetching"), "k1", INDEX, 1 << 20)
        with pytest.raises(PeerError, match="cannot serve it: .*not an ember-checkpoint index"):
            src.open_range("rank0-part0000.bin", 0, 4096)
    finally:
        server.close()
