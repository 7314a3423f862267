"""Merging of an instance's pending deltas into one message per request (no Ray needed)."""

from __future__ import annotations

from ember.cluster.instance import coalesce
from ember.controller.types import StreamDelta
from ember.errors import RequestError


def delta(rid: str, ids: tuple[int, ...], text: str, finished: bool = False) -> StreamDelta:
    return StreamDelta(rid, ids, text, finished, "length" if finished else None, 3)


def test_each_request_gets_one_merged_delta_in_first_seen_order() -> None:
    batch = [
        ("a", delta("a", (1,), "x")),
        ("b", delta("b", (7,), "p")),
        ("a", delta("a", (2, 3), "yz")),
        ("b", delta("b", (8,), "q", finished=True)),
    ]
    assert coalesce(batch) == [  # type: ignore[arg-type]
        ("a", delta("a", (1, 2, 3), "xyz")),
        ("b", delta("b", (7, 8), "pq", finished=True)),
    ]


def test_logprobs_concatenate_with_their_tokens() -> None:
    one = StreamDelta("a", (1,), "x", False, None, 3, ({1: -0.1},))
    two = StreamDelta("a", (2,), "y", True, "stop", 3, ({2: -0.2},))
    [(rid, merged)] = coalesce([("a", one), ("a", two)])
    assert merged == StreamDelta("a", (1, 2), "xy", True, "stop", 3, ({1: -0.1}, {2: -0.2}))


def test_an_error_is_never_merged_away() -> None:
    err = RequestError("prompt is empty")
    assert coalesce([("a", err)]) == [("a", err)]
    first = delta("a", (1,), "x")
    out = coalesce([("a", first), ("a", err)])
    assert out == [("a", first), ("a", err)]


def test_wire_rows_round_trip_deltas_and_errors() -> None:
    from ember.cluster.instance import pack, unpack

    d = StreamDelta("a", (1, 2), "xy", True, "stop", 3, ({1: -0.1}, {2: -0.2}))
    row = pack("a", d)
    assert all(type(v) in (str, tuple, bool, int, type(None)) for v in row)  # plain, cheap
    assert unpack(row) == d
    err = RequestError("prompt is empty")
    assert unpack(pack("a", err)) is err
