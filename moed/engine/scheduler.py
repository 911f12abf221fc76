"""Continuous batching: which sequences advance this step, by how many tokens.

Every step, running decodes go first (one token each), then unfinished
prefills continue in chunks, then waiting requests are admitted — all under
one per-step token budget, so a long prompt never stalls running streams.
A step with no decode running takes its oldest prefill's chunk size instead
(the planner's choice, `seq.prefill_chunk`): the experts' weights are read once
per chunk, so larger chunks prefill faster where nothing waits on the step.
When the KV cache runs out, the newest running sequence is preempted (its
blocks freed, recomputed later).
"""
from collections import deque

from moed.engine.sequence import Status


class Scheduler:
    def __init__(self, blocks, max_num_seqs, max_num_batched_tokens, max_waiting):
        assert max_num_batched_tokens >= max_num_seqs, "every decode must fit in one step"
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_tokens = max_num_batched_tokens
        self.max_waiting = max_waiting
        self.waiting = deque()
        self.running = []
        # hold(seq) -> True: a waiting sequence this step must not admit (a long prompt
        # that waits for the prefill worker while streams decode); None: none is held
        self.hold = None
        self.tpot = None           # a TPOTBudget: the decode steps' budget from a target

    def can_add(self):
        return len(self.waiting) < self.max_waiting

    def add(self, seq):
        assert self.can_add()
        self.waiting.append(seq)

    def has_work(self):
        return bool(self.waiting or self.running)

    def schedule(self):
        """-> [(seq, num_new_tokens)], in the order their rows appear in the step."""
        chunks, scheduled = [], set()
        by_age = sorted(self.running, key=lambda s: s.order)
        decodes = [s for s in by_age if s.num_remaining == 1]
        prefills = [s for s in by_age if s.num_remaining > 1]
        budget = self.step_budget(decodes, prefills)
        for seq in decodes + prefills:
            n = self._chunk(seq, budget)
            if n == 0 or seq.status is not Status.RUNNING:
                continue
            if self._reserve(seq, n, scheduled):
                chunks.append((seq, n))
                scheduled.add(seq)
                budget -= n
        held = []                  # waiting for the prefill worker: skipped, kept in order
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if self.hold is not None and self.hold(seq):
                held.append(self.waiting.popleft())
                continue
            n = self._admit(seq, budget)
            if n == 0:
                break
            self.waiting.popleft()
            seq.status = Status.RUNNING
            self.running.append(seq)
            chunks.append((seq, n))
            budget -= n
        self.waiting.extendleft(reversed(held))
        return chunks

    def _admit(self, seq, budget):
        """Blocks for a waiting sequence's first chunk, starting from the longest cached
        prefix of its tokens (at least its last token is computed: its logits are needed).
        -> the chunk's tokens, or 0 when the blocks do not fit (nothing taken)."""
        assert not seq.block_table and seq.num_computed == 0
        blocks = self.blocks
        shared, hashes = blocks.lookup(seq.token_ids, seq.num_tokens - 1)
        seq.num_computed = len(shared) * blocks.block_size
        n = self._chunk(seq, budget)
        if not self.claim(seq, shared, hashes, seq.num_computed + n):
            seq.num_computed = 0
            return 0
        return n

    def claim(self, seq, shared, hashes, num_tokens):
        """A waiting sequence's blocks: the cached prefix `shared` (from lookup, with its
        chain `hashes`) and new ones up to num_tokens -> False when they do not fit
        (nothing taken). The admission's, and the prefill worker's hand-off's."""
        blocks = self.blocks
        if not blocks.can_share(shared, seq.block_table, num_tokens):
            return False
        blocks.share(seq.block_table, shared)
        blocks.grow(seq.block_table, num_tokens)
        cached = len(shared) * blocks.block_size
        blocks.count_lookup(seq.num_tokens, cached)
        seq.block_hashes = hashes
        seq.num_cached_tokens = max(seq.num_cached_tokens, min(cached, len(seq.prompt_ids)))
        return True

    def register(self, seq):
        """After a step: the blocks `seq` filled become shareable."""
        self.blocks.register(seq.block_table, seq.block_hashes, seq.tokens, seq.num_computed)

    def step_budget(self, decodes, prefills):
        """Tokens this step may take: while decodes run, the TPOT target's budget
        (`tpot`, a moed.engine.planner.TPOTBudget) or max_num_batched_tokens (they must
        not stall behind a long chunk), else the oldest prefill's chunk size."""
        if decodes:
            return self.tpot.budget(len(decodes)) if self.tpot is not None else self.max_tokens
        first = prefills[0] if prefills else (self.waiting[0] if self.waiting else None)
        return (first and first.prefill_chunk) or self.max_tokens

    def _chunk(self, seq, budget):
        """Tokens of `seq` this step: up to the budget; beyond max_num_batched_tokens only
        as far as free KV blocks reach (a larger chunk never preempts anyone)."""
        n = min(seq.num_remaining, budget)
        if n <= self.max_tokens:
            return n
        fit = (len(seq.block_table) + self.blocks.num_free) * self.blocks.block_size \
            - seq.num_computed
        return max(min(n, fit), min(seq.num_remaining, self.max_tokens))

    def _reserve(self, seq, n, scheduled):
        """Blocks for `seq`'s next n tokens, preempting newer sequences if needed."""
        while not self.blocks.can_grow(seq.block_table, seq.num_computed + n):
            victims = [s for s in self.running if s is not seq and s not in scheduled]
            if not victims:
                self.preempt(seq)
                return False
            self.preempt(max(victims, key=lambda s: s.order))
        self.blocks.grow(seq.block_table, seq.num_computed + n)
        return True

    def preempt(self, seq):
        self.running.remove(seq)
        self.blocks.free(seq.block_table)       # its registered blocks stay cached
        seq.num_computed = 0
        seq.block_hashes = []
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)

    def finish(self, seq):
        """Remove a sequence wherever it is and free its blocks at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.free(seq.block_table)
        seq.status = Status.FINISHED
