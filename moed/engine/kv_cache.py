"""Paged KV cache: block bookkeeping (plain ints) and the cache tensors.

A sequence owns a block table; token position p lives in slot
block_table[p // block_size] * block_size + p % block_size of every layer's
cache tensor [S, *kv_token_shape] (S = num_blocks * block_size).
"""
import hashlib
from array import array
from collections import OrderedDict

import numpy as np
import torch


def blocks_for(num_tokens, block_size):
    return -(-num_tokens // block_size)


class BlockManager:
    """Free-list allocator of KV blocks; check-then-act pairs.

    With prefix caching, a block full of computed tokens is registered under the hash of
    its tokens and of every token before it (`chain_hash`); a later sequence whose prompt
    starts with the same tokens shares it read-only (`ref` counts its holders). A block
    nobody holds any more keeps its contents and its hash in `evictable` (least recently
    used first) and is handed out again — its hash forgotten — only once the blocks never
    registered are gone.
    """

    def __init__(self, num_blocks, block_size, prefix_caching=False):
        assert num_blocks > 0 and block_size > 0
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self.free_blocks = list(range(num_blocks - 1, -1, -1))   # pop() gives 0, 1, ...
        self.ref = [0] * num_blocks              # holders of each block
        self.block_hash = [None] * num_blocks    # registered blocks: their chain hash
        self.block_tokens = [None] * num_blocks  # ... and their tokens (no collision)
        self.cached = {}                         # chain hash -> block
        self.evictable = OrderedDict()           # block -> None: ref 0, registered; LRU first
        self.queries = 0                         # prompt tokens looked up
        self.hits = 0                            # of which found

    @property
    def num_free(self):
        return len(self.free_blocks) + len(self.evictable)

    @property
    def num_used(self):
        return self.num_blocks - self.num_free

    @property
    def num_cached(self):
        """Blocks nobody holds, kept for their prefix."""
        return len(self.evictable)

    def blocks_needed(self, block_table, num_tokens):
        return max(0, blocks_for(num_tokens, self.block_size) - len(block_table))

    def can_grow(self, block_table, num_tokens):
        return self.blocks_needed(block_table, num_tokens) <= self.num_free

    def grow(self, block_table, num_tokens):
        """Extend `block_table` in place to hold `num_tokens` tokens."""
        need = self.blocks_needed(block_table, num_tokens)
        assert need <= self.num_free, "grow() without can_grow()"
        block_table.extend(self._take() for _ in range(need))

    def _take(self):
        if self.free_blocks:
            block = self.free_blocks.pop()
        else:                                    # the least recently used cached block
            block, _ = self.evictable.popitem(last=False)
            del self.cached[self.block_hash[block]]
            self.block_hash[block] = self.block_tokens[block] = None
        assert self.ref[block] == 0
        self.ref[block] = 1
        return block

    def free(self, block_table):
        """Let go of a sequence's blocks; its last blocks become the first to evict."""
        for block in reversed(block_table):
            assert self.ref[block] > 0, f"block {block} freed twice"
            self.ref[block] -= 1
            if self.ref[block]:
                continue
            if self.block_hash[block] is not None:
                self.evictable[block] = None
            else:
                self.free_blocks.append(block)
        block_table.clear()
        assert len(self.free_blocks) + len(self.evictable) <= self.num_blocks

    # -- prefix caching
    def lookup(self, tokens, max_tokens):
        """-> (cached blocks, their chain hashes) of the longest cached prefix of
        `tokens`, in whole blocks, covering at most `max_tokens` tokens."""
        blocks, hashes, parent, bs = [], [], None, self.block_size
        if not self.prefix_caching:
            return blocks, hashes
        for i in range(max_tokens // bs):
            chunk = tuple(tokens[i * bs:(i + 1) * bs])
            parent = chain_hash(parent, chunk)
            block = self.cached.get(parent)
            if block is None or self.block_tokens[block] != chunk:
                break
            blocks.append(block)
            hashes.append(parent)
        return blocks, hashes

    def can_share(self, shared, block_table, num_tokens):
        """Whether `shared` (from lookup) plus new blocks up to num_tokens fit."""
        idle = sum(1 for b in shared if self.ref[b] == 0)     # taken out of evictable
        need = max(0, blocks_for(num_tokens, self.block_size) - len(block_table) - len(shared))
        return need + idle <= self.num_free

    def share(self, block_table, shared):
        """Append the cached blocks `shared` to an empty block table (one more holder)."""
        assert not block_table, "share() starts a block table"
        for block in shared:
            if self.ref[block] == 0:
                del self.evictable[block]
            self.ref[block] += 1
            block_table.append(block)

    def count_lookup(self, looked_up, found):
        self.queries += looked_up
        self.hits += found

    def register(self, block_table, hashes, tokens, num_computed):
        """Register the blocks that `num_computed` tokens filled since the last call;
        `hashes` (the sequence's chain, extended in place) says how far it got."""
        if not self.prefix_caching:
            return
        bs = self.block_size
        parent = hashes[-1] if hashes else None
        for i in range(len(hashes), num_computed // bs):
            chunk = tuple(tokens(i * bs, (i + 1) * bs))
            parent = chain_hash(parent, chunk)
            hashes.append(parent)
            block = block_table[i]
            if parent in self.cached or self.block_hash[block] is not None:
                continue            # the same prefix computed twice at once: one is kept
            self.cached[parent] = block
            self.block_hash[block], self.block_tokens[block] = parent, chunk


def chain_hash(parent, tokens):
    """A block's key: a 128-bit BLAKE2b digest of its parent's key (None for the first
    block) and its tokens, so that it stands for every token up to the block's end. A
    hit also compares the block's own tokens; the chain before it is trusted to the
    digest (a collision takes ~2^64 blocks), not to Python's salted 64-bit hash()."""
    digest = hashlib.blake2b(parent or b"", digest_size=16)
    digest.update(array("q", tokens).tobytes())
    return digest.digest()


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
