"""Every fast path inside the precision contract (README, "Precision contract").

Judged against transformers run under the contract's roundings
(contract_reference.py): over prompts of 16 to 512 tokens, a path's mean KL
divergence from the float32 reference may be at most 2x the emulation's, and
it may miss no top-1 token at a clear-margin position that the emulation gets
right. Every architecture, format and ISA; random test models have router
near-ties, so a max-logit-error bound alone would be meaningless.
"""
import numpy as np
import pytest
import torch

import moed.backends.cpu.isa as cpu
from contract_reference import clear_margin, mean_kl, reference_logits, router_near_ties
from isa_kernels import kernels_or_skip
from moed import LLM

ARCHS = [("qwen3_moe", "fp8"), ("qwen3_moe", "bf16"), ("mixtral", "bf16"),
         ("deepseek_v3", "fp8"), ("qwen2_moe", "bf16"), ("qwen3_moe", "int4-ct"),
         ("deepseek_v3", "int4-ct"), ("qwen3_moe", "int4-gptq"), ("deepseek_v3", "int4-gptq")]
# INT4: compressed-tensors group 32 (Kimi-K2's ignore list on DeepSeek-V3: only routed
# experts in INT4; attention and dense MLPs too on Qwen3); GPTQ asymmetric, group 128
INT4 = {"int4-ct": None, "int4-gptq": {"group_size": 128, "sym": False}}
# the tiny random checkpoints' router near-ties flip an expert here and there under any
# rounding, and a flip moves a whole prompt's KL (the emulation's own moves x10 between
# prompts): six prompts are pooled
LENGTHS = (16, 64, 100, 200, 300, 512)
MARGIN = 0.5            # logits between the reference's top two: a clear top-1
# ...and no router within this of another expert pick at that position: BF16 rounding of
# the hidden state (2^-9 relative, over a few layers) moves router scores by ~1e-3..1e-2,
# and a swapped expert moves the position's logits by whole units whatever the contract
ROUTER_TIE = 1e-2


def model_for(tiny_model_dir, arch, fmt):
    return tiny_model_dir(arch, fmt, int4=INT4.get(fmt), max_position_embeddings=1024)


_refs = {}
# the AVX2 and generic kernels attend in float32 (more precise than the contract):
# they are judged against the emulation of the roundings they do make
BF16_ATTENTION = {"avx512": True, "avx512emu": True, "avx2": False, "generic": False}


def references(model, bf16_attention=True):
    """Per prompt length: (ids, float32 reference logits, emulation logits)."""
    key = (model, bf16_attention)
    if key not in _refs:
        rs = np.random.RandomState(7)
        _refs[key] = []
        for n in LENGTHS:
            ids = [int(t) for t in rs.randint(3, 200, size=n)]
            _refs[key].append((ids, *reference_logits(model, ids, bf16_attention)))
    return _refs[key]


def kl_sum(ref, logits):
    return mean_kl(ref, logits) * ref.shape[0]


@pytest.mark.parametrize("arch,fmt", ARCHS)
@pytest.mark.parametrize("isa", cpu.ISAS)
def test_fast_paths_inside_the_contract(arch, fmt, isa, tiny_model_dir, monkeypatch):
    # mean KL over every position of the prompts (the pooled mean is the steadier judge)
    kernels_or_skip(isa)
    monkeypatch.setenv("MOED_ISA", isa)
    model = model_for(tiny_model_dir, arch, fmt)
    llm = LLM(model, device="cpu")
    own = references(model, BF16_ATTENTION[isa])
    contract = references(model, True)
    kl = kl_own = kl_contract = positions = checked = 0.0
    for (ids, ref, emu), (_, _, emu_c) in zip(own, contract):
        got = torch.tensor(llm.logits(ids), dtype=torch.float64)
        kl += kl_sum(ref, got)
        kl_own += kl_sum(ref, emu)
        kl_contract += kl_sum(ref, emu_c)
        positions += len(ids)
        clear = clear_margin(ref, MARGIN) & ~router_near_ties(model, ids, ROUTER_TIE)
        checked += int(clear.sum())
        top = ref.argmax(-1)
        misses = (clear & (emu.argmax(-1) == top) & (emu_c.argmax(-1) == top)
                  & (got.argmax(-1) != top)).nonzero().flatten().tolist()
        assert not misses, f"T={len(ids)}: top-1 misses at clear positions {misses}"
    kl, kl_own, kl_contract = kl / positions, kl_own / positions, kl_contract / positions
    # a path more precise than the contract (FP32 attention) is held to the emulation of
    # its own roundings or of the contract, whichever is looser
    bound = 2 * max(kl_own, kl_contract)
    print(f"{arch} {fmt} {isa}: mean KL {kl:.2e}; emulation {kl_own:.2e} (its roundings), "
          f"{kl_contract:.2e} (contract): x{kl / kl_contract:.2f} of the contract's; top-1 "
          f"checked at {int(checked)} of {int(positions)} positions")
    assert checked >= positions / 3, "too few clear positions for the top-1 check to mean much"
    assert kl <= bound, f"mean KL {kl:.2e} > 2x the emulation's ({bound / 2:.2e})"


@pytest.mark.parametrize("arch,fmt", [("qwen3_moe", "fp8"), ("mixtral", "bf16")])
def test_the_emulation_is_close_to_the_reference_and_not_equal(arch, fmt, tiny_model_dir):
    # the oracle itself: the contract's roundings change the logits a little, no more
    model = model_for(tiny_model_dir, arch, fmt)
    for ids, ref, emu in references(model):
        kl = mean_kl(ref, emu)
        assert 0 < kl < 1e-2, f"T={len(ids)}: emulation mean KL {kl:.2e}"
