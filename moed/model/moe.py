"""Routed experts behind one interface, and the routers that feed them.

Shape legend: T tokens, E experts, k experts per token, D hidden, I expert
intermediate size.

A routed-experts backend computes, for every token t,
    y[t] = sum_j topk_weights[t, j] * down_e(silu(gate_e(x[t])) * up_e(x[t])),
with e = topk_ids[t, j]. Model files only call `forward`; they do not know
whether it runs in the torch reference, the CPU kernels or on a GPU.
"""
import torch

from moed.backends.torch import TorchExperts
from moed.model.formats import Weight
from moed.model.layers import Linear


def float_gate(gate):
    """A router's [E, D] weight upcast once (exactly): it is small, and read every step."""
    return Linear(Weight(gate.weight.dequantize()), gate.bias)


def softmax_topk(logits, k, norm_topk_prob):
    # logits [T, E] -> ids [T, k] int64, weights [T, k] float32 (Mixtral, Qwen-MoE)
    probs = logits.float().softmax(dim=-1)
    weights, ids = probs.topk(k, dim=-1)
    if norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return ids, weights


def rowwise_sigmoid(x):
    """x [T, E] float32 -> sigmoid(x), each row's values independent of T: torch's
    vectorised sigmoid computes the tail of the flat buffer (and of each thread's
    share) on another path, so rows are padded to whole 64-element vectors first."""
    T, E = x.shape
    Ep = -(-E // 64) * 64
    if Ep == E:
        return x.sigmoid()
    padded = x.new_zeros(T, Ep)
    padded[:, :E] = x
    return padded.sigmoid_()[:, :E]


def rowwise_sum(w):
    """w [T, k] -> [T, 1]: columns added left to right (torch's reduction order over a
    short last dim changes with the number of rows)."""
    total = w[:, :1].clone()
    for j in range(1, w.shape[1]):
        total += w[:, j:j + 1]
    return total


def grouped_sigmoid_topk(logits, bias, k, n_group, topk_group, norm_topk_prob, scaling):
    # DeepSeek-V3: logits [T, E], bias [E] (e_score_correction_bias) -> ids, weights [T, k].
    # The bias only steers selection; weights come from the unbiased scores. A row's
    # result does not depend on the other rows (batch-invariant).
    scores = rowwise_sigmoid(logits.float())                              # [T, E]
    biased = scores + bias                                                # [T, E]
    T, E = biased.shape
    grouped = biased.view(T, n_group, E // n_group)                       # [T, G, E/G]
    group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)             # [T, G]
    keep = group_scores.topk(topk_group, dim=-1).indices                  # [T, topk_group]
    group_mask = torch.zeros_like(group_scores).scatter_(1, keep, 1.0)    # [T, G]
    expert_mask = group_mask[:, :, None].expand_as(grouped).reshape(T, E)
    ids = biased.masked_fill(expert_mask == 0, 0.0).topk(k, dim=-1).indices  # [T, k]
    weights = scores.gather(1, ids)
    if norm_topk_prob:
        weights = weights / (rowwise_sum(weights) + 1e-20)
    return ids, weights * scaling


class SoftmaxRouter:
    """Mixtral / Qwen-MoE: softmax over router logits, top-k."""

    def __init__(self, gate, k, norm_topk_prob):
        self.gate, self.k, self.norm_topk_prob = float_gate(gate), k, norm_topk_prob   # [E, D]

    def __call__(self, x):
        return softmax_topk(self.gate(x), self.k, self.norm_topk_prob)


class GroupedSigmoidRouter:
    """DeepSeek-V3 noaux_tc: sigmoid scores, group-limited top-k, scaled weights."""

    def __init__(self, gate, bias, k, n_group, topk_group, norm_topk_prob, scaling):
        self.gate, self.bias = float_gate(gate), bias.float()   # Linear [E, D], [E]
        self.k, self.n_group, self.topk_group = k, n_group, topk_group
        self.norm_topk_prob, self.scaling = norm_topk_prob, scaling

    def __call__(self, x):
        return grouped_sigmoid_topk(self.gate(x), self.bias, self.k, self.n_group,
                                    self.topk_group, self.norm_topk_prob, self.scaling)


class MoE:
    """Router -> routed experts (+ shared experts, optionally sigmoid-gated)."""

    def __init__(self, router, experts, shared=None, shared_gate=None):
        self.router = router
        self.experts = experts          # any backend with forward(x, ids, weights)
        self.shared = shared            # MLP or None
        self.shared_gate = shared_gate  # Linear [1, D] or None (Qwen2-MoE)

    def __call__(self, x):
        # x [T, D] float32 -> [T, D]
        ids, weights = self.router(x)
        # a backend with `submit` starts the routed experts elsewhere (the host, for the
        # hybrid engine) and returns their result's getter: the shared expert runs meanwhile
        submit = getattr(self.experts, "submit", None)
        finish = submit(x, ids, weights) if submit else None
        y = None if finish else self.experts.forward(x, ids, weights)
        if self.shared is not None:
            s = self.shared(x)
            if self.shared_gate is not None:
                s = rowwise_sigmoid(self.shared_gate(x).float()) * s
            y = (finish() if finish else y) + s
        elif finish:
            y = finish()
        return y


def load_experts(load, prefix, num_experts, hidden, inter, names=("gate_proj", "up_proj", "down_proj")):
    """The reference backend over `<prefix>.{e}.<name>` weights, as stored (on the
    loader's expert_device)."""
    gate, up, down = names
    ws = [[load.expert_weight(f"{prefix}.{e}.{n}", *shape) for e in range(num_experts)]
          for n, shape in ((gate, (inter, hidden)), (up, (inter, hidden)), (down, (hidden, inter)))]
    return TorchExperts(*ws)
