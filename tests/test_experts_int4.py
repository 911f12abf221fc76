"""INT4 units (cython_src/expert_units.h) on every ISA: every code and zero point widens
exactly, the SIMD body matches its scalar twin and a float64 reference, the prefill's
widened unit gives the decode body's bits, and the fused MoE call matches the reference
experts on the dequantized weights."""
import numpy as np
import pytest
import torch

import moed.backends.cpu.isa as cpu
from moed.backends.cpu.experts import CPUExpertLayer
from moed.backends.cpu.layout import format_code, pack_matrix, pack_weight, packed_format
from moed.backends.torch import TorchExperts
from moed.model.formats import Weight, pack_int4, quantize_int4

from isa_kernels import kernels_or_skip

GROUPS = (32, 64, 128)


def int4_weight(codes, scales, zeros=None, group=32):
    from moed.model.formats import Int4
    return Weight(pack_int4(codes), int4=Int4(codes.shape[1], group, scales, zeros))


def random_int4(out, inp, group, sym, g, scale_dtype=torch.bfloat16):
    w = torch.randn(out, inp, generator=g)
    codes, p = quantize_int4(w, group, scale_dtype, symmetric=sym)
    return Weight(pack_int4(codes), int4=p)


def packed_units(g, scale_dtype=torch.bfloat16):
    """(group, sym, Weight, its packed unit) of a random 64 x 128 unit, every group size,
    symmetric and not."""
    for group in GROUPS:
        for sym in (True, False):
            w = random_int4(64, 128, group, sym, g, scale_dtype)
            yield group, sym, w, pack_weight(w)[0]


def apply(kernels, unit_ptr, code, x, scalar):
    """out [nt, 64] = the unit at unit_ptr (format code) . x [nt, 128]."""
    nt = x.shape[0]
    out = torch.full((nt, 64), 0.0)
    kernels.apply_unit(unit_ptr, code, x.data_ptr(), 128, nt, 1.0, out.data_ptr(), scalar)
    return out


@pytest.mark.parametrize("scalar", [False, True])
@pytest.mark.parametrize("isa", cpu.ISAS)
def test_every_code_and_zero_point_widens_exactly(isa, scalar):
    # one-hot tokens read the unit back column by column: (code - zero) * scale exactly,
    # every code against every zero point 0..16 (GPTQ v1 can store 16), every group size
    kernels = kernels_or_skip(isa)
    for group in GROUPS:
        ng = 128 // group
        codes = (torch.arange(64 * 128) * 7 % 16).to(torch.uint8).view(64, 128)
        zeros = ((torch.arange(64 * ng) * 5) % 17).to(torch.uint8).view(64, ng)
        scales = torch.rand(64, ng, generator=torch.Generator().manual_seed(group)) + 0.5
        for zs in (None, zeros):
            w = int4_weight(codes, scales.bfloat16(), zs, group)
            units, _ = pack_weight(w)
            fmt = packed_format(w)
            got = torch.empty(64, 128)
            for k in range(0, 128, 4):
                x = torch.zeros(4, 128, dtype=torch.bfloat16)
                for t in range(4):
                    x[t, k + t] = 1.0
                got[:, k:k + 4] = apply(kernels, units.ctypes.data, format_code(fmt), x,
                                        scalar).T
            assert torch.equal(got, w.dequantize()), (group, zs is None)


@pytest.mark.parametrize("isa", cpu.ISAS)
def test_simd_body_matches_scalar_twin(isa):
    # bound: FP32 sums of exact products (BF16 x 5-bit integers) per group, then the
    # group scale: <= 1e-6 of sum |x w|
    kernels = kernels_or_skip(isa)
    g = torch.Generator().manual_seed(3)
    for group, sym, w, units in packed_units(g, torch.float16):
        code, ref_w = format_code(packed_format(w)), w.dequantize().double()
        for nt in (1, 2, 3, 4):
            x = torch.randn(nt, 128, generator=g).bfloat16()
            a = apply(kernels, units.ctypes.data, code, x, False)
            b = apply(kernels, units.ctypes.data, code, x, True)
            ref = x.double() @ ref_w.T
            scale = x.double().abs() @ ref_w.abs().T
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-4), (group, sym, nt)
            for got in (a, b):
                err = ((got.double() - ref).abs() / scale).max().item()
                assert err <= 1e-6, (isa, group, sym, nt, err)


@pytest.mark.parametrize("isa", cpu.ISAS)
def test_widened_unit_gives_the_same_bits(isa):
    # prefill widens a unit once into BF16 scratch: the same values as the scalar twin's
    # widening, and the same bits through the body as the unit itself (batch-invariance)
    kernels = kernels_or_skip(isa)
    g = torch.Generator().manual_seed(4)
    for group, sym, w, units in packed_units(g):
        code = format_code(packed_format(w))
        wide, ref = aligned(kernels.WIDE_BYTES), aligned(kernels.WIDE_BYTES)
        wfmt = kernels.widen_unit(units.ctypes.data, code, wide.ctypes.data, False)
        if wfmt < 0:
            pytest.skip(f"{isa} does not widen units (no prefill scratch)")
        kernels.widen_unit(units.ctypes.data, code, ref.ctypes.data, True)
        assert np.array_equal(wide, ref)
        x = torch.randn(4, 128, generator=g).bfloat16()
        for nt in (1, 2, 4):
            as_is = apply(kernels, units.ctypes.data, code, x[:nt], False)
            widened = apply(kernels, wide.ctypes.data, wfmt, x[:nt], False)
            assert torch.equal(as_is, widened), (group, sym, nt)


@pytest.mark.parametrize("isa", cpu.ISAS)
def test_decode_bits_hold_for_tiny_activations_and_under_flushing(isa):
    """AVX2 decodes an INT4 unit's codes for 1..2 tokens with each nibble left in place,
    against x scaled by 16^-n: exact for every BF16 x, subnormals included. It steps
    aside when the MXCSR flushes subnormals. Either way, at 1..4 tokens, each row is
    the widened unit's bits, a token of tiny and subnormal activations included."""
    kernels = kernels_or_skip(isa)
    g = torch.Generator().manual_seed(12)
    x = torch.randn(4, 128, generator=g)
    x[0] = x[0] * 2.0 ** -124                      # normal and subnormal BF16, scaled below 2^-126
    x[1, ::2] = x[1, ::2] * 2.0 ** -120
    x[2, :6] = torch.tensor([2.0 ** -133, -2.0 ** -133, 2.0 ** -127, 2.0 ** -126, 2.0 ** -114, 0.0])
    x = x.bfloat16()
    assert (x[0].float().abs() < 2.0 ** -126).any() and (x[0].float() != 0).all()
    for group, sym, w, units in packed_units(g):
        code = format_code(packed_format(w))
        wide = aligned(kernels.WIDE_BYTES)
        wfmt = kernels.widen_unit(units.ctypes.data, code, wide.ctypes.data, False)
        if wfmt < 0:
            pytest.skip(f"{isa} does not widen units (no prefill scratch)")
        runs = {}
        for flush in (False, True):
            if torch.set_flush_denormal(flush) != flush and flush:
                pytest.skip("this CPU cannot flush denormals")
            try:
                for nt in (1, 2, 3, 4):
                    as_is = apply(kernels, units.ctypes.data, code, x[:nt], False)
                    widened = apply(kernels, wide.ctypes.data, wfmt, x[:nt], False)
                    assert torch.equal(as_is, widened), (group, sym, flush, nt)
                    runs[flush, nt] = as_is
            finally:
                torch.set_flush_denormal(False)
        assert (runs[False, 1] != 0).all()                 # the tiny token's sums are not lost
        assert not torch.equal(runs[False, 1], runs[True, 1])  # and flushing did take hold


def aligned(n):
    """A zeroed uint8 [n] array starting on a 64-byte boundary."""
    buf = np.zeros(n + 64, np.uint8)
    at = -buf.ctypes.data % 64
    return buf[at:at + n]


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("isa", cpu.ISAS)
def test_fused_moe_matches_the_reference(isa, sym):
    # Qwen-shaped ragged dims; decode (T=1, 3) and prefill (T=40: widened units)
    kernels = kernels_or_skip(isa)
    g = torch.Generator().manual_seed(5)
    E, H, I, k = 6, 160, 136, 2
    gate = [random_int4(I, H, 32, sym, g) for _ in range(E)]
    up = [random_int4(I, H, 32, sym, g) for _ in range(E)]
    down = [random_int4(H, I, 32, sym, g) for _ in range(E)]
    fast = CPUExpertLayer.from_weights(gate, up, down, threads=2, kernels=kernels)
    assert fast.packed.fmt == ("int4g32" if sym else "int4g32a")
    ref = TorchExperts(gate, up, down)
    for T in (1, 3, 40):
        x = torch.randn(T, H, generator=g)
        ids = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
        wts = torch.rand(T, k, generator=g)
        got = fast(x, ids, wts)
        want = ref.forward(x.bfloat16().float(), ids, wts)
        err = ((got - want).abs().max() / want.abs().max()).item()
        assert err < 2e-2, (T, err)             # the hidden h rounds to BF16 in the kernel
        if T == 40:                             # a token's bits do not depend on the batch
            one = fast(x[7:8], ids[7:8], wts[7:8])
            assert torch.equal(one[0], got[7])


def units_of_every_format(g):
    """(format code, packed unit) of one random 64 x 128 matrix as FP8 and BF16, then
    packed_units's INT4 units."""
    w = torch.randn(64, 128, generator=g)
    units = [(1, pack_matrix(w.to(torch.float8_e4m3fn), torch.ones(1, 1), (128, 128))[0]),
             (0, pack_matrix(w.bfloat16(), None, (128, 128))[0])]
    return units + [(format_code(packed_format(q)), u) for _, _, q, u in packed_units(g)]


@pytest.mark.parametrize("isa", cpu.ISAS)
def test_a_tokens_bits_do_not_depend_on_the_tokens_beside_it(isa):
    # the bodies for 2..4 tokens decode a unit's weights once for every token: each
    # token's row must be the one-token body's bits, in every format
    kernels = kernels_or_skip(isa)
    g = torch.Generator().manual_seed(6)
    units = units_of_every_format(g)
    x = torch.randn(4, 128, generator=g).bfloat16()
    for code, u in units:
        alone = torch.cat([apply(kernels, u.ctypes.data, code, x[t:t + 1], False)
                           for t in range(4)])
        for nt in (2, 3, 4):
            together = apply(kernels, u.ctypes.data, code, x[:nt], False)
            assert torch.equal(together, alone[:nt]), (isa, code, nt)


@pytest.mark.parametrize("isa", cpu.ISAS)
def test_prefill_passes_keep_each_tokens_bits(isa):
    # past 8 tokens prefill runs a BF16 or widened unit against up to 5 tokens a pass
    # (AVX2; groups of 4 elsewhere): every token's row is the one-token bits of the unit
    # as decode reads it, whatever the count and the grouping
    kernels = kernels_or_skip(isa)
    g = torch.Generator().manual_seed(7)
    units = units_of_every_format(g)
    x = torch.randn(17, 128, generator=g).bfloat16()
    for code, u in units:
        alone = torch.cat([apply(kernels, u.ctypes.data, code, x[t:t + 1], False)
                           for t in range(17)])
        wide = aligned(kernels.WIDE_BYTES)
        wfmt = kernels.widen_unit(u.ctypes.data, code, wide.ctypes.data, False) if code else -1
        runs = [(u, code)] + ([(wide, wfmt)] if wfmt >= 0 else [])
        for n in (5, 9, 10, 11, 12, 13, 14, 17):
            for unit, fmt in runs:
                together = apply(kernels, unit.ctypes.data, fmt, x[:n], False)
                assert torch.equal(together, alone[:n]), (isa, code, fmt, n)
        scalar = apply(kernels, u.ctypes.data, code, x, True)
        assert torch.allclose(scalar, alone, rtol=1e-5, atol=1e-4), (isa, code)
