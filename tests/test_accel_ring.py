"""The ring's bookkeeping with plain ints, and an expert's byte block: packing and
viewing it gives back the stored tensors exactly (FP8 bytes, scales, BF16)."""
import pytest
import torch

from accel_protocol import expert_layer
from moed.backends.accel.cpu_device import CPUDevice
from moed.backends.accel.ring import (ALIGN, ExpertRing, choose_ring_length, layer_layout,
                                     pack_host)
from moed.backends.accel.streamed_experts import plan_chunk
from moed.errors import ConfigError


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


# choose_ring_length with plain numbers: a DeepSeek-V3-shaped FP8 expert (44 MB, 6 D I
# = 88 MFLOP a token) over 25 GB/s at 400 TFLOP/s: a copy (1.8 ms) takes as long as
# 8,000 tokens' GEMMs
NBYTES, FLOPS_TOKEN, E_DSV3 = 44_000_000, 88_080_384, 256
PCIE, GPU, FREE = 25e9, 400e12, 80_000_000_000


def ring_length(tokens=64, bps=PCIE, flops=GPU, free=FREE, E=E_DSV3, nbytes=NBYTES):
    return choose_ring_length(E, nbytes, tokens, bps, flops, FLOPS_TOKEN, free)


def test_ring_length_limits():
    assert ring_length(tokens=0) == E_DSV3               # nothing to compute: transfer-bound
    assert ring_length(tokens=4096) == E_DSV3            # a copy outlasts its GEMMs
    assert ring_length(tokens=10**6) == 2                # GEMMs hide every copy: ping-pong
    assert ring_length(tokens=15_000) == 4               # rho = 0.53: 2 + floor(2.28)
    assert ring_length(tokens=0, E=4) == 4               # never more than the layer
    assert ring_length(tokens=0, free=10 * NBYTES + 1) == 10     # nor than memory holds
    assert ring_length(tokens=10**6, free=2 * NBYTES) == 2
    with pytest.raises(ConfigError) as info:
        ring_length(free=2 * NBYTES - 1)                 # not even 2 slots
    assert info.value.field == "ring_length" and "2 expert slots" in str(info.value)
    for bad in ({"bps": 0}, {"flops": -1.0}):
        with pytest.raises(ConfigError):
            ring_length(**bad)


def test_ring_length_is_monotonic():
    tokens = [0, 1, 1000, 8000, 8100, 9000, 10_000, 12_000, 16_000, 30_000, 10**5, 10**6]
    by_tokens = [ring_length(tokens=t) for t in tokens]
    assert by_tokens == sorted(by_tokens, reverse=True)  # more compute: fewer slots
    assert by_tokens[0] == E_DSV3 and by_tokens[-1] == 2 and 2 < by_tokens[6] < E_DSV3
    links = (1e9, 10e9, 20e9, 30e9, 60e9, 1e12)
    by_link = [ring_length(tokens=12_000, bps=b) for b in links]
    assert by_link == sorted(by_link, reverse=True)      # a faster link: fewer slots
    gpus = (1e12, 1e14, 3e14, 5e14, 1e15, 1e16)
    by_gpu = [ring_length(tokens=12_000, flops=f) for f in gpus]
    assert by_gpu == sorted(by_gpu)                      # a faster GPU: more slots
    assert by_link[0] == by_gpu[-1] == E_DSV3 and by_link[-1] == by_gpu[0] == 2
    by_free = [ring_length(tokens=0, free=n * NBYTES) for n in (2, 3, 50, 255, 256, 1000)]
    assert by_free == [2, 3, 50, 255, 256, 256]
    assert all(2 <= r <= E_DSV3 for r in by_tokens + by_link + by_gpu)
