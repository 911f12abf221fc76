"""CPUExpertLayer: the routed experts of one MoE layer on the compiled kernels.

Shape legend: T tokens, k experts per token, E experts, H hidden, I intermediate.
"""
import torch

from moed.backends.cpu.packed import PackedExperts, empty_buffers, pack_expert_into
from moed.backends.cpu.runtime import default_threads, workspace
from moed.backends.torch import check_routing
from moed.errors import InvalidRequestError
from moed.model.formats import Weight

class CPUExpertLayer:
    """forward(x [T, H], topk_ids [T, k], topk_weights [T, k]) -> [T, H] float32."""

    name = "cpu"

    def __init__(self, packed: PackedExperts, threads=None, kernels=None):
        from moed.backends.cpu.isa import load_kernels
        self.packed = packed
        self.kernels = kernels or load_kernels()
        self.threads = threads or default_threads()
        self._args = {m: packed.kernel_args(m) for m in ("gate", "up", "down")}
        # the kernel call's constant leading arguments (gate, up, down tile arguments,
        # fp8, E, H, I), computed once: a decode call is ~0.5 ms, and rebuilding them per
        # call cost a few percent of it (the decode stack passes them too)
        self.fixed_args = (self._args["gate"], self._args["up"], self._args["down"],
                       packed.code, packed.num_experts, packed.hidden, packed.inter)
        self._padded = (packed.shape("gate").kblocks * 128, packed.shape("down").kblocks * 128)

    @property
    def isa(self):
        return self.kernels.ISA

    @property
    def num_experts(self):
        return self.packed.num_experts

    @classmethod
    def from_tensors(cls, gate, up, down, gate_scale=None, up_scale=None, down_scale=None,
                     threads=None, kernels=None):
        """gate, up [E, I, H]; down [E, H, I] (HF Linear layout); FP8 e4m3 with float32
        scales [E, ceil(out/128), ceil(in/128)], or BF16 (scales None)."""
        E, I, H = gate.shape
        ws = {m: [_weight(t[e], None if s is None else s[e]) for e in range(E)]
              for m, t, s in (("gate", gate, gate_scale), ("up", up, up_scale),
                              ("down", down, down_scale))}
        return cls(pack_weights(ws["gate"], ws["up"], ws["down"], H, I), threads, kernels)

    @classmethod
    def from_weights(cls, gate, up, down, threads=None, kernels=None):
        """From lists of E `Weight` (the reference backend's TorchExperts fields)."""
        I, H = gate[0].shape
        return cls(pack_weights(gate, up, down, H, I), threads, kernels)

    def forward(self, x, topk_ids, topk_weights, out=None):
        p = self.packed
        x, ids, wts = self._check(x, topk_ids, topk_weights)
        T, k = ids.shape
        y = out if out is not None else torch.empty(T, p.hidden, dtype=torch.float32)
        if tuple(y.shape) != (T, p.hidden) or y.dtype != torch.float32 or not y.is_contiguous():
            raise InvalidRequestError(f"out must be contiguous float32 [{T}, {p.hidden}]", field="out")
        if T == 0:
            return y
        Hp, Ip = self._padded
        ws = workspace(self.kernels.workspace_bytes(T, k, p.num_experts, Hp, Ip, self.threads))
        rc = self.kernels.forward(*self.fixed_args, x.data_ptr(), x.dtype == torch.bfloat16, T, k,
                                  ids.data_ptr(), wts.data_ptr(), y.data_ptr(),
                                  ws.ctypes.data, self.threads)
        if rc:
            i = -1 - rc
            raise InvalidRequestError(f"topk_ids[{i // k}, {i % k}] = {int(ids.view(-1)[i])} is "
                                      f"outside [0, {p.num_experts})", field="topk_ids")
        return y

    __call__ = forward

    def _check(self, x, topk_ids, topk_weights):
        check_routing(x, topk_ids, topk_weights, self.packed.hidden)
        if x.dtype not in (torch.float32, torch.bfloat16):
            x = x.float()
        return (_host(x), _host(topk_ids, torch.int64), _host(topk_weights, torch.float32))


def _host(t, dtype=None):
    """t as a contiguous CPU tensor of dtype (itself when it already is: the common case)."""
    if t.device.type == "cpu" and (dtype is None or t.dtype == dtype) and t.is_contiguous() \
            and not t.requires_grad:
        return t
    t = t.detach().cpu()
    return (t if dtype is None else t.to(dtype)).contiguous()


def _weight(data, scale):
    return Weight(data, scale, (128, 128) if scale is not None else None)


def pack_weights(gate, up, down, H, I):
    """Lists of E Weights -> PackedExperts in fresh memory."""
    from moed.backends.cpu.packed import layer_format
    E = len(gate)
    fmt = layer_format([(w, f"experts.{e}") for ws in (gate, up, down)
                        for e, w in enumerate(ws)], "experts")
    buffers = empty_buffers(fmt, E, H, I)
    for e in range(E):
        pack_expert_into(buffers, e, gate[e], up[e], down[e],
                         tuple(f"experts.{e}.{m}_proj" for m in ("gate", "up", "down")))
    return PackedExperts(fmt, E, H, I, buffers)
