"""A moving request's K/V shelf and pull (`ember.migration.kv_link`) over loopback sockets:
the bytes arrive whole, a ticket is good for one pull only, and every way a pull can fail
raises KvPullError naming the source (the target then recomputes)."""

from __future__ import annotations

import dataclasses
import os

import pytest

from ember.controller.types import KvBlob
from ember.errors import KvPullError
from ember.migration import kv_link
from ember.migration.kv_link import KvShelf, pull_kv


def _blob(tokens: int = 37) -> KvBlob:
    shape = (2, 2, tokens, 4, 8)  # layers, k/v, tokens, kv heads, head dim; fp16: 2 bytes
    return KvBlob(shape, "float16", os.urandom(2 * 2 * tokens * 4 * 8 * 2))


def test_a_ticket_pulls_the_bytes_once() -> None:
    shelf = KvShelf("127.0.0.1")
    try:
        blob = _blob()
        ticket = shelf.put(blob)
        assert ticket.tokens == 37 and ticket.nbytes == len(blob.data)
        assert "secret" not in repr(ticket) and ticket.secret.hex() not in repr(ticket)
        assert shelf.held() == 1
        got = pull_kv(ticket)
        assert bytes(got.data) == blob.data and got.shape == blob.shape
        assert got.dtype == "float16" and shelf.held() == 0
        with pytest.raises(KvPullError, match="no longer holds"):
            pull_kv(ticket)  # taken
        big = _blob(tokens=4000)  # 2 MB: many reads
        assert bytes(pull_kv(shelf.put(big)).data) == big.data
    finally:
        shelf.close()


def test_a_wrong_secret_gets_nothing_and_leaves_the_bytes() -> None:
    shelf = KvShelf("127.0.0.1")
    try:
        ticket = shelf.put(_blob())
        forged = dataclasses.replace(ticket, secret=bytes(len(ticket.secret)))
        with pytest.raises(KvPullError, match="no longer holds"):
            pull_kv(forged)
        assert shelf.held() == 1
        assert len(pull_kv(ticket).data) == ticket.nbytes
    finally:
        shelf.close()


def test_expired_and_closed_shelves_fail_the_pull(monkeypatch: pytest.MonkeyPatch) -> None:
    shelf = KvShelf("127.0.0.1")
    try:
        monkeypatch.setattr(kv_link, "SHELF_TTL_S", 0.0)
        ticket = shelf.put(_blob())
        assert shelf.held() == 0  # expired at once: dropped
        with pytest.raises(KvPullError, match="no longer holds"):
            pull_kv(ticket)
        monkeypatch.undo()
        ticket = shelf.put(_blob())
    finally:
        shelf.close()
    with pytest.raises(KvPullError, match=f"127.0.0.1:{ticket.port}"):
        pull_kv(ticket)  # the source is gone (connection refused)
    with pytest.raises(KvPullError, match="closed"):
        shelf.put(_blob())


def test_a_ticket_whose_size_does_not_match_its_shape_is_refused() -> None:
    shelf = KvShelf("127.0.0.1")
    try:
        ticket = shelf.put(_blob())
        with pytest.raises(KvPullError, match="bytes for"):
            pull_kv(dataclasses.replace(ticket, nbytes=ticket.nbytes - 2))
        with pytest.raises(KvPullError, match="unknown dtype"):
            pull_kv(dataclasses.replace(ticket, dtype="float7"))
    finally:
        shelf.close()
