"""Causal prefill attention kernel (moed/backends/cpu/attention.py): every ISA against a
float64 reference (explicit softmax, causal mask offset by the cached prefix) on
ragged shapes, float32 and BF16 inputs, NaN-poisoned outputs, strided inputs,
bad shapes, thread-count determinism and two Python threads at once.

Error bounds, with |ref| the mean magnitude of the reference output:
- avx512 rounds q, k, v and the probabilities to BF16 (2^-9 relative each) and
  accumulates in FP32: mean |err| <= 1e-2 |ref| and max |err| <= 3e-2 (outputs
  are averages of unit-variance values, |ref| ~ 0.1 .. 1; measured 4e-3 / 1.1e-2).
- avx2 / generic compute in FP32 from the given inputs: mean |err| <= 1e-5 |ref|,
  max |err| <= 2e-5 (measured 7e-7 / 2e-6).
"""
import itertools
import math
import threading

import pytest
import torch

import moed.backends.cpu.isa as cpu
from moed.errors import InvalidRequestError
from moed.backends.cpu.attention import causal_attention

from isa_kernels import kernels_or_skip

TOKENS = [1, 3, 17, 130]
PREFIX = [0, 5, 200]
GROUPS = [1, 4, 8]                              # H / Hkv
DIMS = [(128, 128), (192, 128), (24, 40)]       # (dq, dv)
DTYPES = [torch.float32, torch.bfloat16]
BOUNDS = {"avx512": (1e-2, 3e-2), "avx2": (1e-5, 2e-5), "generic": (1e-5, 2e-5),
          "avx512emu": (1e-2, 3e-2)}   # the AVX-512 build, its BF16 dots emulated: same roundings


def reference(q, k, v, scale):
    """float64 out [n, H, dv]: query i at position L - n + i sees keys 0 .. L - n + i."""
    n, H, _ = q.shape
    L, Hkv, _ = k.shape
    G = H // Hkv
    kd = k.double().repeat_interleave(G, dim=1)          # [L, H, dq]
    vd = v.double().repeat_interleave(G, dim=1)          # [L, H, dv]
    s = torch.einsum("nhd,lhd->hnl", q.double(), kd) * scale
    pos = torch.arange(n) + (L - n)
    s = s.masked_fill(torch.arange(L)[None, :] > pos[:, None], -math.inf)
    return torch.einsum("hnl,lhd->nhd", s.softmax(-1), vd)


def make_inputs(n, prefix, G, dq, dv, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    Hkv = 3 if G == 1 else 2                     # ragged head counts too
    L, H = n + prefix, G * Hkv
    q = 1.5 * torch.randn(n, H, dq, generator=g)  # sharper than uniform softmax
    k = torch.randn(L, Hkv, dq, generator=g)
    v = torch.randn(L, Hkv, dv, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def check(out, ref, isa, label):
    mean_tol, max_tol = BOUNDS[isa]
    assert not torch.isnan(out).any(), f"{label}: NaN left in out"
    err = (out.double() - ref).abs()
    rel, worst = (err.mean() / ref.abs().mean()).item(), err.max().item()
    assert rel <= mean_tol and worst <= max_tol, \
        f"{label}: mean rel {rel:.2e} (<= {mean_tol}), max abs {worst:.2e} (<= {max_tol})"
    return rel, worst


# every (dims, G, dtype) combination once; (n, prefix) walks all 12 pairs
# (c % 4, c % 3 over 18 cases)
CASES = [(TOKENS[c % 4], PREFIX[c % 3], G, dims, dtype)
         for c, (dims, G, dtype) in enumerate(itertools.product(DIMS, GROUPS, DTYPES))]


@pytest.mark.parametrize("isa", cpu.ISAS)
def test_every_isa_matches_float64_on_ragged_shapes(isa):
    kernels = kernels_or_skip(isa)
    worst = (0.0, 0.0)
    for i, (n, prefix, G, (dq, dv), dtype) in enumerate(CASES):
        q, k, v = make_inputs(n, prefix, G, dq, dv, dtype, seed=i)
        out = torch.full((n, q.shape[1], dv), float("nan"))
        res = causal_attention(q, k, v, dq ** -0.5, threads=2, out=out, kernels=kernels)
        assert res.data_ptr() == out.data_ptr()
        e = check(out, reference(q, k, v, dq ** -0.5), isa,
                  f"{isa} n={n} prefix={prefix} G={G} dq/dv={dq}/{dv} {dtype}")
        worst = tuple(max(a, b) for a, b in zip(worst, e))
    print(f"{isa}: worst mean rel {worst[0]:.2e}, worst max abs {worst[1]:.2e}")


def test_cases_cover_every_shape_pair():
    assert {(n, p) for n, p, *_ in CASES} == set(itertools.product(TOKENS, PREFIX))
    assert len(CASES) == len(DIMS) * len(GROUPS) * len(DTYPES)


@pytest.mark.parametrize("isa", cpu.ISAS)
def test_strided_inputs_and_mixed_dtypes(isa):
    # q a slice of a packed qkv projection, k/v views of a longer cache, BF16 cache
    kernels = kernels_or_skip(isa)
    n, L, H, Hkv, d = 33, 90, 8, 2, 64
    g = torch.Generator().manual_seed(7)
    qkv = torch.randn(n, (H + 2 * Hkv) * d, generator=g)
    q = qkv[:, : H * d].view(n, H, d)                       # token stride (H + 2 Hkv) d
    cache = torch.randn(2, 128, Hkv, d, generator=g).bfloat16()
    k, v = cache[0, :L], cache[1, :L]
    out = causal_attention(q, k, v, 0.125, threads=2, kernels=kernels)
    check(out, reference(q, k, v, 0.125), isa, f"{isa} strided")
    kt = torch.randn(Hkv, L, d, generator=g).transpose(0, 1)  # head-major cache layout
    out = causal_attention(q, kt, v, 0.125, threads=2, kernels=kernels)
    check(out, reference(q, kt, v, 0.125), isa, f"{isa} head-major k")


@pytest.mark.parametrize("isa", cpu.ISAS)
def test_mla_latent_shape(isa):
    # DeepSeek MLA latent form: 128 query heads share one 576-wide latent key; the
    # value is the key's first 512 columns (a strided view of the same cache)
    kernels = kernels_or_skip(isa)
    n, L, H = 5, 70, 128
    g = torch.Generator().manual_seed(5)
    q = torch.randn(n, H, 576, generator=g)
    kv = torch.randn(L, 1, 576, generator=g)
    out = causal_attention(q, kv, kv[..., :512], 576 ** -0.5, threads=2, kernels=kernels)
    check(out, reference(q, kv, kv[..., :512], 576 ** -0.5), isa, f"{isa} MLA latent")


@pytest.mark.parametrize("isa", cpu.ISAS)
def test_sharp_softmax_with_rising_scores(isa):
    # scores spanning +-60 that grow along the keys: the running max moves many
    # times (AVX-512 rescales lazily, past +8). BF16 inputs, so the reference
    # sees exactly what the kernel multiplies.
    kernels = kernels_or_skip(isa)
    n, L, Hkv, G, d = 40, 300, 2, 4, 64
    g = torch.Generator().manual_seed(9)
    q = (4 * torch.randn(n, Hkv * G, d, generator=g)).bfloat16()
    ramp = torch.linspace(0.2, 2.0, L)[:, None, None]
    k = (ramp * torch.randn(L, Hkv, d, generator=g)).bfloat16()
    v = torch.randn(L, Hkv, d, generator=g).bfloat16()
    ref = reference(q, k, v, d ** -0.5)
    out = causal_attention(q, k, v, d ** -0.5, threads=2, kernels=kernels)
    check(out, ref, isa, f"{isa} sharp")


@pytest.mark.parametrize("isa", cpu.ISAS)
def test_kv_heads_split_into_passes_match_one_pass(isa):
    # a store limit below one kv head's blocks: one pass per kv head
    kernels = kernels_or_skip(isa)
    q, k, v = make_inputs(70, 130, 4, 40, 24, torch.float32, seed=4)   # Hkv 2, L 200
    whole = causal_attention(q, k, v, 0.15, threads=2, kernels=kernels)
    old = kernels.attention_store(1)
    try:
        split = causal_attention(q, k, v, 0.15, threads=2, kernels=kernels)
    finally:
        kernels.attention_store(old)
    assert kernels.attention_store() == old
    assert torch.equal(whole, split)
    check(split, reference(q, k, v, 0.15), isa, f"{isa} split passes")


@pytest.mark.parametrize("isa", cpu.ISAS)
def test_thread_count_does_not_change_results(isa):
    kernels = kernels_or_skip(isa)
    q, k, v = make_inputs(70, 60, 4, 128, 128, torch.float32, seed=3)
    one = causal_attention(q, k, v, 0.09, threads=1, kernels=kernels)
    two = causal_attention(q, k, v, 0.09, threads=2, kernels=kernels)
    assert torch.equal(one, two)                # each task owns its rows: no reduction


def test_two_python_threads_at_once_match_alone():
    kernels = cpu.load_kernels()
    inputs = [make_inputs(130, 200, 8, 128, 128, torch.float32, seed=s) for s in (11, 12)]
    alone = [causal_attention(*x, 0.09, threads=2, kernels=kernels) for x in inputs]
    results = [[None] * 4, [None] * 4]

    def run(i):
        for r in range(4):
            results[i][r] = causal_attention(*inputs[i], 0.09, threads=2, kernels=kernels)

    ts = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    for i in (0, 1):
        for r in results[i]:
            assert torch.equal(r, alone[i])


@pytest.mark.parametrize("shapes, field", [
    (((4, 6, 16), (8, 4, 16), (8, 4, 16)), "k"),        # H 6 not a multiple of Hkv 4
    (((9, 4, 16), (8, 4, 16), (8, 4, 16)), "q"),        # n > L
    (((4, 4, 16), (8, 4, 24), (8, 4, 16)), "k"),        # dq mismatch
    (((4, 4, 16), (8, 4, 16), (7, 4, 16)), "v"),        # v tokens != k tokens
    (((4, 4, 16), (8, 4, 16), (8, 2, 16)), "v"),        # v heads != k heads
    (((4, 64), (8, 4, 16), (8, 4, 16)), "q"),           # not [tokens, heads, dim]
])
def test_bad_shapes_name_the_argument(shapes, field):
    q, k, v = (torch.randn(*s) for s in shapes)
    with pytest.raises(InvalidRequestError) as e:
        causal_attention(q, k, v, 0.25)
    assert e.value.field == field


def test_bad_dtype_and_out_are_refused():
    q, k, v = torch.randn(4, 4, 16), torch.randn(8, 2, 16), torch.randn(8, 2, 16)
    with pytest.raises(InvalidRequestError) as e:
        causal_attention(q.half(), k, v, 0.25)
    assert e.value.field == "q"
    with pytest.raises(InvalidRequestError) as e:
        causal_attention(q, k, v, 0.25, out=torch.empty(4, 4, 8))
    assert e.value.field == "out"
