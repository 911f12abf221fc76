"""The only engine file that touches tensors: builds a step's inputs from the
scheduled chunks, runs the model, returns logits."""
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext

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
    """`accel`: the hybrid engine's state (moed.backends.accel.install.Accel) or None;
    `dbo`: its dual-batch overlap policy (moed.engine.planner.DualBatchPolicy) or None."""

    def __init__(self, model, num_blocks, block_size, kv_dtype, accel=None, dbo=None,
                 kv_caches=None):
        self.model = model
        self.device = model.device
        self.block_size = block_size
        self.kv_caches = kv_caches if kv_caches is not None else \
            allocate_kv_caches(model, num_blocks, block_size, kv_dtype, model.device)
        self.accel, self.dbo = accel, dbo
        self._pool = None           # the two micro-batch threads, made on first use
        # the prefill thread forwards beside the steps: on the CPU one forward at a
        # time (the kernels' pool serves one caller); on CUDA each on its own stream
        self.forward_lock = threading.Lock() if self.device.type == "cpu" else nullcontext()

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
        with self.forward_lock:
            return self._run(chunks, last_of)

    def _run(self, chunks, last_of):
        start = time.perf_counter()
        if self.accel is not None:
            self.accel.route.slp_rows = slp_rows(chunks)
            self.accel.bridge.take_times()
        dual = self.dbo is not None and self.dbo.use(chunks)
        if dual:
            hidden, s = self.run_dual(chunks)
        else:
            ids, positions, batch, s = self.prepare(chunks)
            hidden = self.model.forward(ids, positions, batch)
        if self.dbo is not None and all(n == 1 for _, n in chunks):
            self.dbo.observe(len(chunks), dual, time.perf_counter() - start,
                             self.accel.bridge.take_times())
        if last_of is not None:
            if not last_of:
                return None
            rows = torch.tensor([s[i].start + s[i].length - 1 for i in last_of], device=self.device)
            hidden = hidden[rows]
        return self.model.compute_logits(hidden)

    # -- dual-batch overlap
    def run_dual(self, chunks):
        """Two micro-batches of decodes, each forwarded by its own host thread (on its
        own CUDA stream): one's CPU experts run while the device serves the other's
        attention. -> (hidden [N, D] in the chunks' order, SeqSlices). On the CPU
        device both halves share the cores, so they run one after the other."""
        half = (len(chunks) + 1) // 2
        parts = [chunks[:half], chunks[half:]]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(2, thread_name_prefix="moed-microbatch")
        cuda = self.device.type == "cuda"
        main = torch.cuda.current_stream(self.device) if cuda else None
        streams = self._streams() if cuda else (None, None)
        lock = None if cuda else threading.Lock()

        def forward(part, stream):
            with (torch.cuda.stream(stream) if cuda else nullcontext()), (lock or nullcontext()):
                if cuda:
                    stream.wait_stream(main)
                ids, positions, batch, _ = self.prepare(part)
                hidden = self.model.forward(ids, positions, batch)
                if cuda:
                    hidden.record_stream(main)
                return hidden

        futures = [self._pool.submit(forward, p, st) for p, st in zip(parts, streams)]
        hidden = [f.result() for f in futures]
        if cuda:
            for st in streams:
                main.wait_stream(st)
        slices = [SeqSlice(i, 1, 0, None) for i in range(len(chunks))]
        return torch.cat(hidden), slices

    def _streams(self):
        if getattr(self, "_cuda_streams", None) is None:
            self._cuda_streams = (torch.cuda.Stream(self.device), torch.cuda.Stream(self.device))
        return self._cuda_streams


def slp_rows(chunks):
    """[slice] of the step rows of prefill chunks whose plan streams the experts."""
    rows, start = [], 0
    for seq, n in chunks:
        plan = getattr(seq, "prefill_plan", None)
        if n > 1 and plan is not None and plan.path in ("slp", "dslp"):
            rows.append(slice(start, start + n))
        start += n
    return rows
