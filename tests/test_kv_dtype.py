"""What the KV cache stores: bfloat16 by default (inside the precision contract),
float32 as a setting, fp8 e4m3 as an opt-in outside it, measured by its own KL."""
import numpy as np
import pytest
import torch

from contract_reference import mean_kl, reference_logits
from moed import LLM, SamplingParams
from moed.config import KV_CACHE_DTYPES as CONFIG_NAMES, Config
from moed.errors import ConfigError
from moed.model.kv_dtype import KV_CACHE_DTYPES, cache_dtype, readable, to_cache

LENGTHS = (16, 100, 300)


def test_the_daemon_settings_name_the_same_dtypes():
    assert tuple(KV_CACHE_DTYPES) == CONFIG_NAMES
    assert Config().engine_kwargs()["kv_cache_dtype"] == "bfloat16"
    with pytest.raises(ConfigError, match="engine.kv_cache_dtype"):
        Config(kv_cache_dtype="float16")


def test_names_and_aliases():
    assert cache_dtype("bfloat16") is cache_dtype("bf16") is torch.bfloat16
    assert cache_dtype("float32") is cache_dtype("fp32") is torch.float32
    assert cache_dtype("fp8_e4m3") is cache_dtype("fp8") is torch.float8_e4m3fn
    assert cache_dtype(torch.bfloat16) is torch.bfloat16
    for bad in ("float16", "int8", None, torch.float16):
        with pytest.raises(ConfigError, match="kv_cache_dtype must be one of"):
            cache_dtype(bad)


def test_fp8_saturates_instead_of_overflowing_to_nan():
    x = torch.tensor([1000.0, -1e6, 3.3, 0.0, 447.9])
    q = to_cache(x, torch.float8_e4m3fn)
    back = readable(q)
    assert back.dtype == torch.bfloat16
    assert not torch.isnan(back.float()).any()
    assert back.float().tolist()[:2] == [448.0, -448.0]
    assert to_cache(x, torch.bfloat16).dtype == torch.bfloat16


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
def test_the_default_cache_is_bfloat16_and_a_bad_one_fails_before_loading(arch, tiny_model_dir):
    model = tiny_model_dir(arch, "fp8")
    llm = LLM(model, device="cpu")
    caches = llm.engine.runner.kv_caches
    assert caches and all(c.dtype == torch.bfloat16 for c in caches)
    with pytest.raises(ConfigError, match="kv_cache_dtype"):
        LLM(model, device="cpu", kv_cache_dtype="half")


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3"])
def test_fp8_cache_serves_and_reports_its_kl(arch, tiny_model_dir):
    """Outside the contract: no bound but sanity; the figure is printed beside the
    bfloat16 and float32 caches' (prompts' logits read every key and value back from
    the cache, so they carry its roundings)."""
    model = tiny_model_dir(arch, "fp8", max_position_embeddings=1024)
    rs = np.random.RandomState(3)
    prompts = [[int(t) for t in rs.randint(3, 200, size=n)] for n in LENGTHS]
    refs = [reference_logits(model, ids, True) for ids in prompts]
    kls = {}
    for name in KV_CACHE_DTYPES:
        llm = LLM(model, device="cpu", kv_cache_dtype=name)
        assert llm.engine.runner.kv_caches[0].dtype == cache_dtype(name)
        total = positions = 0.0
        for ids, (ref, _) in zip(prompts, refs):
            got = torch.tensor(llm.logits(ids), dtype=torch.float64)
            assert torch.isfinite(got).all(), f"{name}: non-finite logits"
            total += mean_kl(ref, got) * len(ids)
            positions += len(ids)
        kls[name] = total / positions
        out = llm.generate([prompts[0]], SamplingParams(temperature=0, max_new_tokens=8,
                                                        ignore_eos=True))[0]
        assert len(out.token_ids) == 8
    emu = sum(mean_kl(ref, emu) * len(ids) for ids, (ref, emu) in zip(prompts, refs)) \
        / sum(map(len, prompts))
    print(f"{arch}: mean KL vs float32 reference: " +
          ", ".join(f"{k} cache {v:.2e}" for k, v in kls.items()) + f"; contract emulation {emu:.2e}")
    assert kls["bfloat16"] <= 2 * emu          # inside the contract
    assert kls["fp8_e4m3"] < 1.0               # degraded, not garbage
