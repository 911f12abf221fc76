"""All 256 e4m3 codes through the kernels' FP8 widening, each ISA, SIMD and scalar twin;
the SIMD unit body against its scalar twin and a float64 reference."""
import pytest
import torch

import moed.backends.cpu.isa as cpu
from moed.backends.cpu.layout import pack_matrix

from isa_kernels import kernels_or_skip


def unit_of_codes(codes):
    units, _ = pack_matrix(codes.view(torch.float8_e4m3fn), torch.ones(1, 1), (128, 128))
    return units


def widen(kernels, units, scalar):
    """[64, 128] floats of a unit, read back column by column with one-hot tokens."""
    got = torch.empty(64, 128)
    for k in range(0, 128, 4):
        x = torch.zeros(4, 128, dtype=torch.bfloat16)
        for t in range(4):
            x[t, k + t] = 1.0
        out = torch.zeros(4, 64)
        kernels.apply_unit(units.ctypes.data, True, x.data_ptr(), 128, 4, 1.0, out.data_ptr(), scalar)
        got[:, k:k + 4] = out.T
    return got


@pytest.mark.parametrize("scalar", [False, True])
@pytest.mark.parametrize("isa", cpu.ISAS)
def test_every_e4m3_code_widens_exactly(isa, scalar):
    kernels = kernels_or_skip(isa)
    # every code 32 times at varied chunk positions; NaN codes (0x7f, 0xff) would
    # spill into their whole row through 0 * NaN, so they get their own unit below
    codes = (torch.arange(64 * 128) * 37 % 256).to(torch.uint8).view(64, 128)
    finite = codes.clone()
    finite[(codes & 0x7F) == 0x7F] = 0
    want = finite.view(torch.float8_e4m3fn).float()               # torch's decoding
    got = widen(kernels, unit_of_codes(finite), scalar)
    assert len(set(finite.flatten().tolist())) == 254             # all 256 codes but the 2 NaNs
    assert torch.equal(got, want)                                 # exact, -0.0 aside
    sub = (finite & 0x78) == 0                                    # subnormals and zeros
    assert (want[sub] != 0).any() and torch.equal(got[sub], want[sub])

    nan_codes = torch.zeros(64, 128, dtype=torch.uint8)
    nan_codes[5, 9], nan_codes[40, 127] = 0x7F, 0xFF
    rows_nan = torch.isnan(widen(kernels, unit_of_codes(nan_codes), scalar)).any(dim=1)
    assert rows_nan.nonzero().flatten().tolist() == [5, 40]


@pytest.mark.parametrize("isa", cpu.ISAS)
def test_simd_body_matches_scalar_twin(isa):
    # on generic the unit body is the scalar twin (expert_units.h), so a == b there by
    # construction: the float64 reference is what tests it. Bound: FP32 sums of exact
    # products (BF16 x BF16/e4m3), 128 terms: <= 1e-6 of sum |x w| (measured <= 5e-8)
    kernels = kernels_or_skip(isa)
    g = torch.Generator().manual_seed(3)
    for fp8 in (True, False):
        w = torch.randn(64, 128, generator=g)
        data = w.to(torch.float8_e4m3fn) if fp8 else w.bfloat16()
        units, _ = pack_matrix(data, torch.ones(1, 1) if fp8 else None, (128, 128))
        for nt in (1, 2, 3, 4):
            x = torch.randn(nt, 128, generator=g).bfloat16()
            a, b = torch.zeros(nt, 64), torch.zeros(nt, 64)
            kernels.apply_unit(units.ctypes.data, fp8, x.data_ptr(), 128, nt, 0.5, a.data_ptr(), False)
            kernels.apply_unit(units.ctypes.data, fp8, x.data_ptr(), 128, nt, 0.5, b.data_ptr(), True)
            ref = 0.5 * (x.double() @ data.double().T)
            scale = 0.5 * (x.double().abs() @ data.double().abs().T)
            assert torch.allclose(a, b, rtol=1e-5, atol=1e-4), (fp8, nt)
            for got in (a, b):
                err = ((got.double() - ref).abs() / scale).max().item()
                assert err <= 1e-6, (isa, fp8, nt, err)


@pytest.mark.parametrize("isa", cpu.ISAS)
def test_widened_fp8_units_equal_the_scalar_widening_and_the_units_bits(isa):
    """Prefill widens an FP8 unit once into BF16 scratch: all 256 codes (NaNs included)
    widen to the scalar twin's BF16 bit for bit, and the widened unit gives the FP8
    unit's bits through the body (what keeps prefill and decode identical)."""
    import numpy as np
    from test_experts_int4 import aligned, apply
    kernels = kernels_or_skip(isa)
    codes = (torch.arange(64 * 128) * 37 % 256).to(torch.uint8).view(64, 128)
    units = unit_of_codes(codes)
    wide, ref = aligned(kernels.WIDE_BYTES), aligned(kernels.WIDE_BYTES)
    wfmt = kernels.widen_unit(units.ctypes.data, 1, wide.ctypes.data, False)
    if wfmt < 0:
        pytest.skip(f"{isa} does not widen units (no prefill scratch)")
    kernels.widen_unit(units.ctypes.data, 1, ref.ctypes.data, True)
    assert np.array_equal(wide[:16384], ref[:16384])
    finite = codes.clone()
    finite[(codes & 0x7F) == 0x7F] = 0
    units = unit_of_codes(finite)
    kernels.widen_unit(units.ctypes.data, 1, wide.ctypes.data, False)
    kernels.widen_unit(units.ctypes.data, 1, ref.ctypes.data, True)
    assert np.array_equal(wide[:16384], ref[:16384])    # without NaN: AVX2 widens by bytes
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(5)).bfloat16()
    for nt in (1, 2, 4):
        assert torch.equal(apply(kernels, units.ctypes.data, 1, x[:nt], False),
                           apply(kernels, wide.ctypes.data, wfmt, x[:nt], False)), nt


@pytest.mark.parametrize("isa", cpu.ISAS)
def test_fp8_body_bits_hold_where_its_fast_decoding_steps_aside(isa):
    """The AVX2 FP8 body decodes codes by shifts, with x scaled by 2^112; it leaves a
    unit to the F16C body when some |x| >= 2^16 (or x is not finite), when the unit
    holds a NaN code, or when denormal inputs are flushed (DAZ). Each case, at 1..4
    tokens, gives the widened unit's bits (the other path to the same sums), NaN
    codes poison exactly their rows, and no case writes twice."""
    import numpy as np
    from test_experts_int4 import aligned, apply
    kernels = kernels_or_skip(isa)
    g = torch.Generator().manual_seed(11)
    codes = (torch.arange(64 * 128) * 37 % 256).to(torch.uint8).view(64, 128)
    codes[(codes & 0x7F) == 0x7F] = 0x3C
    units = unit_of_codes(codes)
    wide = aligned(kernels.WIDE_BYTES)
    wfmt = kernels.widen_unit(units.ctypes.data, 1, wide.ctypes.data, False)
    if wfmt < 0:
        pytest.skip(f"{isa} does not widen units (no prefill scratch)")
    ref64 = codes.view(torch.float8_e4m3fn).double()
    for big in (None, 70000.0, 65536.0, 65280.0, float("inf")):
        for nt in (1, 2, 3, 4):
            x = torch.randn(nt, 128, generator=g).bfloat16()
            if big is not None:
                x[nt - 1, 17] = big
            got = apply(kernels, units.ctypes.data, 1, x, False)
            assert torch.equal(got, apply(kernels, wide.ctypes.data, wfmt, x, False)), (big, nt)
            if big is None or big < float("inf"):
                ref = x.double() @ ref64.T
                err = ((got.double() - ref).abs() / (x.double().abs() @ ref64.abs().T)).max()
                assert err <= 1e-6, (big, nt, err.item())
    nan_codes = codes.clone()
    nan_codes[5, 9], nan_codes[40, 127] = 0x7F, 0xFF
    nan_units = unit_of_codes(nan_codes)
    for nt in (1, 2, 3, 4):
        x = torch.randn(nt, 128, generator=g).bfloat16()
        got = apply(kernels, nan_units.ctypes.data, 1, x, False)
        assert (torch.isnan(got).any(dim=0).nonzero().flatten().tolist() == [5, 40]), nt
        finite = [r for r in range(64) if r not in (5, 40)]
        assert torch.equal(got[:, finite], apply(kernels, wide.ctypes.data, wfmt, x, False)[:, finite])
    x = torch.randn(4, 128, generator=g).bfloat16()
    want = [apply(kernels, units.ctypes.data, 1, x[:nt], False) for nt in (1, 2, 3, 4)]
    was = torch.set_flush_denormal(True)
    if not was:
        pytest.skip("this CPU cannot flush denormals")
    try:
        got = [apply(kernels, units.ctypes.data, 1, x[:nt], False) for nt in (1, 2, 3, 4)]
    finally:
        torch.set_flush_denormal(False)
    for nt, (a, b) in enumerate(zip(got, want), 1):
        assert torch.equal(a, b), nt
    assert np.isfinite(want[0].numpy()).all()
