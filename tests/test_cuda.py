"""The CUDA device path gives the CPU path's logits (skipped where no CUDA device is present)."""
import numpy as np
import pytest
import torch

from moed import LLM, SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")


@pytest.mark.parametrize("arch", ["deepseek_v3", "qwen3_moe", "mixtral"])
def test_cuda_logits_match_cpu(tiny_model_dir, arch):
    d = tiny_model_dir(arch, "fp8")
    ids = list(range(3, 40))
    cpu = LLM(d, device="cpu", experts="torch").logits(ids)
    gpu_llm = LLM(d, device="cuda")
    assert gpu_llm.model_info["device"].startswith("cuda")
    gpu = gpu_llm.logits(ids)
    # TF32 may be on for matmuls on the GPU: allow 1e-3 of the logit scale
    assert np.abs(gpu - cpu).max() <= 1e-3 * np.abs(cpu).max()


def test_cuda_greedy_generation_runs(tiny_model_dir):
    llm = LLM(tiny_model_dir("qwen3_moe", "fp8"), device="cuda")
    out = llm.generate(["hello"], SamplingParams(temperature=0, max_new_tokens=16, ignore_eos=True))
    assert len(out[0].token_ids) == 16
