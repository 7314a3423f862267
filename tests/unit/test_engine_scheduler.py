"""Block manager invariants and the scheduler's batching and preemption policy (no model)."""

from __future__ import annotations

import pytest
import torch

from ember.engine.block_manager import BlockManager
from ember.engine.request import Request, RequestStatus
from ember.engine.sampling import SamplingParams
from ember.engine.scheduler import Scheduler
from ember.engine.tokenizer import IncrementalDetokenizer

EOS = 2


def _request(rid: str, prompt_len: int, max_tokens: int = 100) -> Request:
    return Request(
        request_id=rid,
        prompt_token_ids=list(range(10, 10 + prompt_len)),
        params=SamplingParams(max_tokens=max_tokens, temperature=0),
        generator=torch.Generator(),
        detokenizer=IncrementalDetokenizer(None, prompt_len),  # type: ignore[arg-type]
    )


def test_blocks_return_to_the_pool_when_requests_free_them() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    a, b = _request("a", 5), _request("b", 9)
    bm.grow(a, 5)
    bm.grow(b, 9)
    assert len(a.block_table) == 2 and len(b.block_table) == 3 and bm.num_free == 3
    assert bm.slot(a, 5 - 1) == a.block_table[1] * 4
    bm.check()
    bm.free(a)
    bm.free(b)
    bm.check()
    assert bm.num_free == bm.num_blocks and a.block_table == [] and b.block_table == []


def test_shared_blocks_are_freed_by_the_last_holder_only() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    a, b = _request("a", 8), _request("b", 8)
    bm.grow(a, 8)
    bm.share(b, a.block_table)
    bm.free(a)
    assert bm.num_free == 2
    bm.check()
    bm.free(b)
    assert bm.num_free == 4
    bm.check()


def test_double_free_is_caught() -> None:
    bm = BlockManager(num_blocks=4, block_size=4)
    a = _request("a", 4)
    bm.grow(a, 4)
    table = list(a.block_table)
    bm.free(a)
    a.block_table = table
    with pytest.raises(AssertionError, match="double free"):
        bm.free(a)


def _scheduler(num_blocks: int, max_num_seqs: int = 8, budget: int = 1000) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, 4), max_num_seqs, budget, 64, [EOS])


def _run_step(s: Scheduler, token: int = 7) -> tuple[list[str], int, list[str]]:
    plan = s.schedule()
    reqs = {r.request_id: r for r in [*s.running, *s.waiting]}
    batch = [reqs[q.request_id] for q in plan.seqs if q.sample]
    s.postprocess(batch, [token] * len(batch), [None] * len(batch))
    return [q.request_id for q in plan.seqs], plan.num_prefills, list(plan.preempted)


def test_prefill_comes_first_then_everyone_decodes_together() -> None:
    s = _scheduler(num_blocks=32)
    for i in range(3):
        s.add(_request(str(i), 6))
    assert _run_step(s) == (["0", "1", "2"], 3, [])
    plan = s.schedule()
    assert plan.num_prefills == 0 and [q.token_ids for q in plan.seqs] == [(7,)] * 3
    assert [q.start_position for q in plan.seqs] == [6, 6, 6]


def test_a_request_arriving_mid_decode_is_prefilled_in_the_decode_step() -> None:
    s = _scheduler(num_blocks=32)
    s.add(_request("0", 6))
    s.add(_request("1", 6))
    _run_step(s)
    s.add(_request("new", 5))
    plan = s.schedule()  # the newcomer's prompt, then one token of each running request
    assert plan.num_prefills == 1 and [q.request_id for q in plan.seqs] == ["new", "0", "1"]
    assert [(q.start_position, len(q.token_ids)) for q in plan.seqs] == [(0, 5), (6, 1), (6, 1)]


def test_max_num_seqs_bounds_the_batch() -> None:
    s = _scheduler(num_blocks=64, max_num_seqs=2)
    for i in range(5):
        s.add(_request(str(i), 3, max_tokens=2))
    seen = []
    while s.has_unfinished():
        ids, _, _ = _run_step(s)
        assert len(ids) <= 2 and len(s.running) <= 2
        seen.append(ids)
    assert s.block_manager.num_free == s.block_manager.num_blocks
    assert seen[0] == ["0", "1"]


def test_prefill_token_budget_splits_prompts_into_chunks() -> None:
    s = _scheduler(num_blocks=64, budget=10)
    for i in range(3):
        s.add(_request(str(i), 6))
    plan = s.schedule()  # "0" whole, then the 4 prompt tokens of "1" that fit
    assert [(q.request_id, q.start_position, len(q.token_ids), q.sample) for q in plan.seqs] == [
        ("0", 0, 6, True), ("1", 0, 4, False)
    ]  # fmt: skip
    s.postprocess([s.running[0]], [7], [None])
    r1 = s.running[1]
    assert r1.num_cached_tokens == 4 and r1.output_token_ids == [] and not s.waiting[0].block_table
    plan = s.schedule()  # decodes count first (1), then the rest of "1" (2), then "2" (6)
    assert [(q.request_id, q.start_position, len(q.token_ids), q.sample) for q in plan.seqs] == [
        ("1", 4, 2, True), ("2", 0, 6, True), ("0", 6, 1, True)
    ]  # fmt: skip
    assert plan.num_prefills == 2 and plan.seqs[0].token_ids == (14, 15)


def test_a_chunk_one_short_of_the_prompt_leaves_a_decode() -> None:
    s = _scheduler(num_blocks=64, budget=5)
    s.add(_request("long", 6))
    assert _run_step(s)[:2] == (["long"], 1)  # 5 of 6 prompt tokens, no token sampled
    plan = s.schedule()  # the prompt's last token runs as a decode and samples the first
    assert plan.num_prefills == 0 and plan.seqs[0].token_ids == (15,)
    assert plan.seqs[0].start_position == 5 and plan.seqs[0].sample


def test_decodes_take_the_budget_first_and_chunks_wait_for_it() -> None:
    s = _scheduler(num_blocks=64, budget=3)
    for i in range(3):
        s.add(_request(str(i), 1))
    _run_step(s)  # three 1-token prompts: all decode from now on
    s.add(_request("late", 4))
    ids, prefills, _ = _run_step(s)
    assert ids == ["0", "1", "2"] and prefills == 0  # the decodes use the whole budget
    s.finish(s.running[0], "abort")
    ids, prefills, _ = _run_step(s)
    assert ids == ["late", "1", "2"] and prefills == 1  # 1 token of "late" fits now


def test_out_of_blocks_preempts_the_newest_request_by_recompute() -> None:
    # 4 blocks of 4 tokens: two requests of 8 prompt tokens hold 2 blocks each.
    s = _scheduler(num_blocks=4)
    a, b = _request("a", 8), _request("b", 8)
    s.add(a)
    s.add(b)
    _run_step(s)  # prefill both: 9 tokens each now, 4 blocks used
    ids, prefill, preempted = _run_step(s)  # decode needs a 3rd block each
    assert preempted == ["b"] and ids == ["a"] and not prefill  # no admission while short
    assert b.status is RequestStatus.WAITING and b.block_table == [] and b.num_cached_tokens == 0
    assert s.waiting[0] is b and b.output_token_ids == [7]
    s.block_manager.check()
    s.finish(a, "abort")
    ids, prefill, _ = _run_step(s)  # b comes back with prompt + generated tokens recomputed
    assert ids == ["b"] and prefill and b.num_cached_tokens == 9
    s.finish(b, "abort")
    assert s.block_manager.num_free == 4


def test_token_level_stops_finish_and_free() -> None:
    s = _scheduler(num_blocks=16)
    eos, length = _request("eos", 3), _request("len", 3, max_tokens=1)
    s.add(eos)
    s.add(length)
    plan = s.schedule()
    assert len(plan.seqs) == 2
    s.postprocess([eos, length], [EOS, 9], [None, None])
    assert (eos.finish_reason, length.finish_reason) == ("stop", "length")
    assert not s.has_unfinished() and s.block_manager.num_free == 16


def test_token_ids_from_copies_exactly_the_range_asked_for() -> None:
    r = _request("a", prompt_len=5)
    r.output_token_ids.extend([100, 101, 102])
    whole = r.prompt_token_ids + r.output_token_ids
    for start, end in ((0, None), (2, 4), (3, 7), (5, 8), (6, None), (8, None)):
        want = whole[start:] if end is None else whole[start:end]
        assert r.token_ids_from(start, end) == want, (start, end)
