"""DSLP run by the engine over the CPU device: 2 and 3 gloo ranks (this process rank 0,
helper processes the others), each streaming its share of every MoE layer's experts.

Judged like SLP (tests/test_hybrid.py): against the FP32 reference, its deviation at most
2x the CPU path's, the reference's top token wherever its margin is clear; and against
SLP on one device, whose per-expert arithmetic it shares. A helper lost between prompts
leaves the engine serving on the host's experts.
"""
import logging
import os
import signal

import numpy as np
import pytest
import torch.distributed as dist

from moed import LLM, SamplingParams
from moed.errors import ConfigError
from test_hybrid import PCIE, deviation, first_token_logprobs, prompts

CASES = [("qwen3_moe", "fp8", 2), ("deepseek_v3", "fp8", 3), ("mixtral", "bf16", 3)]
GREEDY = SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True, logprobs=0)


@pytest.fixture(autouse=True)
def gloo():
    if not (dist.is_available() and dist.is_gloo_available()):
        pytest.skip("torch.distributed with the gloo backend is not available")
    yield
    assert not dist.is_initialized(), "an engine left the process group joined"


def dslp_llm(model, ranks, **kwargs):
    return LLM(model, device="cpu", accel="cpu", accel_bandwidth=PCIE, prefill_path="dslp",
               dslp_ranks=ranks, prefill_chunk=16, **kwargs)


def dslp_layers(llm):
    return [moe.experts.streamed for _, moe in llm.engine.model.moe_layers()]


def greedy(llm):
    return [(o.token_ids, [lp[1] for lp in o.logprobs]) for o in llm.generate(prompts(), GREEDY)]


@pytest.mark.parametrize("arch,fmt,ranks", CASES, ids=[f"{a}-{f}-{w}ranks" for a, f, w in CASES])
def test_dslp_agrees_within_the_contract(tiny_model_dir, arch, fmt, ranks):
    model = tiny_model_dir(arch, fmt)
    ref = first_token_logprobs(LLM(model, device="cpu", experts="torch"))
    cpu = first_token_logprobs(LLM(model, device="cpu", prefill_chunk=16))
    slp_llm = LLM(model, device="cpu", accel="cpu", prefill_path="slp", prefill_chunk=16)
    slp, slp_greedy = first_token_logprobs(slp_llm), greedy(slp_llm)
    slp_llm.close()
    with dslp_llm(model, ranks) as llm:
        assert f"DSLP over {ranks} ranks" in llm.engine.backends.accel
        procs = llm.engine.accel.dslp.procs
        assert len(procs) == ranks - 1 and all(p.is_alive() for p in procs)
        got, got_greedy = first_token_logprobs(llm), greedy(llm)
        layers = dslp_layers(llm)
        assert all(e.chunks > 0 for e in layers), "DSLP never ran"
        assert llm.engine.accel.dslp.broken is None
    assert not any(p.is_alive() for p in procs), "close() left a rank running"
    d_cpu = [deviation(c, r) for c, r in zip(cpu, ref)]
    d_dslp = [deviation(g, r) for g, r in zip(got, ref)]
    assert np.mean(d_dslp) <= 2 * np.mean(d_cpu) + 1e-3, (d_dslp, d_cpu)
    for r, g, d in zip(ref, got, d_cpu):
        if r[2][0][1] - r[2][1][1] > 0.1 + 4 * d:
            assert g[0] == r[0], (r, g)
    # against SLP on one device: the same experts' arithmetic, sums in another order
    d_slp = [deviation(g, s) for g, s in zip(got, slp)]
    print(f"DSLP {arch}-{fmt} {ranks} ranks: max |logprob - SLP's| {max(d_slp):.2e}")
    assert max(d_slp) <= 1e-3, d_slp
    for (ids, lps), (slp_ids, slp_lps) in zip(got_greedy, slp_greedy):
        if ids != slp_ids:       # a near tie may flip; the logprobs must still agree
            assert max(abs(a - b) for a, b in zip(lps, slp_lps)) < 1e-2, (ids, slp_ids)


def test_a_lost_rank_falls_back_to_the_host_experts(tiny_model_dir, caplog):
    model = tiny_model_dir("qwen3_moe", "fp8")
    cpu = greedy(LLM(model, device="cpu", accel="cpu", prefill_chunk=16))
    with dslp_llm(model, 2) as llm:
        group = llm.engine.accel.dslp
        before = greedy(llm)
        os.kill(group.procs[0].pid, signal.SIGKILL)
        group.procs[0].join(10)
        with caplog.at_level(logging.ERROR, logger="moed.backends.accel.dslp"):
            after = greedy(llm)           # every prompt completes, on the host's experts
        assert group.broken is not None and "rank 1 exited" in group.broken
        assert any("falls back" in r.getMessage() for r in caplog.records)
        assert not dist.is_initialized()
    assert [ids for ids, _ in after] == [ids for ids, _ in cpu]
    assert len(before) == len(after)


def test_bad_dslp_settings_are_refused(tiny_model_dir):
    model = tiny_model_dir("qwen3_moe", "fp8")
    experts = LLM(model, device="cpu").engine.model.moe_layers()[0][1].experts.num_experts
    for kwargs, field in (({"accel": "cpu", "prefill_path": "dslp"}, "dslp_ranks"),
                          ({"accel": "cpu", "prefill_path": "dslp", "dslp_ranks": 1}, "dslp_ranks"),
                          ({"accel": "cpu", "prefill_path": "dslp", "dslp_ranks": "two"},
                           "dslp_ranks"),
                          ({"accel": "cpu", "prefill_path": "dslp", "dslp_ranks": experts + 1},
                           "dslp_ranks"),
                          ({"prefill_path": "dslp", "dslp_ranks": 2}, "prefill_path")):
        with pytest.raises(ConfigError) as e:
            LLM(model, device="cpu", **kwargs)
        assert e.value.field == field, (kwargs, e.value)


def test_a_group_that_fails_to_start_leaves_nothing_behind(tiny_model_dir):
    """A helper that cannot load its model fails the start naming its rank; one that
    fails after the rendezvous (a bad ring, on every rank) leaves the process group."""
    from moed.backends.accel.cpu_device import CPUDevice
    from moed.backends.accel.dslp import DSLPGroup, RankSpec
    model = tiny_model_dir("qwen3_moe", "fp8")
    llm = LLM(model, device="cpu", experts="torch")
    refs = {i: moe.experts for i, moe in llm.engine.model.moe_layers()}
    with CPUDevice() as device:
        with pytest.raises(RuntimeError, match="rank 1 failed to start"):
            DSLPGroup(refs, RankSpec(str(model) + "-missing", 2, "cpu"), device)
        assert not dist.is_initialized()
        with pytest.raises(Exception):
            DSLPGroup(refs, RankSpec(str(model), 2, "cpu", ring_length="many"), device)
        assert not dist.is_initialized()


def test_a_setting_refused_after_the_ranks_started_stops_them(tiny_model_dir):
    model = tiny_model_dir("qwen3_moe", "fp8")
    with pytest.raises(ConfigError) as e:
        dslp_llm(model, 2, dual_batch="sometimes")
    assert e.value.field == "dual_batch"
    assert not dist.is_initialized()
