"""The CUDA paths (skipped where no CUDA device is present; tools/gpu_check.sh runs them):
the hybrid engine (dense part on the GPU, routed experts on the host) and its
stream-loading prefill are inside the precision contract, judged against the FP32
reference and the contract's emulation as tests/test_fidelity.py judges the CPU kernels; dual-batch
overlap agrees with single batches; `accel: off` puts the whole model on the GPU."""
import numpy as np
import pytest
import torch

from contract_reference import clear_margin, mean_kl, reference_logits
from moed import LLM, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")

ARCHS = [("deepseek_v3", "fp8"), ("qwen3_moe", "fp8"), ("mixtral", "bf16"), ("qwen2_moe", "bf16")]
IDS = [int(t) for t in np.random.RandomState(5).randint(3, 200, size=96)]


@pytest.mark.parametrize("path", ["cpu", "slp"])
@pytest.mark.parametrize("arch,fmt", ARCHS)
def test_hybrid_within_the_contract(tiny_model_dir, arch, fmt, path):
    # the GPU attends in FP32 (the torch operations): judged against the emulation of
    # the roundings it makes, as the AVX2 kernels are
    d = tiny_model_dir(arch, fmt)
    ref, emu = reference_logits(d, IDS, bf16_attention=False)
    llm = LLM(d, device="cuda", prefill_path=path, prefill_chunk=32)
    assert llm.engine.backends.accel.startswith("hybrid on cuda"), llm.engine.backends.summary()
    gpu = llm.logits(IDS)
    print(f"{arch} {fmt} {path}: KL {mean_kl(ref, gpu):.3e}, emulation {mean_kl(ref, emu):.3e}")
    assert mean_kl(ref, gpu) <= 2 * mean_kl(ref, emu) + 1e-7
    assert (torch.from_numpy(gpu).argmax(-1) == ref.argmax(-1))[clear_margin(ref, 0.5)].all()


def test_dual_batch_overlap_agrees_with_single_batches(tiny_model_dir):
    d = tiny_model_dir("qwen3_moe", "fp8")
    prompts = [IDS[:n] for n in (5, 17, 40, 64)]
    params = SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True, logprobs=0)
    single = LLM(d, device="cuda", dual_batch="off").generate(prompts, params)
    llm = LLM(d, device="cuda", dual_batch="on")
    dual = llm.generate(prompts, params)
    assert llm.engine.runner.dbo.dual_steps > 0
    for a, b in zip(single, dual):
        assert a.token_ids[0] == b.token_ids[0]
        for (_, la, _), (_, lb, _) in zip(a.logprobs, b.logprobs):
            if a.token_ids != b.token_ids:
                break
            assert abs(la - lb) < 0.05


@pytest.mark.parametrize("arch", ["deepseek_v3", "qwen3_moe", "mixtral"])
def test_whole_model_on_the_gpu(tiny_model_dir, arch):
    d = tiny_model_dir(arch, "fp8")
    cpu = LLM(d, device="cpu", experts="torch").logits(IDS[:37])
    gpu_llm = LLM(d, device="cuda", accel="off")
    assert gpu_llm.model_info["device"].startswith("cuda")
    gpu = gpu_llm.logits(IDS[:37])
    # TF32 may be on for matmuls on the GPU: allow 1e-3 of the logit scale
    assert np.abs(gpu - cpu).max() <= 1e-3 * np.abs(cpu).max()


def test_cuda_greedy_generation_runs(tiny_model_dir):
    llm = LLM(tiny_model_dir("qwen3_moe", "fp8"), device="cuda")
    out = llm.generate(["hello"], SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True))
    assert len(out[0].token_ids) == 16


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="DSLP over NCCL needs 2 GPUs")
def test_dslp_over_two_gpus_agrees_with_slp(tiny_model_dir):
    d = tiny_model_dir("qwen3_moe", "fp8")
    with LLM(d, device="cuda", prefill_path="slp", prefill_chunk=32) as llm:
        slp = llm.logits(IDS)
    with LLM(d, device="cuda", prefill_path="dslp", dslp_ranks=2, prefill_chunk=32) as llm:
        assert "DSLP over 2 ranks" in llm.engine.backends.accel, llm.engine.backends.accel
        dslp = llm.logits(IDS)
        assert all(moe.experts.streamed.chunks > 0 for _, moe in llm.engine.model.moe_layers())
    assert np.abs(dslp - slp).max() <= 1e-3 * np.abs(slp).max()


def test_prefill_thread_beside_hybrid_decode(tiny_model_dir):
    """Long prompts arriving mid-decode are prefilled by the prefill thread (SLP on its
    own low-priority stream) while the streams decode; the first tokens agree with the
    engine without it and every block is freed once."""
    from test_prefill_worker import SETTINGS, staggered
    d = tiny_model_dir("qwen3_moe", "fp8", max_position_embeddings=512)
    params = SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True)
    kw = dict(device="cuda", prefill_path="slp", **SETTINGS)
    single = staggered(LLM(d, prefill_worker="off", **kw), params)
    with LLM(d, prefill_worker="on", **kw) as llm:
        sent, original = [], llm.engine.worker.submit
        llm.engine.worker.submit = lambda rid, *a: (sent.append(rid), original(rid, *a))[1]
        two = staggered(llm, params)
        assert sent, "no prompt went to the prefill thread"
        assert llm.engine.blocks.num_used == 0
    assert [t[0] for t in two] == [t[0] for t in single]
