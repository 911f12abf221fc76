"""The CPU expert engine inside a real (tiny, FP8) model: installed by default on
the CPU, same logits as the torch reference within the BF16-activation tolerance,
same greedy tokens."""
import numpy as np
import pytest

from moed import LLM, SamplingParams
from moed.testing.tiny import build_tiny_model


@pytest.fixture(scope="module")
def qwen_fp8(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("qwen3_moe_fp8"), "qwen3_moe", fmt="fp8")


def test_engine_installed_and_matches_reference(qwen_fp8, tmp_path, monkeypatch):
    monkeypatch.setenv("MOED_CACHE_DIR", str(tmp_path / "cache"))
    cpu = LLM(qwen_fp8, device="cpu")
    ref = LLM(qwen_fp8, device="cpu", experts="torch")
    assert cpu.model_info["experts"].startswith("cpu") and ref.model_info["experts"] == "torch"
    assert list((tmp_path / "cache").glob("*.moex"))                  # one store file
    prompt = [5, 17, 42, 99, 7, 3]
    a, b = cpu.logits(prompt), ref.logits(prompt)
    rel = np.abs(a - b).mean() / np.abs(b).mean()
    print(f"logits mean rel L1 vs torch reference: {rel:.2e} (tol 2e-2)")
    assert rel < 2e-2
    params = SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True)
    assert cpu.generate(prompt, params)[0].token_ids == ref.generate(prompt, params)[0].token_ids
