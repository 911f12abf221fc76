"""The only engine file that touches tensors: builds a step's inputs from the
scheduled chunks, runs the model, returns logits."""
from contextlib import contextmanager

import torch

from moed.engine.kv_cache import allocate_kv_caches, slots_of
from moed.model.base import AttentionBatch, SeqSlice


# Steps of at most this many tokens run torch's own ops (norms, rotary, routing,
# sampling) on one thread: on tensors this small a second OpenMP thread costs a
# wake-up per op and takes a core from the kernels' pinned pool (measured on the
# Qwen3-30B-shaped decode benchmark, 2 cores: 75.8% -> 79.5% of the read
# bandwidth, overhead 10.6% -> 8.5% of the step). Prefill chunks keep them all.
SERIAL_TOKENS = 64


class ModelRunner:
    def __init__(self, model, num_blocks, block_size, kv_dtype):
        self.model = model
        self.device = model.device
        self.block_size = block_size
        self.kv_caches = allocate_kv_caches(model, num_blocks, block_size, kv_dtype, model.device)

    @contextmanager
    def torch_threads(self, tokens):
        """torch's intra-op threads for a step of `tokens` tokens (CPU only)."""
        before = torch.get_num_threads()
        if self.device.type != "cpu" or tokens > SERIAL_TOKENS or before == 1:
            yield
            return
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    def prepare(self, chunks):
        """chunks [(seq, n)] -> input_ids [N], positions [N], AttentionBatch, SeqSlices."""
        ids, positions, slices, start = [], [], [], 0
        for seq, n in chunks:
            first, end = seq.num_computed, seq.num_computed + n
            ids.extend(seq.tokens(first, end))
            positions.extend(range(first, end))
            slices.append(SeqSlice(start, n, end, slots_of(seq.block_table, 0, end,
                                                           self.block_size)))
            start += n
        as_tensor = lambda xs: torch.tensor(xs, dtype=torch.int64, device=self.device)  # noqa: E731
        batch = AttentionBatch.build(slices, self.kv_caches, self.device)
        return as_tensor(ids), as_tensor(positions), batch, slices

    def run(self, chunks, last_of=None):
        """Forward the chunks. Logits [len(last_of), V] of the last token of the
        chunks indexed by `last_of`, or of every token [N, V] when it is None."""
        ids, positions, batch, s = self.prepare(chunks)
        hidden = self.model.forward(ids, positions, batch)
        if last_of is not None:
            if not last_of:
                return None
            rows = torch.tensor([s[i].start + s[i].length - 1 for i in last_of], device=self.device)
            hidden = hidden[rows]
        return self.model.compute_logits(hidden)
