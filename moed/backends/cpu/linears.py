"""Dense linears on the compiled CPU kernels: attention projections, dense MLPs,
shared experts and the LM head, from the same packed tile layout, thread pool
and instruction-set dispatch as the routed experts.

`install_cpu_linears` is a pass over a built model (the model files do not
change): every `Linear` whose weight the kernels read exactly (FP8 e4m3 with
128x128 block scales, or BF16) becomes a `CPULinear` over the model's dense
store; a SiLU-gated MLP whose gate and up stack cleanly becomes one
`CPUGatedMLP` (gate and up in one kernel call, like the routed experts).
Routers are not among them: their FP32 logits pick the experts, and BF16
activations could flip a near tie (their per-row FP32 dots are in glue.py).
Shape legend: N tokens, D hidden, I intermediate.
"""
import logging

import torch
import torch.nn.functional as F

from moed.backends.cpu.dense_store import (PackedMatrix, concat_rows, open_or_build,
                                           pack_weight, part_starts)
from moed.backends.cpu.layout import int4_refusal
from moed.backends.cpu.runtime import default_threads, workspace
from moed.errors import InvalidRequestError
from moed.model.formats import FP8_DTYPE
from moed.model.layers import MLP, Linear

log = logging.getLogger(__name__)


class CPULinear:
    """y [N, out] = x [N, in] @ W^T (+ bias) on the kernels; `.weight` / `.bias` kept,
    and `args`, the kernel's tile arguments (the decode stack passes them too)."""

    def __init__(self, weight, bias=None, packed: PackedMatrix = None, threads=None, kernels=None):
        from moed.backends.cpu.isa import load_kernels
        self.weight = weight                    # formats.Weight [out, in], as stored
        self.bias = bias                        # [out] float32 or None
        self.packed = packed if packed is not None else pack_weight(weight, "weight")
        self.kernels = kernels or load_kernels()
        self.threads = threads or default_threads()
        self.args = self.packed.kernel_args()
        self._kblocks = self.packed.shape.kblocks

    @property
    def out_features(self):
        return self.packed.rows

    @property
    def in_features(self):
        return self.packed.cols

    def __call__(self, x, out=None):
        # x [..., in] float32 (or BF16) -> [..., out] float32 (into `out` [N, out] if given)
        lead = x.shape[:-1]
        x = self._check(x)
        N = x.shape[0]
        y = out if out is not None else torch.empty(N, self.packed.rows, dtype=torch.float32)
        if tuple(y.shape) != (N, self.packed.rows) or y.dtype != torch.float32 \
                or not y.is_contiguous():
            raise InvalidRequestError(f"out must be contiguous float32 [{N}, {self.packed.rows}]",
                                      field="out")
        if N:
            ws = workspace(self.kernels.dense_workspace(N, self._kblocks, self.threads))
            self.kernels.dense(self.args, x.data_ptr(), x.dtype == torch.bfloat16, N,
                               y.data_ptr(), ws.ctypes.data, self.threads)
        if self.bias is not None:
            y += self.bias
        return y.view(*lead, self.packed.rows)

    def _check(self, x):
        if x.shape[-1] != self.packed.cols:
            raise InvalidRequestError(f"x has shape {tuple(x.shape)}, expected [..., "
                                      f"{self.packed.cols}]", field="x")
        if x.dtype not in (torch.float32, torch.bfloat16):
            x = x.float()
        return x.detach().reshape(-1, x.shape[-1]).cpu().contiguous()


class CPUFusedLinear:
    """Linears of the same input stacked by rows into one packed matrix (attention's
    q/k/v, an MLP's gate/up): one kernel call streams them all, instead of one call,
    pool wake-up and partial row tile per part. Calling returns each part's output
    as a column view of one [N, rows] buffer."""

    def __init__(self, fused: CPULinear, parts, starts):
        self.fused = fused              # [sum of parts padded to 128 rows, in]
        self.parts = parts              # CPULinear views of fused's rows, `.weight` kept
        self.spans = [(a, a + p.out_features) for a, p in zip(starts, parts)]

    @classmethod
    def over(cls, packed, linears, threads, kernels):
        """Over the store matrix `packed` = concat_rows of the linears' weights."""
        ws = [lin.weight for lin in linears]
        starts = part_starts(ws)
        parts = [CPULinear(w, lin.bias, packed.row_slice(a, a + w.shape[0]), threads, kernels)
                 for w, lin, a in zip(ws, linears, starts)]
        bias = None
        if any(lin.bias is not None for lin in linears):
            bias = torch.zeros(packed.rows, dtype=torch.float32)
            for lin, a in zip(linears, starts):
                if lin.bias is not None:
                    bias[a:a + lin.bias.numel()] = lin.bias.float()
        return cls(CPULinear(None, bias, packed, threads, kernels), parts, starts)

    def __call__(self, x):
        # x [N, in] -> one [N, rows_i] view per part
        y = self.fused(x)
        return tuple(y[..., a:b] for a, b in self.spans)


class CPUGatedMLP:
    """down(silu(gate(x)) * up(x)) with gate and up as one [2I, D] matrix: one kernel
    call reads both (the routed experts fuse them the same way)."""

    def __init__(self, gate_up: CPUFusedLinear, down):
        self.gate_up = gate_up
        self.gate, self.up = gate_up.parts  # CPULinear views, `.weight` kept
        self.down = down                    # CPULinear or Linear [D, I]

    def __call__(self, x):
        # x [N, D] -> [N, D]
        g, u = self.gate_up(x)
        return self.down(F.silu(g) * u)


def packable(linear):
    """Whether the kernels read this Linear's weight exactly."""
    w = linear.weight
    if w.data.device.type != "cpu" or w.data.dim() != 2:
        return False
    if w.is_int4:
        return int4_refusal(w) is None
    if w.is_fp8:
        return w.data.dtype == FP8_DTYPE and tuple(w.block or ()) == (128, 128)
    return w.data.dtype == torch.bfloat16


def stackable(linears):
    """Whether these Linears can share one packed matrix: packable, same input width
    and format."""
    if not all(type(lin) is Linear and packable(lin) for lin in linears):
        return False
    first = linears[0].weight
    return all(lin.weight.shape[1] == first.shape[1] and lin.weight.fmt == first.fmt
               and (not first.is_int4 or lin.weight.int4.group == first.int4.group)
               for lin in linears)


QKV = ("q", "k", "v")        # attention projections fused when a module has all three


def dense_targets(model):
    """(linears, fusions): [(name, owner, attribute, Linear)] and [(name, owner, attribute
    or None, [Linear])] over the modules the model lists as holding linears
    (`CausalLM.linear_modules`, each naming its own in LINEARS), plus the LM head. A
    fusion with an attribute is a gated MLP (gate, up) replaced whole; one without is an
    attention's q/k/v, whose parts stay addressable."""
    linears, fusions = [], []
    for path, parent, attr, module in model.linear_modules():
        names = module.LINEARS
        qkv = [getattr(module, a, None) for a in QKV]
        if isinstance(module, MLP) and stackable([module.gate, module.up]) \
                and module.gate.bias is None and module.up.bias is None:
            fusions.append((f"{path}.gate_up", parent, attr, [module.gate, module.up]))
            names = ("down",)
        elif all(a in names for a in QKV) and stackable(qkv):
            fusions.append((f"{path}.qkv", module, None, qkv))
            names = tuple(a for a in names if a not in QKV)
        for a in names:
            lin = getattr(module, a)
            if type(lin) is Linear and packable(lin):
                linears.append((f"{path}.{a}", module, a, lin))
    if type(model.lm_head) is Linear and packable(model.lm_head):
        linears.append(("lm_head", model, "lm_head", model.lm_head))
    return linears, fusions


def install_cpu_linears(model, model_dir, threads=None, kernels=None, verify=False):
    """Replace every packable dense Linear of a built CPU model by a CPULinear over the
    model's dense store (built on first use). -> {store name: what replaced it}: a
    CPULinear, a CPUGatedMLP (`<mlp>.gate_up`) or the CPUFusedLinear of an attention's
    q/k/v (`<attn>.qkv`, its parts set as q, k and v). verify: the store's checksums
    read in full before use."""
    from moed.backends.cpu.isa import load_kernels
    if model.device.type != "cpu":
        return {}
    kernels = kernels or load_kernels()     # fails clearly on a forced, unsupported ISA
    threads = threads or default_threads()
    linears, fusions = dense_targets(model)
    sources = [(n, lin.weight) for n, _, _, lin in linears]
    sources += [(n, concat_rows([lin.weight for lin in lins], n)) for n, _, _, lins in fusions]
    if not sources:
        return {}
    store = open_or_build(model_dir, sources, verify=verify)
    installed = {}
    for name, owner, attr, lin in linears:
        installed[name] = CPULinear(lin.weight, lin.bias, store.matrix(name), threads, kernels)
        setattr(owner, attr, installed[name])
    for name, owner, attr, lins in fusions:
        fused = CPUFusedLinear.over(store.matrix(name), lins, threads, kernels)
        if attr is not None:                              # gated MLP: replaced whole
            installed[name] = CPUGatedMLP(fused, getattr(owner, attr).down)
            setattr(owner, attr, installed[name])
        else:                                             # q/k/v: parts stay addressable
            installed[name] = fused
            for a, part in zip(QKV, fused.parts):
                setattr(owner, a, part)
    log.debug("CPU linears: %d from %s, isa=%s, %d threads", count_linears(installed),
              store.path, kernels.ISA, threads)
    return installed


def count_linears(installed):
    """The number of checkpoint linears in install_cpu_linears' answer."""
    return sum(len(v.parts) if isinstance(v, CPUFusedLinear) else
               2 if isinstance(v, CPUGatedMLP) else 1 for v in installed.values())
