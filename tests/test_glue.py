"""q/k norm + rotary on the compiled kernels (moed.backends.cpu.glue): every ISA against
the torch path it replaces, on ragged shapes and strided inputs; bad arguments; the
attention layer's joint path with and without the kernel."""
import pytest
import torch

import moed.backends.cpu.isa as cpu
from moed.errors import InvalidRequestError
from moed.backends.cpu.glue import norm_rope
from moed.model.layers import RMSNorm, Rotary
from moed.model.model_config import RopeConfig

from isa_kernels import kernels_or_skip


def torch_path(qk, rotary, cos_sin, weight, eps):
    if weight is not None:
        qk = RMSNorm(torch.ones(qk.shape[-1]), eps).normalize(qk) * weight
    return rotary(qk, *cos_sin)


@pytest.mark.parametrize("isa", cpu.ISAS)
@pytest.mark.parametrize("N,R,d", [(1, 36, 128), (3, 5, 24), (300, 6, 48), (17, 3, 2)])
@pytest.mark.parametrize("norm", [True, False])
def test_every_isa_matches_the_torch_path(isa, N, R, d, norm):
    kernels = kernels_or_skip(isa)
    torch.manual_seed(N + R + d)
    rotary = Rotary(RopeConfig("yarn", 10000.0, d, {"factor": 4.0,
                                                    "original_max_position_embeddings": 64},
                               4096))
    wide = torch.randn(N, R * d + 40) * 3                      # q/k as a column view
    qk = wide[:, 8:8 + R * d].view(N, R, d)
    weight = torch.rand(R, d) + 0.5 if norm else None
    cos_sin = rotary.cos_sin(torch.arange(100, 100 + N))
    want = torch_path(qk, rotary, cos_sin, weight, 1e-6)
    before = wide.clone()
    got = norm_rope(qk, *rotary.halves(cos_sin), weight, 1e-6, threads=2, kernels=kernels)
    assert torch.equal(wide, before)                            # the input is only read
    err = (got - want).abs().max().item()
    print(f"{isa} N={N} R={R} d={d} norm={norm}: max abs {err:.1e}")
    assert got.shape == (N, R, d) and err <= 1e-5 * max(1.0, want.abs().max().item())


def test_bad_arguments_name_the_field():
    qk, c = torch.randn(2, 3, 8), torch.randn(2, 4)
    with pytest.raises(InvalidRequestError) as e:
        norm_rope(qk.double(), c, c)
    assert e.value.field == "qk"
    with pytest.raises(InvalidRequestError) as e:
        norm_rope(torch.randn(2, 3, 7), c, c)
    assert e.value.field == "qk"
    with pytest.raises(InvalidRequestError) as e:
        norm_rope(qk, c, torch.randn(2, 3))
    assert e.value.field == "sin"
    with pytest.raises(InvalidRequestError) as e:
        norm_rope(qk, c, c, torch.randn(3, 4))
    assert e.value.field == "weight"
    assert norm_rope(torch.randn(0, 3, 8), torch.randn(0, 4), torch.randn(0, 4)).shape == (0, 3, 8)


def tiny_attention(qk_norm, fused):
    """GQA with H * d a multiple of 128, so the fused projection holds k right after q."""
    from moed.backends.cpu.gqa import CPUGQAOps
    from moed.backends.cpu.isa import load_kernels
    from moed.backends.cpu.linears import CPUFusedLinear, CPULinear
    from moed.backends.cpu.runtime import default_threads
    from moed.backends.cpu.dense_store import concat_rows, pack_weight
    from moed.model.attention import GQAttention
    from moed.model.formats import Weight
    from moed.model.layers import Linear
    g = torch.Generator().manual_seed(1)
    H, Hkv, d, D = 4, 2, 32, 96
    ws = [Weight(torch.randn(r, D, generator=g).bfloat16(), None, None)
          for r in (H * d, Hkv * d, Hkv * d)]
    norms = (RMSNorm(torch.rand(d, generator=g) + 0.5, 1e-6),
             RMSNorm(torch.rand(d, generator=g) + 0.5, 1e-6)) if qk_norm else (None, None)
    rotary = Rotary(RopeConfig("default", 10000.0, d, {}, 4096))
    attn = GQAttention(*[CPULinear(w) for w in ws], None, rotary, H, Hkv, d, *norms)
    if fused:
        qkv = CPUFusedLinear.over(pack_weight(concat_rows(ws, "qkv"), "qkv"),
                                  [Linear(w) for w in ws], None, None)
        attn.ops = CPUGQAOps(attn, load_kernels(), default_threads(), qkv)
        attn.ops.rope = None                # q and k normed as one by torch
    return attn, torch.randn(300, D, generator=g), rotary.cos_sin(torch.arange(300))


@pytest.mark.parametrize("qk_norm", [True, False])
def test_joint_q_k_norm_and_rotary_equal_the_separate_path(qk_norm):
    plain, x, cos_sin = tiny_attention(qk_norm, fused=False)
    joint, _, _ = tiny_attention(qk_norm, fused=True)
    assert joint.ops.spans is not None                       # the joint path runs
    for got, want in zip(joint.ops.project(x, cos_sin), plain.ops.project(x, cos_sin)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)   # the same products


@pytest.mark.parametrize("qk_norm", [True, False])
def test_attention_joint_path_with_the_kernel_matches_torch(qk_norm):
    attn, x, cos_sin = tiny_attention(qk_norm, fused=True)
    want = attn.ops.project(x, cos_sin)
    calls = []
    attn.ops.rope = lambda *a: calls.append(1) or norm_rope(*a)
    got = attn.ops.project(x, cos_sin)
    assert calls                                                # the kernel ran
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("isa", cpu.ISAS)
@pytest.mark.parametrize("T,E,D,k,renorm", [(1, 128, 2048, 8, True), (37, 60, 200, 4, False),
                                            (5, 8, 33, 2, True), (300, 16, 64, 1, False)])
@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float32])
def test_softmax_router_matches_the_torch_router(isa, T, E, D, k, renorm, wdtype):
    from moed.backends.cpu.glue import CPUSoftmaxRouter
    from moed.model.formats import Weight
    from moed.model.layers import Linear
    from moed.model.moe import SoftmaxRouter
    kernels = kernels_or_skip(isa)
    g = torch.Generator().manual_seed(T + E)
    ref = SoftmaxRouter(Linear(Weight(torch.randn(E, D, generator=g).to(wdtype), None, None)),
                        k, renorm)
    fast = CPUSoftmaxRouter(ref, threads=2, kernels=kernels)
    assert fast.gate.weight.dtype == wdtype        # a BF16 router is read as BF16, exactly
    x = torch.randn(T, D, generator=g)
    (ids, wts), (rid, rwts) = fast(x), ref(x)
    assert ids.dtype == torch.int64 and torch.equal(ids, rid)     # no near-ties at this seed
    # FP32 logits of ~50 in another summation order differ by a few ulp; softmax turns
    # that into a relative weight error of up to ~5e-5
    torch.testing.assert_close(wts, rwts, rtol=2e-4, atol=1e-6)


def test_softmax_router_keeps_ids_valid_on_nan_input():
    from moed.backends.cpu.glue import CPUSoftmaxRouter
    from moed.model.formats import Weight
    from moed.model.layers import Linear
    from moed.model.moe import SoftmaxRouter
    fast = CPUSoftmaxRouter(SoftmaxRouter(Linear(Weight(torch.randn(8, 16), None, None)), 2, True))
    x = torch.randn(3, 16)
    x[1, 4] = float("nan")
    ids, wts = fast(x)
    assert ((ids >= 0) & (ids < 8)).all()                         # never out of range
    assert torch.isnan(wts[1]).all() and not torch.isnan(wts[[0, 2]]).any()
    with pytest.raises(InvalidRequestError):
        fast(torch.randn(3, 15))


@pytest.mark.parametrize("isa", cpu.ISAS)
@pytest.mark.parametrize("N,D", [(1, 2048), (3, 7), (130, 1000), (700, 96)])
@pytest.mark.parametrize("with_delta", [True, False])
def test_residual_add_and_norm_match_torch(isa, N, D, with_delta):
    from moed.backends.cpu.glue import CPURMSNorm
    kernels = kernels_or_skip(isa)
    g = torch.Generator().manual_seed(N + D)
    ref = RMSNorm(torch.rand(D, generator=g) + 0.5, 1e-5)
    fast = CPURMSNorm(ref, threads=2, kernels=kernels)
    wide = torch.randn(N, D + 5, generator=g) * 4                  # strided residual rows
    x = wide[:, 3:3 + D]
    delta = torch.randn(N, D, generator=g)
    want_x, want_h = ref.add(x.clone(), delta) if with_delta else (x.clone(), ref(x))
    before = wide.clone()                                            # taken before the call
    got_x, got_h = fast.add(x, delta) if with_delta else (x, fast(x))
    assert got_x.data_ptr() == x.data_ptr()                          # the stream, in place
    torch.testing.assert_close(got_x, want_x, rtol=0, atol=0)       # the add is exact
    torch.testing.assert_close(got_h, want_h, rtol=1e-5, atol=1e-5)
    # the columns beside the rows' view, on both sides, are left as they were
    assert torch.equal(wide[:, :3], before[:, :3])
    assert torch.equal(wide[:, 3 + D:], before[:, 3 + D:])
    assert got_h.is_contiguous()


def test_norm_falls_back_to_torch_off_its_shapes():
    from moed.backends.cpu.glue import CPURMSNorm
    ref = RMSNorm(torch.rand(16) + 0.5, 1e-6)
    fast = CPURMSNorm(ref)
    x3 = torch.randn(2, 3, 16)                                        # 3-D: the torch path
    torch.testing.assert_close(fast(x3), ref(x3))
    xd = torch.randn(4, 16, dtype=torch.float64)
    torch.testing.assert_close(fast(xd), ref(xd))
    x, d = torch.randn(4, 16), torch.randn(4, 16)
    s, h = fast.add(x, d.double())                                    # mixed dtypes: torch's
    torch.testing.assert_close(h, ref(x + d.double()))
    assert fast(torch.randn(0, 16)).shape == (0, 16)


@pytest.mark.parametrize("isa", cpu.ISAS)
def test_argmax_is_torch_argmax(isa):
    from moed.backends.cpu.glue import argmax
    kernels = kernels_or_skip(isa)
    g = torch.Generator().manual_seed(7)
    wide = torch.randn(6, 151936 + 9, generator=g)
    x = wide[:, :151936]                                              # strided rows
    x[1, 5] = x[1, 77] = x[1].max() + 1                               # a tie: the first wins
    x[2, 151935] = 1e9                                                # the tail past the lanes
    x[3, 100:] = float("-inf")
    x[4, 9] = x[4, 3] = float("nan")                                  # the first NaN wins
    x[5] = float("-inf")                                              # all -inf: 0
    got = argmax(x, kernels)
    assert got.tolist() == x.argmax(dim=-1).tolist()
    assert got.tolist()[1:3] == [5, 151935] and got[4] == 3
    for V in (1, 15, 16, 17, 33):
        y = torch.randn(3, V, generator=g)
        assert torch.equal(argmax(y, kernels), y.argmax(dim=-1))
    assert torch.equal(argmax(x.double()), x.double().argmax(dim=-1))   # not float32: torch's
