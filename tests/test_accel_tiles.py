"""tiles.linear, the device linear under the precision contract, against a float64
evaluation of the contract (BF16 inputs, exact weights): FP8 with partial edge blocks
and BF16, 1 to 300 rows. Bound: FP32 sums of exact products; a BF16 GEMM over K terms,
or per k block bi terms, the scale product and KB block sums, err <= (K + KB + 2) 2^-24
sum |h w| (a worst case: measured within 1.5% of it). On CUDA (skipped without
a device): the CPU twin within the same bound."""
import pytest
import torch

from moed.backends.accel import tiles
from moed.model.formats import Weight, quantize_fp8

SHAPES = [(80, 192), (200, 333), (129, 127)]      # (O, K): none a multiple of 128


def weight(fmt, O, K, block=(128, 128), seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(O, K, generator=g) * K ** -0.5
    if fmt == "fp8":
        return Weight(*quantize_fp8(w, block), block)
    return Weight(w.bfloat16())


def rows(n, K, seed=1):
    return torch.randn(n, K, generator=torch.Generator().manual_seed(seed)).bfloat16()


def check(got, h, w):
    """got [n, O] against the float64 contract; -> max error over its bound."""
    exact = w.dequantize().double()
    want = h.double() @ exact.T
    terms = h.double().abs() @ exact.abs().T
    K, KB = exact.shape[1], -(-exact.shape[1] // (w.block or (1, exact.shape[1]))[1])
    bound = (K + KB + 2) * 2.0 ** -24 * terms
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert not torch.isnan(got).any()
    ratio = ((got.double() - want).abs() / bound.clamp(min=1e-30)).max().item()
    assert ratio <= 1, f"error {ratio:.2f}x the FP32 bound"
    return ratio


@pytest.mark.parametrize("fmt", ["fp8", "bf16"])
@pytest.mark.parametrize("O, K", SHAPES)
@pytest.mark.parametrize("n", [1, 7, 300])
def test_linear_is_the_contract(fmt, O, K, n):
    w, h = weight(fmt, O, K), rows(n, K)
    ratio = check(tiles.linear(h, w), h, w)
    print(f"{fmt} [{n}, {K}] x [{O}, {K}]^T: max error {ratio:.3f} of the FP32 bound")


@pytest.mark.parametrize("block", [(32, 64), (128, 32)])
def test_other_fp8_blocks(block):
    w, h = weight("fp8", 200, 333, block), rows(7, 333)
    check(tiles.linear(h, w), h, w)


def test_scales_apply_per_block():
    # a scale grid of distinct powers of two: a block scaled with a neighbour's scale, or
    # a block left out, is off by far more than rounding
    w = weight("fp8", 200, 333)
    grid = 2.0 ** torch.arange(w.scale_inv.numel(), dtype=torch.float32).view(w.scale_inv.shape)
    w = Weight(w.data, grid * 1e-3, w.block)
    h = rows(5, 333)
    check(tiles.linear(h, w), h, w)


def test_row_tiles_bound_the_temporary(monkeypatch):
    # TEMP_BYTES down to one row's partial products [KB, 1, O]: 300 tiles of one row
    w, h = weight("fp8", 80, 192), rows(300, 192)
    whole = tiles.linear(h, w)
    monkeypatch.setattr(tiles, "TEMP_BYTES", 4 * 2 * 80)
    tiled = tiles.linear(h, w)
    check(tiled, h, w)
    assert torch.allclose(tiled, whole, rtol=1e-5, atol=1e-6)


def test_cpu_twin_computes_in_float32():
    assert not tiles._has_out_dtype(torch.device("cpu"))


@pytest.mark.parametrize("fmt", ["fp8", "bf16"])
def test_cuda_matches_the_cpu_twin(fmt):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device here")
    cuda = torch.device("cuda")
    for O, K in SHAPES:
        w, h = weight(fmt, O, K), rows(37, K)
        got = tiles.linear(h.to(cuda), w.to(cuda)).cpu()
        check(got, h, w)
        check(tiles.linear(h, w), h, w)
        print(f"{fmt} {O}x{K}: out_dtype GEMMs {tiles._has_out_dtype(cuda)}, max |cuda - cpu| "
              f"{(got - tiles.linear(h, w)).abs().max():.2e}")
