"""Paged KV cache: block bookkeeping (plain ints) and the cache tensors.

A sequence owns a block table; token position p lives in slot
block_table[p // block_size] * block_size + p % block_size of every layer's
cache tensor [S, *kv_token_shape] (S = num_blocks * block_size).
"""
import numpy as np
import torch


def blocks_for(num_tokens, block_size):
    return -(-num_tokens // block_size)


class BlockManager:
    """Free-list allocator of KV blocks; check-then-act pairs."""

    def __init__(self, num_blocks, block_size):
        assert num_blocks > 0 and block_size > 0
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free_blocks = list(range(num_blocks - 1, -1, -1))   # pop() gives 0, 1, ...

    @property
    def num_free(self):
        return len(self.free_blocks)

    @property
    def num_used(self):
        return self.num_blocks - len(self.free_blocks)

    def blocks_needed(self, block_table, num_tokens):
        return max(0, blocks_for(num_tokens, self.block_size) - len(block_table))

    def can_grow(self, block_table, num_tokens):
        return self.blocks_needed(block_table, num_tokens) <= self.num_free

    def grow(self, block_table, num_tokens):
        """Extend `block_table` in place to hold `num_tokens` tokens."""
        need = self.blocks_needed(block_table, num_tokens)
        assert need <= self.num_free, "grow() without can_grow()"
        block_table.extend(self.free_blocks.pop() for _ in range(need))

    def free(self, block_table):
        self.free_blocks.extend(reversed(block_table))
        block_table.clear()
        assert len(self.free_blocks) <= self.num_blocks


def allocate_kv_caches(model, num_blocks, block_size, dtype, device, shared=False):
    """One [S, *kv_token_shape] tensor per layer (zeroed: never read before written);
    shared: in shared memory (a prefill worker process writes into it)."""
    shape = (num_blocks * block_size, *model.kv_token_shape())
    caches = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(model.num_layers)]
    return [c.share_memory_() for c in caches] if shared else caches


def slots_of(block_table, start, end, block_size):
    """[end - start] int64 cache slots of positions start..end-1, as a host array
    (numpy: built every step for every sequence, where torch's per-op cost would
    be ~10 us an op)."""
    first = start // block_size
    table = np.asarray(block_table[first:blocks_for(end, block_size)], dtype=np.int64)
    slots = (table[:, None] * block_size + np.arange(block_size, dtype=np.int64)).reshape(-1)
    return slots[start - first * block_size:end - first * block_size]
