"""StreamedExperts, the stream-loading expert ring, on the CPU device: its output is the
precision contract's (BF16 inputs to every linear, FP32 sums), judged like the CPU
kernels against a float64 reference and within 2x their error, FP8 and BF16, ragged
token distributions, rings of 2, 3 and a whole layer; the same chunk gives the same
bits every time and with any ring length; its pipeline protocol, asserted from the
device's event log under a bandwidth cap; the ring length chosen automatically; clear
errors for bad arguments. On CUDA (skipped without a device): the CPU twin within the
contract.

Not asserted: bit-equal rows across chunk splits. The CPU twin's FP32 GEMMs (torch's
CPU matmul, MKL) round a row differently with the number of rows next to it (measured
here below 12 rows a GEMM), so a row's bits depend on how many tokens its expert got
in the chunk; chunk splits are judged within the contract instead.
"""
import threading
import time

import pytest
import torch

from accel_protocol import check_protocol, expert_layer, intervals, overlaps
from test_experts import MAX_TOL, TOL, reference
from moed.backends.accel.cpu_device import CPUDevice
from moed.backends.accel.ring import RingBudget
from moed.backends.accel.streamed_experts import StreamedExperts
from moed.backends.cpu.experts import CPUExpertLayer
from moed.errors import ConfigError, InvalidRequestError
from moed.model.checkpoint import Checkpoint
from moed.model.registry import load_model

E, D, K = 8, 192, 3
FLOOR = 2.0 ** -12     # of |ref|, under 2x the kernels' error (BF16 inputs: ~2^-9 of |ref|)


@pytest.fixture
def device():
    d = CPUDevice()
    yield d
    d.close()


def routing(T, k=K, E=E, skew=False, unused=(), seed=1):
    """x [T, D], topk_ids [T, k] (distinct per row), topk_weights [T, k]; skew: most
    tokens on expert 0, a long tail; unused: experts no token picks."""
    g = torch.Generator().manual_seed(seed)
    pool = [e for e in range(E) if e not in unused]
    p = torch.tensor([8.0 if (skew and e == pool[0]) else 1.0 for e in pool])
    ids = torch.stack([torch.tensor(pool)[torch.multinomial(p, k, generator=g)] for _ in range(T)])
    return torch.randn(T, D, generator=g), ids, torch.rand(T, k, generator=g)


class Contract:
    """Judges a path's output for a layer (TorchExperts) as tests/test_experts.py judges
    the CPU kernels: against the float64 reference on the exact weights, its mean and
    max error at most 2x the kernels' own (CPUExpertLayer, same weights, same input)
    plus FLOOR of |ref|, and within test_experts' bounds."""

    def __init__(self, ref):
        self.cpu = CPUExpertLayer.from_weights(ref.gate, ref.up, ref.down)
        self.exact = [torch.stack([w.dequantize() for w in ws])      # [E, out, in] each
                      for ws in (ref.gate, ref.up, ref.down)]

    def check(self, got, x, ids, w, kernel=None):
        """kernel: the output to measure against (default: the CPU kernels')."""
        want = reference(self.exact, x, ids, w)                        # [T, D] float64
        kernel = self.cpu.forward(x, ids, w) if kernel is None else kernel
        assert got.dtype == torch.float32 and got.shape == want.shape
        err, base = (got.double() - want).abs(), (kernel.double() - want).abs()
        mean, peak = want.abs().mean(), want.abs().max()
        print(f"T={len(x)}: mean error {err.mean() / mean:.2e} of |ref| (kernel "
              f"{base.mean() / mean:.2e}), max {err.max() / peak:.2e} "
              f"(kernel {base.max() / peak:.2e})")
        assert err.mean() <= 2 * base.mean() + FLOOR * mean and err.mean() <= TOL * mean
        assert err.max() <= 2 * base.max() + FLOOR * peak and err.max() <= MAX_TOL * peak


def chunks():
    """Ragged chunks: 1, 5, 37 (one hot expert, a tail, 2 idle) and 130 tokens, each
    with an expert no token picks."""
    return [routing(1, seed=2), routing(5, seed=3, unused=(4,)),
            routing(37, skew=True, unused=(2, 5)), routing(130, seed=4, unused=(7,))]


@pytest.mark.parametrize("fmt", ["fp8", "bf16"])
@pytest.mark.parametrize("ring_length", [2, 3, E])
def test_within_the_contract_of_the_cpu_kernels(device, fmt, ring_length):
    ref = expert_layer(fmt, E=E, D=D)
    contract = Contract(ref)
    streamed = StreamedExperts.from_reference(ref, device, ring_length)
    cases = chunks()
    for x, ids, w in cases:
        contract.check(streamed.forward(x, ids, w), x, ids, w)
    assert streamed.chunks == len(cases)


@pytest.mark.parametrize("fmt", ["fp8", "bf16"])
def test_the_same_chunk_gives_the_same_bits(device, fmt):
    # twice on one ring, and on rings of 2, 3 and E: the slot an expert sits in
    # changes nothing of its arithmetic
    ref = expert_layer(fmt, E=E, D=D)
    rings = [StreamedExperts.from_reference(ref, device, R) for R in (2, 3, E)]
    for x, ids, w in chunks():
        first = rings[0].forward(x, ids, w)
        assert torch.equal(rings[0].forward(x, ids, w), first)
        assert all(torch.equal(s.forward(x, ids, w), first) for s in rings[1:])


@pytest.mark.parametrize("fmt", ["fp8", "bf16"])
def test_chunk_splits_agree_within_the_contract(device, fmt):
    # the same 130 tokens in chunks of 1, 5, 37 and 130; the CPU kernels give the same
    # rows for every split (batch-invariant), this twin within the contract
    ref = expert_layer(fmt, E=E, D=D)
    contract = Contract(ref)
    streamed = StreamedExperts.from_reference(ref, device, 3)
    x, ids, w = routing(130, skew=True, unused=(2,), seed=9)
    whole = streamed.forward(x, ids, w)
    kernel = contract.cpu.forward(x, ids, w)
    for size in (1, 5, 37):
        parts = [slice(i, i + size) for i in range(0, len(x), size)]
        split = torch.cat([streamed.forward(x[p], ids[p], w[p]) for p in parts])
        assert torch.equal(torch.cat([contract.cpu.forward(x[p], ids[p], w[p]) for p in parts]),
                           kernel)
        same = int((split == whole).all(dim=1).sum())
        print(f"chunks of {size}: {same}/{len(x)} rows bit-equal to one chunk's")
        contract.check(split, x, ids, w, kernel)


def test_no_tokens_gives_zeros(device):
    streamed = StreamedExperts.from_reference(expert_layer("bf16"), device, 2)
    out = streamed.forward(torch.randn(0, D), torch.zeros(0, K, dtype=torch.int64), torch.zeros(0, K))
    assert out.shape == (0, D)
    assert device.entries("copy_start") == []


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
def test_stands_in_for_a_tiny_models_experts(tiny_model_dir, arch):
    model = load_model(Checkpoint(tiny_model_dir(arch, "fp8")), torch.device("cpu"))
    moe = [layer.mlp for layer in model.layers if hasattr(layer.mlp, "experts")]
    assert moe
    with CPUDevice() as device:
        for i, mlp in enumerate(moe):
            ref = mlp.experts
            x = torch.randn(29, ref.gate[0].shape[1], generator=torch.Generator().manual_seed(i))
            ids, w = mlp.router(x)                  # the layer's own routing
            streamed = StreamedExperts.from_reference(ref, device, 3)
            contract = Contract(ref)
            assert ref.gate[0].is_fp8
            routed = streamed.forward(x, ids, w)
            contract.check(routed, x, ids, w)
            mlp.experts = contract.cpu
            want = mlp(x)
            mlp.experts = streamed                  # the layer's interface, swapped in
            got = mlp(x)
            mlp.experts = ref
            # the layer adds the same shared part to either routed output
            diff = routed - contract.cpu.forward(x, ids, w)
            assert torch.allclose(got - want, diff, atol=1e-6 * want.abs().max())


@pytest.mark.parametrize("ring_length", [2, 3, E])
def test_protocol_from_the_event_log(ring_length):
    # 46 KB experts at 20 MB/s: ~2.3 ms a copy, as long as a PCIe copy of a real expert
    # is next to its GEMMs
    with CPUDevice(bandwidth=20e6) as device:
        ref = expert_layer("fp8", E=E, D=D)
        contract = Contract(ref)
        streamed = StreamedExperts.from_reference(ref, device, ring_length)
        chunks = [routing(40, skew=True, unused=(1, 6)), routing(24, seed=4, unused=(0,))]
        for x, ids, w in chunks:
            contract.check(streamed.forward(x, ids, w), x, ids, w)
        for chunk, (_, ids, _) in enumerate(chunks):
            copies, launches = check_protocol(device.log, chunk, ids, ring_length, E)
            unused = set(range(E)) - set(ids.reshape(-1).tolist())
            assert unused and not unused & {c.tag["expert"] for c in copies.values()}
            copy_spans = intervals(device.log, chunk, "copy_start", "copy_end")
            compute_spans = intervals(device.log, chunk, "launch_start", "launch_end")
            assert all(b - a >= streamed.ring.layout.nbytes / 20e6 for a, b in copy_spans.values())
            both = overlaps(copy_spans, compute_spans)
            print(f"ring {ring_length} chunk {chunk}: {len(copies)} experts copied, "
                  f"{len(both)} copy/compute overlaps")
            assert both, "copies and compute never overlapped in time"


def test_tight_ring_makes_the_loader_wait_for_done():
    # compute slower than copies: with 2 slots the loader must block on done[s]
    with CPUDevice() as device:
        ref = expert_layer("bf16", E=E, D=D)
        streamed = StreamedExperts.from_reference(ref, device, 2)
        slow = streamed.expert
        streamed.expert = lambda *a: (time.sleep(0.003), slow(*a))
        x, ids, w = routing(32, seed=5)
        Contract(ref).check(streamed.forward(x, ids, w), x, ids, w)
        check_protocol(device.log, 0, ids, 2, E)
        waits = [e for e in device.entries(stream="loader") if e.kind == "wait_end"]
        assert all(e.event.startswith("done") for e in waits)
        blocked = [b.time - a.time for a, b in zip(device.entries("wait_start", "loader"), waits)]
        assert max(blocked) >= 0.001               # it did wait for a compute to finish


def test_the_protocol_check_catches_a_ring_that_skips_done():
    # the same pipeline with the loader's done-wait removed, and the first expert's
    # compute held back 50 ms: the loader refills its slot before it has run
    with CPUDevice() as device:
        ref = expert_layer("bf16", E=E, D=D)
        streamed = StreamedExperts.from_reference(ref, device, 2)
        streamed.loader.wait = lambda event: None           # never wait for done
        release = threading.Timer(0.05, lambda: None)
        release.start()
        slow = streamed.expert
        streamed.expert = lambda *a: (release.join(), slow(*a))
        x, ids, w = routing(32, seed=6)
        streamed.forward(x, ids, w)
        with pytest.raises(AssertionError, match="before"):
            check_protocol(device.log, 0, ids, 2, E)


@pytest.mark.parametrize("ring_length", [1, 0, -2, E + 1, 2.0, True, "3"])
def test_bad_ring_length(device, ring_length):
    with pytest.raises(ConfigError) as info:
        StreamedExperts.from_reference(expert_layer("bf16"), device, ring_length)
    assert info.value.field == "ring_length"
    assert "ring_length" in str(info.value)


def test_auto_ring_length(device):
    ref = expert_layer("fp8", E=E, D=D)
    contract = Contract(ref)
    nbytes = StreamedExperts.from_reference(ref, device, 2).ring.layout.nbytes
    plenty = 100 * nbytes
    # transfer-bound (slow link): a whole layer; compute-bound (slow GEMMs): ping-pong;
    # a whole layer that does not fit: what fits
    slow_link = RingBudget(16, h2d_bps=1e3, gpu_flops=1e15, free_bytes=plenty)
    slow_gemm = RingBudget(16, h2d_bps=1e12, gpu_flops=1e3, free_bytes=plenty)
    tight = RingBudget(16, h2d_bps=1e3, gpu_flops=1e15, free_bytes=5 * nbytes + 1)
    x, ids, w = routing(37, skew=True, unused=(2, 5))
    for budget, want in ((slow_link, E), (slow_gemm, 2), (tight, 5)):
        with CPUDevice() as dev:
            streamed = StreamedExperts.from_reference(ref, dev, "auto", budget)
            assert streamed.ring.length == want
            contract.check(streamed.forward(x, ids, w), x, ids, w)
            check_protocol(dev.log, 0, ids, want, E)
    with pytest.raises(ConfigError) as info:
        StreamedExperts.from_reference(ref, device, "auto")
    assert info.value.field == "ring_length" and "RingBudget" in str(info.value)


@pytest.mark.parametrize("bad, field", [(-1, "topk_ids"), (E, "topk_ids")])
def test_ids_out_of_range(device, bad, field):
    streamed = StreamedExperts.from_reference(expert_layer("bf16"), device, 2)
    x, ids, w = routing(5)
    ids[3, 1] = bad
    with pytest.raises(InvalidRequestError) as info:
        streamed.forward(x, ids, w)
    assert info.value.field == field and f"topk_ids[3, 1] = {bad}" in str(info.value)
    assert device.entries("copy_start") == []          # refused before any copy


def test_bad_shapes(device):
    streamed = StreamedExperts.from_reference(expert_layer("bf16"), device, 2)
    x, ids, w = routing(5)
    for args, field in (((x[:, :10], ids, w), "x"), ((x, ids[:4], w[:4]), "topk_ids"),
                        ((x, ids, w[:, :2]), "topk_weights")):
        with pytest.raises(InvalidRequestError) as info:
            streamed.forward(*args)
        assert info.value.field == field


def test_mixed_expert_layouts_refused(device):
    fp8, bf16 = expert_layer("fp8"), expert_layer("bf16")
    with pytest.raises(ConfigError) as info:
        StreamedExperts(fp8.gate[:4] + bf16.gate[4:], fp8.up, fp8.down, device, 2)
    assert info.value.field == "experts" and "expert 4" in str(info.value)


@pytest.mark.parametrize("fmt", ["fp8", "bf16"])
def test_cuda_matches_the_cpu_twin(device, fmt):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device here")
    from moed.backends.accel.cuda_device import CUDADevice
    ref = expert_layer(fmt, E=E, D=D)
    contract = Contract(ref)
    streamed = StreamedExperts.from_reference(ref, CUDADevice(), 3)
    twin = StreamedExperts.from_reference(ref, device, 3)
    assert streamed.host.is_pinned() and streamed.ring.slots.is_cuda
    for x, ids, w in chunks():
        got = streamed.forward(x.cuda(), ids.cuda(), w.cuda()).cpu()
        contract.check(got, x, ids, w, kernel=twin.forward(x, ids, w))
        contract.check(got, x, ids, w)


def test_layers_share_one_ring_and_refill_a_slot_only_after_the_last_layers_done():
    with CPUDevice(bandwidth=20e6) as device:
        a_ref, b_ref = expert_layer("fp8", E=E, D=D, seed=0), expert_layer("fp8", E=E, D=D, seed=1)
        a = StreamedExperts.from_reference(a_ref, device, ring_length=2)
        b = StreamedExperts.from_reference(b_ref, device, share=a)
        a.layer, b.layer = 0, 1
        assert b.ring is a.ring and b.loader is a.loader
        x, ids, w = routing(30, seed=5)
        Contract(a_ref).check(a.forward(x, ids, w), x, ids, w)
        Contract(b_ref).check(b.forward(x, ids, w), x, ids, w)
        for layer in (0, 1):
            mine = [e for e in device.log if e.tag.get("layer", layer) == layer]
            check_protocol(mine, 0, ids, 2, E)
        # layer 1's first copy into each slot follows layer 0's last done on it
        for s in range(2):
            done_a = max(e.seq for e in device.log if e.kind == "record" and
                         e.event == f"done[{s}]" and e.tag.get("layer") == 0)
            copy_b = min(e.seq for e in device.log if e.kind == "copy_start" and
                         e.tag.get("layer") == 1 and e.tag["slot"] == s)
            assert done_a < copy_b, f"slot {s} refilled for layer 1 before layer 0's done"
    with CPUDevice() as other, pytest.raises(ConfigError):
        StreamedExperts.from_reference(expert_layer("bf16", E=E, D=D), other, share=a)


@pytest.mark.parametrize("ring_length", [2, 3, E])
def test_bounce_staging_gives_the_pinned_bits_and_keeps_the_protocol(ring_length):
    """Experts packed into a few shared host blocks just before each copy (no copy of
    the layer in host memory): the same bytes reach the ring, so the output is the
    pinned staging's bit for bit; no block is repacked before its copy has read it."""
    x, ids, w = routing(40, skew=True, unused=(1, 6))
    with CPUDevice() as device:
        ref = expert_layer("fp8", E=E, D=D)
        want = StreamedExperts.from_reference(ref, device, ring_length).forward(x, ids, w)
    with CPUDevice(bandwidth=20e6) as device:
        streamed = StreamedExperts.from_reference(ref, device, ring_length, staging="bounce")
        assert streamed.host is None and len(streamed.bounce.sent) < E
        assert torch.equal(streamed.forward(x, ids, w), want)
        check_protocol(device.log, 0, ids, ring_length, E)
        # block b is repacked for load j only after load j - count's copy ended
        count = len(streamed.bounce.sent)
        copies = sorted((e for e in device.log if e.kind == "copy_end"), key=lambda e: e.seq)
        sent = [e for e in device.log if e.kind == "record" and e.event.startswith("sent")]
        assert len(sent) == len(copies)
        for j in range(count, len(copies)):
            assert sent[j - count].seq < copies[j].seq
    with CPUDevice() as device, pytest.raises(ConfigError):
        StreamedExperts.from_reference(ref, device, staging="paged")
