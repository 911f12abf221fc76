"""FP8 block-scale dequantization is exact, including partial edge blocks."""
import pytest
import torch

from moed.errors import CheckpointError
from moed.model.formats import QuantConfig, Weight, block_grid, dequantize_fp8, quantize_fp8


@pytest.mark.parametrize("shape", [(128, 128), (200, 136), (7, 300), (257, 129)])
def test_dequantize_matches_per_element_definition(shape):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=g) * 3
    data, scale = quantize_fp8(w)
    assert data.dtype == torch.float8_e4m3fn
    assert tuple(scale.shape) == block_grid(shape, (128, 128))
    deq = dequantize_fp8(data, scale, (128, 128))
    # definition: element (i, j) times the scale of block (i // 128, j // 128)
    rows = torch.arange(shape[0])[:, None] // 128
    cols = torch.arange(shape[1])[None, :] // 128
    assert torch.equal(deq, data.float() * scale[rows, cols])
    # e4m3 has 3 mantissa bits: relative rounding error <= 2^-4 of the block's scale range
    assert (deq - w).abs().max() <= (scale[rows, cols] * 448 * 2 ** -4).max()


def test_weight_dequantize_plain_is_exact_upcast():
    w = torch.randn(5, 7).to(torch.bfloat16)
    assert torch.equal(Weight(w).dequantize(), w.float())


def test_quant_config_reads_published_fields():
    q = QuantConfig.from_hf({"quantization_config": {
        "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
        "weight_block_size": [128, 128]}})
    assert q.block_size == (128, 128)
    assert QuantConfig.from_hf({}) is None


@pytest.mark.parametrize("qc,culprit", [
    ({"quant_method": "awq"}, "quant_method"),
    ({"quant_method": "fp8", "weight_block_size": [128]}, "weight_block_size"),
    ({"quant_method": "fp8", "fmt": "e5m2", "weight_block_size": [128, 128]}, "fmt"),
])
def test_unsupported_quantization_names_the_field(qc, culprit):
    with pytest.raises(CheckpointError, match=culprit):
        QuantConfig.from_hf({"quantization_config": qc})
