"""The ring's bookkeeping with plain ints, and an expert's byte block: packing and
viewing it gives back the stored tensors exactly (FP8 bytes, scales, BF16)."""
import pytest
import torch

from accel_protocol import expert_layer
from moed.backends.accel.cpu_device import CPUDevice
from moed.backends.accel.ring import ALIGN, ExpertRing, layer_layout, pack_host
from moed.backends.accel.streamed_experts import plan_chunk


@pytest.mark.parametrize("fmt", ["fp8", "bf16"])
def test_pack_and_view_round_trip_exactly(fmt):
    ref = expert_layer(fmt, E=4)
    layout = layer_layout(ref.gate, ref.up, ref.down)
    assert all(f.offset % ALIGN == 0 for f in layout.fields)
    assert len(layout.fields) == (6 if fmt == "fp8" else 3)
    host = pack_host(CPUDevice(), layout, ref.gate, ref.up, ref.down)     # [E, N] uint8
    assert host.shape == (4, layout.nbytes) and host.dtype == torch.uint8
    for e in range(4):
        for got, want in zip(layout.weights(host[e]), (ref.gate[e], ref.up[e], ref.down[e])):
            assert got.data.dtype == want.data.dtype and got.block == want.block
            assert torch.equal(got.data.view(torch.uint8) if fmt == "fp8" else got.data,
                               want.data.view(torch.uint8) if fmt == "fp8" else want.data)
            assert torch.equal(got.dequantize(), want.dequantize())


def test_fp8_crosses_as_fp8():
    ref = expert_layer("fp8", E=2, D=192, I=80)
    layout = layer_layout(ref.gate, ref.up, ref.down)
    weight_bytes = 3 * 192 * 80                        # one byte per FP8 weight
    scale_bytes = 4 * (2 * 1 * 2 + 2 * 1)              # [1, 2] x2 and [2, 1] float32 scales
    assert weight_bytes + scale_bytes <= layout.nbytes < weight_bytes + scale_bytes + 6 * ALIGN


def test_slots_and_reuse_with_plain_ints():
    ref = expert_layer("bf16", E=4)
    ring = ExpertRing(CPUDevice(), layer_layout(ref.gate, ref.up, ref.down), 3)
    assert [ring.slot(i) for i in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    assert [e.name for e in ring.ready] == ["ready[0]", "ready[1]", "ready[2]"]
    assert ring.slots.shape == (3, ring.layout.nbytes)


def test_plan_groups_as_the_reference_does():
    ids = torch.tensor([[3, 1], [1, 0], [3, 1]])
    plan = plan_chunk(ids)
    assert plan.experts == [0, 1, 3] and plan.counts == [1, 3, 2]
    assert plan.starts == [0, 1, 4]
    assert plan.pairs(1).tolist() == [1, 2, 5]          # flat (token, j): stable order
    assert plan.pairs(2).tolist() == [0, 4]
