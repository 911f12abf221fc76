"""DSLP in the engine: stream-loading prefill over several devices, each streaming only
its share of every MoE layer's routed experts (SmallEP), one all-reduce a layer.

Rank 0 is the engine: it runs the model (embeddings, attention over the decode KV cache,
dense layers, routers, shared experts) on its device, as for SLP. Ranks 1 .. W-1 are
helper processes, one per further device, holding only their share of each MoE layer's
routed experts (host staging and a device ring): no dense weights, no KV cache, no
tokens. Per MoE layer and DSLP chunk (a collective over every rank, in this order):

    rank 0:     header [op, layer, T, k]  -- broadcast -->  every rank
                x [T, D] as BF16, topk ids [T, k], topk weights [T, k]  -- broadcast -->
    each rank:  its share's experts (ShardedExperts over StreamedExperts): the (token, j)
                pairs whose expert it owns, streamed through its ring -> FP32 partial sums
    all ranks:  all_reduce(sum) of the partial sums -> the layer's routed output [T, D]

x crosses as BF16 because the experts' first GEMMs round their input to BF16: every rank
computes on the bits rank 0 would have. The routing crosses as rank 0 computed it (k ids
and weights a token), so the helpers need no router weights. Rank 0 uses the same
BF16-rounded x and the all-reduced sum, so its output is that of every rank.

Against SLP on one device the same per-expert arithmetic runs, but a token's weighted
sum over its experts is added in another order (per rank, then across ranks): equal
within FP32 rounding, inside the precision contract, not bit for bit.

A helper that dies is seen before the next DSLP layer (or by the failed collective):
the group is then closed and the layers fall back to the host's CPU experts, so the
prompt in flight and every later one still complete (slower), and the engine logs why.

Shape legend: T tokens of the chunk, k experts per token, D hidden, W ranks.
"""
import logging
import multiprocessing as mp
import os
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from moed.backends.accel.expert_parallel import ShardedExperts, expert_share
from moed.errors import ConfigError

log = logging.getLogger(__name__)

OP_STOP, OP_LAYER = 0, 1
START_TIMEOUT_S = 600.0          # a helper loads its share and packs its staging
COLLECTIVE_TIMEOUT_S = 300.0     # the longest a rank waits in one collective


@dataclass(frozen=True)
class RankSpec:
    """What a helper builds: its device and its share's rings, as rank 0 chose them."""
    model_dir: str
    world_size: int
    device_kind: str             # "cuda" | "cpu" (the CPU device: the tests' twin)
    bandwidth: float = None      # the CPU device's copy cap, bytes/s
    ring_length: object = 2      # slots, at most a rank's share, or "auto" (under budget)
    budget: object = None        # moed.backends.accel.ring.RingBudget, for "auto"
    staging: str = "pinned"      # pinned | bounce
    threads: int = 1             # torch threads of a CPU-device helper


def backend_for(device_kind):
    return "nccl" if device_kind == "cuda" else "gloo"


def comm_device(device_kind, gpu):
    """Where a rank's collective tensors live (NCCL: its GPU; gloo: the host)."""
    return torch.device("cuda", gpu) if device_kind == "cuda" else torch.device("cpu")


def make_device(spec, gpu):
    if spec.device_kind == "cuda":
        from moed.backends.accel.cuda_device import CUDADevice
        torch.cuda.set_device(gpu)
        return CUDADevice(gpu)
    from moed.backends.accel.cpu_device import CPUDevice
    return CPUDevice(spec.bandwidth, keep_log=False)


def sharded_layers(refs, rank, spec, device):
    """{layer: ShardedExperts} over this rank's share of each layer's routed experts
    (refs: {layer: TorchExperts}), every local StreamedExperts on one shared ring."""
    from moed.backends.accel.streamed_experts import StreamedExperts
    first, out = None, {}
    for i, ref in refs.items():
        share = expert_share(rank, spec.world_size, ref.num_experts)
        ring = spec.ring_length if spec.ring_length == "auto" else \
            max(2, min(spec.ring_length, len(share)))

        def local(gate, up, down, ring=ring):
            nonlocal first
            streamed = StreamedExperts(gate, up, down, device, ring, spec.budget, share=first,
                                       staging=spec.staging)
            first = first or streamed
            return streamed
        out[i] = ShardedExperts.from_reference(ref, rank, spec.world_size, local=local)
        out[i].local.layer = i
    return out


def check_world(world_size, num_experts):
    if not isinstance(world_size, int) or isinstance(world_size, bool) or world_size < 2:
        raise ConfigError(f"DSLP needs at least 2 ranks, got {world_size!r}",
                          field="dslp_ranks")
    if world_size > num_experts:
        raise ConfigError(f"DSLP over {world_size} ranks, but a layer has {num_experts} "
                          f"experts: each rank needs at least one", field="dslp_ranks")


class DSLPGroup:
    """Rank 0's side: starts the helpers, joins the process group with them, and gives
    each MoE layer its DSLPExperts. close() stops the helpers (also on the engine's
    close); one group per process (torch.distributed's default group)."""

    def __init__(self, refs, spec, rank0_device):
        check_world(spec.world_size, min(r.num_experts for r in refs.values()))
        if spec.device_kind == "cuda" and torch.cuda.device_count() < spec.world_size:
            raise ConfigError(f"DSLP over {spec.world_size} GPUs, but {torch.cuda.device_count()} "
                              f"are visible", field="dslp_ranks")
        if dist.is_initialized():
            raise ConfigError("torch.distributed is already initialized in this process: "
                              "one DSLP engine per process", field="prefill_path")
        self.spec = spec
        self.lock = threading.Lock()
        self.broken = None                       # why the group stopped, once it has
        # rank 0 on the engine's GPU, helper r on the r-th of the others
        first = getattr(rank0_device, "torch_device", torch.device("cpu")).index or 0
        gpus = [g for g in range(torch.cuda.device_count()) if g != first] \
            if spec.device_kind == "cuda" else [None] * (spec.world_size - 1)
        self.comm = comm_device(spec.device_kind, first)
        self.dir = tempfile.TemporaryDirectory(prefix="moed-dslp-")
        init = f"file://{os.path.join(self.dir.name, 'rendezvous')}"
        ctx = mp.get_context("spawn")
        self.procs, self.conns = [], []
        try:
            for rank in range(1, spec.world_size):
                ours, theirs = ctx.Pipe()
                proc = ctx.Process(target=helper_main,
                                   args=(rank, spec, init, theirs, gpus[rank - 1]),
                                   name=f"moed-dslp-{rank}", daemon=True)
                proc.start()
                theirs.close()
                self.procs.append(proc)
                self.conns.append(ours)
            self._await("loaded")
            dist.init_process_group(backend_for(spec.device_kind), init_method=init, rank=0,
                                    world_size=spec.world_size,
                                    timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
            self.layers = sharded_layers(refs, 0, spec, rank0_device)
            self._await("ready")
        except BaseException:
            self._stop_processes()
            self._leave()
            self.dir.cleanup()
            raise
        log.info("DSLP: %d ranks (%s), each streaming its share of %d layers' experts",
                 spec.world_size, backend_for(spec.device_kind), len(self.layers))

    def _await(self, what):
        """Wait for every helper's `what` message; a helper's error or death raises."""
        deadline = time.monotonic() + START_TIMEOUT_S
        for rank, (proc, conn) in enumerate(zip(self.procs, self.conns), start=1):
            while not conn.poll(0.1):
                if not proc.is_alive():
                    raise RuntimeError(f"DSLP rank {rank} exited (code {proc.exitcode}) "
                                       f"before it was {what}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"DSLP rank {rank} not {what} after {START_TIMEOUT_S:.0f} s")
            kind, detail = conn.recv()
            if kind == "error":
                raise RuntimeError(f"DSLP rank {rank} failed to start: {detail}")
            assert kind == what, (kind, what)

    def experts(self, layer, fallback):
        """The DSLP experts of MoE layer `layer`; fallback: the host's experts for it."""
        return DSLPExperts(self, layer, self.layers[layer], fallback)

    @property
    def name(self):
        return f"dslp-{self.spec.world_size}x{self.spec.device_kind}"

    def alive(self):
        """False (and the group closed, with the reason logged) once a helper is gone."""
        if self.broken is not None:
            return False
        dead = [(r, p.exitcode) for r, p in enumerate(self.procs, start=1) if not p.is_alive()]
        if dead:
            self.fail("rank %d exited (code %s)" % dead[0])
        return self.broken is None

    def fail(self, why):
        """Give up on the group: the layers run on the host's experts from now on."""
        if self.broken is None:
            self.broken = why
            log.error("DSLP: %s; prefill falls back to the host's experts", why)
            self._stop_processes()
            self._leave()

    def run(self, layer, sharded, x, ids, w):
        """One layer's collective from rank 0 -> the routed output [T, D] float32."""
        T, k = ids.shape
        c = self.comm
        dist.broadcast(torch.tensor([OP_LAYER, layer, T, k], dtype=torch.int64, device=c), 0)
        xb = x.to(c, torch.bfloat16).contiguous()
        ids = ids.to(c, torch.int64).contiguous()
        w = w.to(c, torch.float32).contiguous()
        for t in (xb, ids, w):
            dist.broadcast(t, 0)
        return sharded.forward(xb.float(), ids, w)

    def close(self):
        with self.lock:
            if self.broken is None:
                try:
                    dist.broadcast(torch.tensor([OP_STOP, 0, 0, 0], dtype=torch.int64,
                                                device=self.comm), 0)
                except Exception as e:          # a helper gone already
                    log.warning("DSLP: stop not delivered (%s)", e)
                self.broken = "closed"
                self._leave()
            self._stop_processes()
            self.dir.cleanup()

    def _leave(self):
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception as e:
                log.warning("DSLP: leaving the process group: %s", e)

    def _stop_processes(self):
        for proc in self.procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        for conn in self.conns:
            conn.close()
        self.procs, self.conns = [], []


class DSLPExperts:
    """One MoE layer's routed experts through the DSLP group (rank 0's side), behind the
    `forward(x, topk_ids, topk_weights) -> [T, D] float32` of StreamedExperts; the
    host's experts (`fallback`) once the group is gone."""

    def __init__(self, group, layer, sharded, fallback):
        self.group, self.layer = group, layer
        self.sharded, self.fallback = sharded, fallback
        self.chunks = 0                          # chunks run through the group

    @property
    def name(self):
        return self.group.name

    @property
    def num_experts(self):
        return self.sharded.num_experts

    def forward(self, x, topk_ids, topk_weights):
        g = self.group
        with g.lock:
            if g.alive():
                try:
                    y = g.run(self.layer, self.sharded, x, topk_ids, topk_weights)
                    self.chunks += 1
                    return y.to(x.device)
                except Exception as e:             # a rank lost mid-collective
                    g.fail(f"collective failed at layer {self.layer}: {e}")
        host = torch.device("cpu")
        return self.fallback.forward(x.to(host), topk_ids.to(host),
                                     topk_weights.to(host)).to(x.device)

    __call__ = forward


def helper_main(rank, spec, init, conn, gpu):
    """A helper rank (on GPU `gpu` where CUDA): load its share, join the group, serve
    layers until OP_STOP."""
    try:
        torch.set_num_threads(max(1, spec.threads))
        from moed.model.checkpoint import Checkpoint
        from moed.model.registry import load_model
        cpu = torch.device("cpu")
        model = load_model(Checkpoint(spec.model_dir), cpu, expert_device=cpu)
        refs = {i: moe.experts for i, moe in model.moe_layers()}
        del model
        device = make_device(spec, gpu)
        conn.send(("loaded", None))
        dist.init_process_group(backend_for(spec.device_kind), init_method=init, rank=rank,
                                world_size=spec.world_size,
                                timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        layers = sharded_layers(refs, rank, spec, device)
        del refs
        conn.send(("ready", None))
    except BaseException as e:
        try:
            conn.send(("error", f"{type(e).__name__}: {e}"))
        finally:
            raise
    serve(layers, comm_device(spec.device_kind, gpu))
    dist.destroy_process_group()


def serve(layers, c):
    header = torch.empty(4, dtype=torch.int64, device=c)
    D = next(iter(layers.values())).hidden
    while True:
        dist.broadcast(header, 0)
        op, layer, T, k = header.tolist()
        if op == OP_STOP:
            return
        xb = torch.empty((T, D), dtype=torch.bfloat16, device=c)
        ids = torch.empty((T, k), dtype=torch.int64, device=c)
        w = torch.empty((T, k), dtype=torch.float32, device=c)
        for t in (xb, ids, w):
            dist.broadcast(t, 0)
        layers[layer].forward(xb.float(), ids, w)
