"""Dense linears on the CPU kernels: every ISA x FP8/BF16 against a float64
reference on ragged shapes, NaN-poisoned outputs, SIMD vs the scalar twin,
thread-count determinism, fused gate/up, forced ISA in a fresh process.

Tolerance: the kernels round activations to BF16 (vdpbf16ps) and accumulate
in FP32, so the reference is float64 over the BF16-rounded x and the exactly
dequantized W; what remains is FP32 summation error, bounded here by
2e-6 x sum_k |x_k w_k| (about 30 x the unit roundoff: K <= 300 terms summed in
up to 4 interleaved chains, then 3 block partial sums).
"""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import moed.backends.cpu.isa as cpu
from moed.errors import InvalidRequestError
from moed.backends.cpu.linears import CPUFusedLinear, CPUGatedMLP, CPULinear
from moed.backends.cpu.dense_store import concat_rows, pack_weight
from moed.model.formats import Weight, quantize_fp8
from moed.model.layers import Linear

from isa_kernels import kernels_or_skip

SHAPES = [(200, 300), (131, 67), (64, 128), (3, 257)]    # (out, in): ragged vs 128, 64, 16, 8
TOKENS = [1, 3, 17, 130]
TOL = 2e-6


def make_weight(out, inp, fmt, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g) * inp ** -0.5
    if fmt == "fp8":
        data, scale = quantize_fp8(w)
        return Weight(data, scale, (128, 128))
    return Weight(w.bfloat16())


def reference(x, w):
    """float64 y and the error scale sum_k |x_k w_k| for BF16-rounded activations."""
    xd, wd = x.bfloat16().double(), w.dequantize().double()
    return xd @ wd.T, xd.abs() @ wd.abs().T


@pytest.mark.parametrize("fmt", ["fp8", "bf16"])
@pytest.mark.parametrize("isa", cpu.ISAS)
def test_every_isa_matches_float64_on_ragged_shapes(isa, fmt):
    kernels = kernels_or_skip(isa)
    for i, (out, inp) in enumerate(SHAPES):
        w = make_weight(out, inp, fmt, seed=i)
        lin = CPULinear(w, threads=2, kernels=kernels)
        for T in TOKENS:
            x = torch.randn(T, inp, generator=torch.Generator().manual_seed(T))
            y = torch.full((T, out), float("nan"))
            lin(x, out=y)
            ref, scale = reference(x, w)
            err = ((y.double() - ref).abs() / (scale + 1e-30))
            print(f"{isa} {fmt} {out}x{inp} T={T}: max {err.max():.2e} mean {err.mean():.2e} "
                  f"(tol {TOL})")
            assert not torch.isnan(y).any()
            assert err.max() < TOL


@pytest.mark.parametrize("fmt", ["fp8", "bf16"])
def test_simd_matches_scalar_twin(fmt):
    # on generic the unit body is the scalar twin (expert_units.h): the two runs are
    # one code path there, so each is also held to the float64 reference
    kernels = cpu.load_kernels()
    w = make_weight(200, 300, fmt)
    p = pack_weight(w, "w")
    for T in TOKENS:
        x = torch.randn(T, 300)
        ys = [torch.full((T, 200), float("nan")) for _ in range(2)]
        for y, scalar in zip(ys, (False, True)):
            ws = np.empty(kernels.dense_workspace(T, p.shape.kblocks, 2), dtype=np.uint8)
            kernels.dense(p.kernel_args(), x.data_ptr(), False, T, y.data_ptr(), ws.ctypes.data,
                          2, scalar)
        ref, scale = reference(x, w)
        assert ((ys[0].double() - ys[1].double()).abs() / (scale + 1e-30)).max() < TOL
        for y in ys:
            assert ((y.double() - ref).abs() / (scale + 1e-30)).max() < TOL


def test_thread_count_does_not_change_the_result():
    # each task owns its rows of y: no reduction across threads, bitwise identical
    # (decode, T <= 2: each thread streams its own share of the tiles, then takes the
    # others' from their back ends; 20 tiles over 1-8 threads, more threads than the
    # 2 cores; and 2 tiles over up to 5 threads: shares left empty)
    for rows in (1240, 100):
        w = make_weight(rows, 260, "fp8")
        for T in (1, 2, 130):
            x = torch.randn(T, 260)
            ys = [CPULinear(w, threads=n)(x) for n in (1, 2, 3, 5, 8)]
            assert all(torch.equal(ys[0], y) for y in ys[1:])
            ref, scale = reference(x, w)
            assert ((ys[0].double() - ref).abs() / (scale + 1e-30)).max() < TOL
    # many calls in a row: a claim race would show as a wrong or missing tile
    w = make_weight(1240, 260, "bf16")
    x = torch.randn(1, 260)
    first = CPULinear(w, threads=3)(x)
    lin = CPULinear(w, threads=3)
    assert all(torch.equal(lin(x), first) for _ in range(200))


def test_bias_leading_dims_and_bf16_input():
    w = make_weight(131, 67, "bf16")
    bias = torch.randn(131)
    lin = CPULinear(w, bias)
    x = torch.randn(2, 5, 67)
    y = lin(x)
    ref, _ = reference(x.reshape(10, 67), w)
    assert y.shape == (2, 5, 131)
    torch.testing.assert_close(y.reshape(10, 131).double(), ref + bias.double(), rtol=1e-5,
                               atol=1e-5)
    torch.testing.assert_close(lin(x.bfloat16()), y)          # same BF16 rounding either way
    assert lin.weight is w and lin.bias is bias


def test_bad_shapes_name_the_field():
    lin = CPULinear(make_weight(64, 128, "fp8"))
    with pytest.raises(InvalidRequestError) as e:
        lin(torch.randn(3, 100))
    assert e.value.field == "x" and "128" in str(e.value)
    with pytest.raises(InvalidRequestError) as e:
        lin(torch.randn(3, 128), out=torch.empty(3, 63))
    assert e.value.field == "out"


def test_zero_tokens():
    assert CPULinear(make_weight(64, 128, "bf16"))(torch.randn(0, 128)).shape == (0, 64)


@pytest.mark.parametrize("fmt", ["fp8", "bf16"])
def test_fused_qkv_parts_equal_separate_linears(fmt):
    # q/k/v of uneven heights (not multiples of 128), with biases on two of them
    ws = [make_weight(rows, 200, fmt, seed) for rows, seed in ((72, 4), (40, 5), (40, 6))]
    biases = [torch.randn(72), None, torch.randn(40)]
    lins = [Linear(w, b) for w, b in zip(ws, biases)]
    fused = CPUFusedLinear.over(pack_weight(concat_rows(ws, "qkv"), "qkv"), lins, None, None)
    x = torch.randn(5, 200)
    for got, w, b in zip(fused(x), ws, biases):
        torch.testing.assert_close(got, CPULinear(w, b)(x))


@pytest.mark.parametrize("inter", [256, 72])
@pytest.mark.parametrize("fmt", ["fp8", "bf16"])
def test_fused_gate_up_matches_the_mlp(fmt, inter):
    gate, up, down = (make_weight(inter, 200, fmt, 1), make_weight(inter, 200, fmt, 2),
                      make_weight(200, inter, fmt, 3))
    gu = pack_weight(concat_rows([gate, up], "mlp"), "mlp.gate_up")
    mlp = CPUGatedMLP(CPUFusedLinear.over(gu, [Linear(gate), Linear(up)], None, None),
                      CPULinear(down))
    parts = mlp.gate_up.parts
    x = torch.randn(17, 200, generator=torch.Generator().manual_seed(inter))
    g, u = (x.bfloat16().double() @ w.dequantize().double().T for w in (gate, up))
    h = (F.silu(g) * u)
    ref = h.bfloat16().double() @ down.dequantize().double().T
    y = mlp(x)
    err = (y.double() - ref).abs()
    rel = (err.mean() / ref.abs().mean()).item()
    worst = (err.max() / ref.abs().max()).item()
    print(f"fused MLP {fmt}: mean rel {rel:.2e}, max {worst:.2e} of max |ref|")
    # h is rounded to BF16 twice: once by torch, once here, from FP32 g and u; where
    # the two land on neighbouring BF16 values one term of a sum moves by 2^-8 of
    # itself (measured on avx2 and generic over several inputs: mean <= 4e-6, max <=
    # 3.4e-5 of max |ref|)
    assert rel < 1e-3 and worst < 1e-3
    for part, w in zip(parts, (gate, up)):
        torch.testing.assert_close(part(x), CPULinear(w)(x))   # the views are the halves


RUN = """
import torch
from moed.backends.cpu.linears import CPULinear
from moed.model.formats import Weight, quantize_fp8
w = torch.randn(131, 67)
lin = CPULinear(Weight(*quantize_fp8(w), (128, 128)))
y = lin(torch.randn(3, 67))
assert y.shape == (3, 131) and not torch.isnan(y).any()
print(lin.kernels.ISA)
"""


@pytest.mark.parametrize("isa", cpu.ISAS)
def test_forced_isa_in_a_fresh_process(isa):
    r = subprocess.run([sys.executable, "-c", RUN], env=dict(os.environ, MOED_ISA=isa),
                       capture_output=True, text=True, timeout=120)
    if isa in cpu.supported_isas():
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == isa
    else:
        assert r.returncode != 0 and "MOED_ISA" in r.stderr
