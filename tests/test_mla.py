"""DeepSeek MLA's absorbed decode products with kv_b as stored (moed/backends/cpu/mla.py):
every ISA against float64 on the dequantized weight, FP8 (whole 128 x 128 blocks
per head, the DeepSeek-V3 layout and the AVX-512 fast path, and ragged dims that
straddle blocks) and BF16, batches that cover every register-block remainder,
strided inputs, and bad inputs.

Bound: FP32 sums of exact products (e4m3 x scale and BF16 are exact in FP32) in an
order other than float64's: relative max error <= 1e-5 of the output scale
(measured <= ~5e-7).
"""
import pytest
import torch

import moed.backends.cpu.isa as cpu
from moed.errors import InvalidRequestError
from moed.backends.cpu.mla import LatentAbsorb
from moed.model.formats import Weight, quantize_fp8

from isa_kernels import kernels_or_skip

REL_TOL = 1e-5
# (H, dn, dv, r): whole blocks per head (the fast path on AVX-512) and ragged dims
DIMS = [(3, 128, 128, 256), (2, 256, 128, 128), (3, 5, 7, 130), (2, 16, 16, 32)]


def kv_b(H, dn, dv, r, fmt, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(H * (dn + dv), r, generator=g) * r ** -0.5
    if fmt == "fp8":
        data, scale = quantize_fp8(w)
        return Weight(data, scale, (128, 128))
    return Weight(w.bfloat16())


def rel_err(got, ref):
    return ((got.double() - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("isa", cpu.ISAS)
@pytest.mark.parametrize("fmt", ["fp8", "bf16"])
def test_every_isa_matches_float64(isa, fmt):
    kernels = kernels_or_skip(isa)
    worst = 0.0
    for i, (H, dn, dv, r) in enumerate(DIMS):
        weight = kv_b(H, dn, dv, r, fmt, seed=i)
        w = weight.dequantize().double().view(H, dn + dv, r)
        absorb = LatentAbsorb(weight, H, dn, dv, r, threads=2, kernels=kernels)
        g = torch.Generator().manual_seed(100 + i)
        for B in (1, 2, 3, 4, 6):
            q = torch.randn(B, H, dn + 3, generator=g)[..., :dn]     # strided rows
            o = torch.randn(B, H, r, generator=g)
            e_q = rel_err(absorb.query(q), torch.einsum("bhn,hnr->bhr", q.double(), w[:, :dn]))
            e_o = rel_err(absorb.output(o), torch.einsum("bhr,hvr->bhv", o.double(), w[:, dn:]))
            assert e_q <= REL_TOL and e_o <= REL_TOL, (isa, fmt, H, dn, dv, r, B, e_q, e_o)
            worst = max(worst, e_q, e_o)
    print(f"{isa} {fmt}: worst relative error {worst:.1e} (<= {REL_TOL})")


def test_one_thread_equals_two_and_zero_decodes():
    weight = kv_b(3, 128, 128, 256, "fp8", seed=7)
    q = torch.randn(5, 3, 128)
    one = LatentAbsorb(weight, 3, 128, 128, 256, threads=1).query(q)
    two = LatentAbsorb(weight, 3, 128, 128, 256, threads=2).query(q)
    assert torch.equal(one, two)
    assert LatentAbsorb(weight, 3, 128, 128, 256).output(torch.empty(0, 3, 256)).shape == (0, 3, 128)


def test_bad_inputs_are_refused():
    weight = kv_b(2, 16, 16, 32, "fp8", seed=1)
    with pytest.raises(InvalidRequestError) as e:
        LatentAbsorb(weight, 3, 16, 16, 32)                  # shape does not fit
    assert e.value.field == "kv_b"
    with pytest.raises(InvalidRequestError):
        LatentAbsorb(Weight(torch.randn(64, 32)), 2, 16, 16, 32)   # float32: not a checkpoint format
    with pytest.raises(InvalidRequestError):
        LatentAbsorb(Weight(weight.data, weight.scale_inv, (64, 64)), 2, 16, 16, 32)
    with pytest.raises(InvalidRequestError):
        LatentAbsorb(Weight(torch.zeros(2 * 32, 5000, dtype=torch.bfloat16)), 2, 16, 16, 5000).query(
            torch.zeros(1, 2, 16))                            # latent wider than the kernel takes
    absorb = LatentAbsorb(weight, 2, 16, 16, 32)
    for bad in (torch.zeros(1, 2, 15), torch.zeros(1, 3, 16), torch.zeros(1, 2, 16).double(),
                torch.zeros(1, 16, 2).transpose(1, 2)):
        with pytest.raises(InvalidRequestError) as e:
            absorb.query(bad)
        assert e.value.field == "x"


@pytest.mark.parametrize("isa", cpu.ISAS)
def test_tiny_scales_and_large_activations_keep_precision(isa):
    # real kv_b blocks have scales near 2^-15: the widened products must stay clear of
    # FP32's denormals; scales near 1 with activations in the thousands must not overflow
    kernels = kernels_or_skip(isa)
    H, dn, dv, r = 2, 128, 128, 256
    g = torch.Generator().manual_seed(3)
    for w_mag, x_mag in ((1e-3, 1.0), (1e-3, 1e-3), (200.0, 3e3)):
        data, scale = quantize_fp8(torch.randn(H * (dn + dv), r, generator=g) * w_mag)
        weight = Weight(data, scale, (128, 128))
        w = weight.dequantize().double().view(H, dn + dv, r)
        absorb = LatentAbsorb(weight, H, dn, dv, r, threads=2, kernels=kernels)
        q, o = x_mag * torch.randn(2, H, dn, generator=g), x_mag * torch.randn(2, H, r, generator=g)
        e_q = rel_err(absorb.query(q), torch.einsum("bhn,hnr->bhr", q.double(), w[:, :dn]))
        e_o = rel_err(absorb.output(o), torch.einsum("bhr,hvr->bhv", o.double(), w[:, dn:]))
        assert e_q <= REL_TOL and e_o <= REL_TOL, (isa, w_mag, x_mag, e_q, e_o)
