"""Building blocks shared by the architectures: norms, linears, rotary, MLP.

Activations are float32 throughout the reference path; weights stay in their
published precision (BF16 or FP8 + block scales) and are dequantized exactly
per call, so the model is the published model, not an approximation of it.
Shape legend: N tokens in the step, D hidden, H heads, d head dim.
"""
import math

import torch
import torch.nn.functional as F

from moed.model.model_config import yarn_mscale


class RMSNorm:
    def __init__(self, weight, eps):
        self.weight = weight.float()  # [D] (small: upcast once, exactly)
        self.eps = eps

    def __call__(self, x):
        # x [..., D] float32
        return self.weight * self.normalize(x)

    def add(self, x, delta):
        """The residual add with this norm after it -> (x + delta, norm(x + delta))."""
        x = x + delta
        return x, self(x)

    def normalize(self, x):
        """x / rms(x), before the weight."""
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)


class Linear:
    def __init__(self, weight, bias=None):
        self.weight = weight          # formats.Weight [out, in]
        self.bias = None if bias is None else bias.float()   # [out]

    def __call__(self, x):
        # x [N, in] float32 -> [N, out] float32
        y = x @ self.weight.dequantize().T
        return y if self.bias is None else y + self.bias


class MLP:
    """SiLU-gated MLP: down(silu(gate(x)) * up(x)). Dense layers and shared experts."""

    LINEARS = ("gate", "up", "down")

    def __init__(self, gate, up, down):
        self.gate, self.up, self.down = gate, up, down   # Linear

    def __call__(self, x):
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Loader:
    """Checkpoint tensors placed on the model's device, as layer objects; the routed
    experts' weights on `expert_device` (the host, for the hybrid engine: they stay the
    checkpoint's mmap views there)."""

    def __init__(self, ckpt, device, expert_device=None):
        self.ckpt = ckpt
        self.device = device
        self.expert_device = expert_device or device

    def weight(self, prefix, out_features, in_features):
        return self.ckpt.weight(prefix, out_features, in_features).to(self.device)

    def expert_weight(self, prefix, out_features, in_features):
        """A routed expert's weight, on expert_device."""
        return self.ckpt.weight(prefix, out_features, in_features).to(self.expert_device)

    def tensor(self, name, shape):
        return self.ckpt.tensor(name, shape=shape).to(self.device)

    def has(self, name):
        return name in self.ckpt

    def linear(self, prefix, out_features, in_features, bias=False):
        b = self.tensor(f"{prefix}.bias", (out_features,)) if bias else None
        return Linear(self.weight(prefix, out_features, in_features), b)

    def norm(self, name, size, eps):
        return RMSNorm(self.tensor(name, (size,)), eps)

    def mlp(self, prefix, hidden, inter, names=("gate_proj", "up_proj", "down_proj")):
        gate, up, down = names
        return MLP(self.linear(f"{prefix}.{gate}", inter, hidden),
                   self.linear(f"{prefix}.{up}", inter, hidden),
                   self.linear(f"{prefix}.{down}", hidden, inter))


class Rotary:
    """Rotary position embedding (default, linear or YaRN), rotate-half layout.

    `interleaved` checkpoints (DeepSeek) store each rotary pair side by side;
    they are regrouped into halves before rotating, the same for q and k, so
    q.k is that of the pairwise rotation.
    """

    def __init__(self, rope, interleaved=False):
        self.interleaved = interleaved
        self.inv_freq, self.attention_scaling = _inv_freq(rope)   # [d/2], float

    def cos_sin(self, positions):
        # positions [N] -> cos, signed sin [N, 1, 2, d/2] float32: the sin half that
        # multiplies the first half's partner is negated, so a rotation is
        # x * cos + swap_halves(x) * sin (the same products as rotate_half, fewer ops)
        freqs = positions.float()[:, None] * self.inv_freq.to(positions.device)[None, :]
        cos, sin = freqs.cos() * self.attention_scaling, freqs.sin() * self.attention_scaling
        return CosSin((torch.stack((cos, cos), dim=1)[:, None],
                       torch.stack((-sin, sin), dim=1)[:, None]))

    @staticmethod
    def halves(cos_sin):
        """cos_sin's tables as plain [N, d/2] cos and sin views (what a fused rotary
        kernel takes); made once a step when cos_sin came from `cos_sin` (every layer asks)."""
        cached = getattr(cos_sin, "plain", None)
        if cached is not None:
            return cached
        cos, sin = cos_sin
        plain = cos[:, 0, 0], sin[:, 0, 1]
        if isinstance(cos_sin, CosSin):
            cos_sin.plain = plain
        return plain

    def __call__(self, x, cos, sin):
        # x [N, h, d]; cos, sin from cos_sin -> [N, h, d]
        n, h, d = x.shape
        if self.interleaved:
            x = x.view(n, h, d // 2, 2).transpose(-1, -2)
        x = x.reshape(n, h, 2, d // 2)                           # the two halves
        return (x * cos + x.flip(2) * sin).reshape(n, h, d)


class CosSin(tuple):
    """(cos, sin) of a step's positions, and their plain halves once asked for."""
    plain = None


def _inv_freq(rope):
    dim, base = rope.dim, rope.theta
    if rope.kind == "default":
        exps = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
        return 1.0 / (base ** exps), 1.0
    if rope.kind == "linear":
        exps = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
        return 1.0 / (base ** exps) / rope.factor, 1.0
    return _yarn_inv_freq(rope)


def _yarn_inv_freq(rope):
    """YaRN (arXiv 2309.00071): interpolate low frequencies, keep high ones,
    linear ramp between the two correction dims; cos/sin scaled by mscale."""
    s = rope.scaling
    dim, base, factor = rope.dim, rope.theta, rope.factor
    original = s.get("original_max_position_embeddings") or rope.max_positions
    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all = s.get("mscale"), s.get("mscale_all_dim")
        if mscale and mscale_all:
            attention_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all)
        else:
            attention_factor = yarn_mscale(factor)
    beta_fast = s.get("beta_fast") or 32
    beta_slow = s.get("beta_slow") or 1

    def correction_dim(rotations):
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)
