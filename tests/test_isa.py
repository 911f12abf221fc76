"""Instruction-set dispatch: MOED_ISA forces a path, an unknown or unsupported one
fails clearly, and each forced path imports and runs in a fresh process."""
import os
import subprocess
import sys

import pytest

import moed.backends.cpu.isa as cpu
from moed.errors import ConfigError

RUN = """
import torch
from moed.backends.cpu.experts import CPUExpertLayer
g = torch.randn(2, 64, 130).bfloat16(); d = torch.randn(2, 130, 64).bfloat16()
layer = CPUExpertLayer.from_tensors(g, g, d)
y = layer.forward(torch.randn(1, 130), torch.tensor([[1]]), torch.tensor([[1.0]]))
assert y.shape == (1, 130) and not torch.isnan(y).any()
print(layer.isa)
"""


def run_with_isa(isa):
    env = dict(os.environ, MOED_ISA=isa)
    return subprocess.run([sys.executable, "-c", RUN], env=env, capture_output=True, text=True,
                          timeout=120)


def test_generic_always_supported():
    production = [isa for isa in cpu.supported_isas() if isa not in cpu.TEST_ONLY]
    assert production[-1] == "generic"
    assert set(cpu.supported_isas()) <= set(cpu.ISAS)


def test_emulated_avx512_needs_no_bf16_and_is_never_the_default(monkeypatch):
    # wherever the real AVX-512 build runs, the emulated one runs too (it needs less)
    if "avx512" in cpu.supported_isas():
        assert "avx512emu" in cpu.supported_isas()
    monkeypatch.delenv("MOED_ISA", raising=False)
    assert cpu.selected_isa() not in cpu.TEST_ONLY


@pytest.mark.parametrize("isa", cpu.ISAS)
def test_forced_isa_runs_in_a_fresh_process(isa):
    r = run_with_isa(isa)
    if isa in cpu.supported_isas():
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == isa
    else:
        assert r.returncode != 0 and "MOED_ISA" in r.stderr and "supports only" in r.stderr


def test_unknown_isa_is_a_config_error(monkeypatch):
    monkeypatch.setenv("MOED_ISA", "neon")
    with pytest.raises(ConfigError) as e:
        cpu.load_kernels()
    assert e.value.field == "MOED_ISA"


def test_default_is_best_supported(monkeypatch):
    monkeypatch.delenv("MOED_ISA", raising=False)
    assert cpu.load_kernels().ISA == cpu.supported_isas()[0] != "avx512emu"
