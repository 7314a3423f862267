"""The KV cache's bookkeeping: which fixed-size blocks of token slots each request holds.

A block is free iff its reference count is zero. Requests hold their blocks in `block_table`
order; token `i` of a request lives in slot `block_table[i // block_size] * block_size +
i % block_size`. Reference counts allow a block to be shared (a forked request's common prefix);
`free` drops one reference and returns the block to the pool at zero.

Invariants (checked by `check()`, asserted where they must hold): every block is either in the
free list with count 0 or out of it with count > 0; the free list has no duplicates; when no
request holds blocks, `num_free == num_blocks`.
"""

from __future__ import annotations

import heapq

from ember.engine.request import Request


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int) -> None:
        assert num_blocks > 0 and block_size > 0
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.ref_counts = [0] * num_blocks
        # A heap: the lowest free id first, so a request's blocks tend to be consecutive and
        # the runner can then read its context as one slice instead of a gather.
        self._free: list[int] = list(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def blocks_needed(self, request: Request, num_tokens: int) -> int:
        """How many more blocks `request` needs so that `num_tokens` tokens have slots."""
        return max(self.blocks_for(num_tokens) - len(request.block_table), 0)

    def can_grow(self, request: Request, num_tokens: int) -> bool:
        return self.blocks_needed(request, num_tokens) <= self.num_free

    def grow(self, request: Request, num_tokens: int) -> None:
        """Give `request` slots for its first `num_tokens` tokens (caller checked `can_grow`)."""
        need = self.blocks_needed(request, num_tokens)
        assert need <= self.num_free, f"grow by {need} blocks with {self.num_free} free"
        for _ in range(need):
            block = heapq.heappop(self._free)
            assert self.ref_counts[block] == 0
            self.ref_counts[block] = 1
            request.block_table.append(block)

    def share(self, request: Request, blocks: list[int]) -> None:
        """Let `request` hold `blocks` too (one more reference each)."""
        for block in blocks:
            assert self.ref_counts[block] > 0, f"sharing free block {block}"
            self.ref_counts[block] += 1
        request.block_table.extend(blocks)

    def free(self, request: Request) -> None:
        """Drop `request`'s references; blocks nobody else holds return to the pool."""
        for block in reversed(request.block_table):
            assert self.ref_counts[block] > 0, f"double free of block {block}"
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                heapq.heappush(self._free, block)
        request.block_table = []
        request.num_cached_tokens = 0

    def slot(self, request: Request, position: int) -> int:
        return request.block_table[position // self.block_size] * self.block_size + (
            position % self.block_size
        )

    def check(self) -> None:
        """Assert the invariants (tests call it after every step)."""
        free = set(self._free)
        assert len(free) == len(self._free), "duplicate block in the free list"
        for block, count in enumerate(self.ref_counts):
            assert count >= 0
            assert (count == 0) == (block in free), f"block {block}: refs={count}"
