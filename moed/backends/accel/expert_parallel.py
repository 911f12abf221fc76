"""ShardedExperts: one MoE layer's routed experts split across ranks (expert
parallelism, small: one all-reduce per forward, no token exchange).

    rank r owns experts share(r) = [lo, hi), contiguous, sizes E // W or E // W + 1
    every rank:  the (token, j) pairs whose expert it owns -> weighted partial sums [T, D]
    all ranks:   all_reduce(sum) of the partial sums -> the layer's output [T, D]

Routing is recomputed on every rank, not exchanged: the caller gives every rank the
same x, topk_ids and topk_weights (same values, same order), and calls forward on
all ranks of the group together (it is a collective). Each rank holds only its
share's Weights, so expert memory is per share.

The partial sums are FP32 and added in another order than the one-rank reference
(moed.backends.torch.TorchExperts): equal to it within FP32 rounding, not bit for
bit; all ranks get the same output (the all-reduce's result).

Shape legend: T tokens, k experts per token, E experts, W ranks (world size), P pairs
(token, j) this rank owns, D hidden, I intermediate.
"""
import torch
import torch.distributed as dist

from moed.backends.torch import TorchExperts, check_routing
from moed.errors import ConfigError


def expert_share(rank, world_size, num_experts):
    """The experts rank owns: range(lo, hi), contiguous, the first E % W ranks one
    more. ConfigError if W > E (a rank would own none) or rank is not in [0, W)."""
    if not 1 <= world_size <= num_experts:
        raise ConfigError(f"world size {world_size} for {num_experts} experts: each rank "
                          f"needs at least one expert", field="world_size")
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is outside [0, {world_size})", field="rank")
    base, extra = divmod(num_experts, world_size)
    lo = rank * base + min(rank, extra)
    return range(lo, lo + base + (rank < extra))


class ShardedExperts:
    """forward(x [T, D], topk_ids [T, k], topk_weights [T, k]) -> [T, D], over the
    group's ranks; local is this rank's routed-experts backend (same interface) over
    its share, local expert i = global expert share.start + i."""

    def __init__(self, local, share, num_experts, hidden, group=None):
        assert local.num_experts == len(share), (local.num_experts, share)
        self.local = local              # backend over experts share (ids 0 .. len - 1)
        self.share = share              # range(lo, hi) of global expert ids
        self.num_experts = num_experts  # E, the whole layer's
        self.hidden = hidden            # D
        self.group = group              # torch.distributed process group (None: default)

    @classmethod
    def from_reference(cls, experts, rank=None, world_size=None, group=None, local=TorchExperts):
        """From a full TorchExperts, keeping only the share's Weights (drop the full one
        after). rank, world_size: the group's (default: read from torch.distributed).
        local(gate, up, down) builds this rank's backend over its share's Weights: the
        reference, or e.g. StreamedExperts on this rank's GPU (DSLP: each rank streams
        only its share)."""
        rank = dist.get_rank(group) if rank is None else rank
        world_size = dist.get_world_size(group) if world_size is None else world_size
        share = expert_share(rank, world_size, experts.num_experts)
        local = local(*(ws[share.start:share.stop]
                        for ws in (experts.gate, experts.up, experts.down)))
        return cls(local, share, experts.num_experts, experts.gate[0].shape[1], group)

    @property
    def name(self):
        return f"sharded-{self.local.name}[{self.share.start}:{self.share.stop}]"

    def forward(self, x, topk_ids, topk_weights):
        ids = self.check(x, topk_ids, topk_weights).to(x.device)
        k = ids.shape[1]
        pairs = ((ids >= self.share.start) & (ids < self.share.stop)).reshape(-1).nonzero()[:, 0]
        tok = pairs // k                                                     # [P]
        local_ids = ids.reshape(-1)[pairs, None] - self.share.start          # [P, 1]
        w = topk_weights.reshape(-1)[pairs, None].to(x.dtype)                # [P, 1]
        out = torch.zeros_like(x)                                            # [T, D]
        out.index_add_(0, tok, self.local.forward(x[tok], local_ids, w))     # one pair a row
        if len(self.share) < self.num_experts:        # other ranks hold the rest
            dist.all_reduce(out, op=dist.ReduceOp.SUM, group=self.group)
        return out

    __call__ = forward

    def check(self, x, topk_ids, topk_weights):
        """Shapes and id range -> topk_ids [T, k] int64 on the host; raised alike on every
        rank (same arguments), before the all-reduce, so no rank is left waiting."""
        return check_routing(x, topk_ids, topk_weights, self.hidden, self.num_experts)
