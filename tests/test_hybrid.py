"""The hybrid engine over the CPU device (the twin of a GPU that CI runs): the dense
part on the "device", the routed experts on the host behind the HostBridge, dual-batch
overlap, and stream-loading prefill for the rows the planner sends there.

On the CPU device the dense part runs the CPU backend's kernels, so hybrid decode and
dual-batch overlap must give the CPU-only engine's logits bit for bit; stream-loading
prefill computes the routed experts another way (BF16 tiles on the device) and must
agree within the precision contract.
"""
import numpy as np
import pytest
import torch

from contract_reference import clear_margin, mean_kl, reference_logits
from moed import LLM, SamplingParams
from moed.backends.accel.cpu_device import CPUDevice
from moed.backends.accel.install import install as install_accel
from moed.errors import ConfigError

ARCHS = [("qwen3_moe", "fp8"), ("mixtral", "bf16"), ("deepseek_v3", "fp8"), ("qwen2_moe", "bf16")]
LENGTHS = (5, 17, 40, 64, 9, 33)
PCIE = 2e9            # bytes/s: the CPU device's copies take PCIe-like time


def prompts():
    rs = np.random.RandomState(3)
    return [[int(t) for t in rs.randint(3, 200, size=n)] for n in LENGTHS]


def run(llm, params):
    return [(o.token_ids, [lp[1] for lp in o.logprobs]) for o in llm.generate(prompts(), params)]


GREEDY = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True, logprobs=0)


@pytest.fixture
def model(tiny_model_dir, request):
    arch, fmt = request.param
    return tiny_model_dir(arch, fmt)


@pytest.mark.parametrize("model", ARCHS, indirect=True, ids=[f"{a}-{f}" for a, f in ARCHS])
def test_hybrid_decode_equals_cpu_only_bit_for_bit(model):
    cpu = run(LLM(model, device="cpu"), GREEDY)
    llm = LLM(model, device="cpu", accel="cpu", accel_bandwidth=PCIE, dual_batch="off")
    assert llm.engine.backends.accel.startswith("hybrid on cpu")
    hybrid = run(llm, GREEDY)
    bridge = llm.engine.accel.bridge
    assert bridge.calls >= len(llm.engine.model.moe_layers()) * GREEDY.max_new_tokens
    assert hybrid == cpu


@pytest.mark.parametrize("model", ARCHS[:3], indirect=True, ids=[f"{a}-{f}" for a, f in ARCHS[:3]])
def test_dual_batch_overlap_gives_the_same_tokens(model):
    single = run(LLM(model, device="cpu", accel="cpu", dual_batch="off"), GREEDY)
    llm = LLM(model, device="cpu", accel="cpu", dual_batch="on")
    dual = run(llm, GREEDY)
    policy = llm.engine.runner.dbo
    assert policy.dual_steps > 0, "no step ran as two micro-batches"
    assert dual == single


def test_dual_batch_auto_stays_off_where_nothing_can_overlap(tiny_model_dir):
    llm = LLM(tiny_model_dir("qwen3_moe", "fp8"), device="cpu", accel="cpu")
    run(llm, GREEDY)
    policy = llm.engine.runner.dbo
    assert policy.steps > 0 and policy.dual_steps == 0


def first_token_logprobs(llm, n=8):
    params = SamplingParams(temperature=0, max_new_tokens=1, ignore_eos=True, logprobs=n)
    return [o.logprobs[0] for o in llm.generate(prompts(), params)]


def deviation(got, ref):
    """max |logprob difference| over the reference's top 3 tokens at the first position."""
    mine = dict(got[2])
    return max(abs(mine[t] - lp) if t in mine else abs(got[2][-1][1] - lp)
               for t, lp in ref[2][:3])


@pytest.mark.parametrize("model", ARCHS, indirect=True, ids=[f"{a}-{f}" for a, f in ARCHS])
def test_stream_loading_prefill_agrees_within_the_contract(model):
    """Forced SLP in ragged 16-token chunks, judged like CPU-expert prefill against the
    FP32 reference: its deviation at most 2x the CPU path's (plus a floor), and the
    reference's top token wherever its margin is clear."""
    ref = first_token_logprobs(LLM(model, device="cpu", experts="torch"))
    cpu = first_token_logprobs(LLM(model, device="cpu", prefill_chunk=16))
    llm = LLM(model, device="cpu", accel="cpu", accel_bandwidth=PCIE, prefill_path="slp",
              prefill_chunk=16)
    slp = first_token_logprobs(llm)
    streamed = [moe.experts.streamed for _, moe in llm.engine.model.moe_layers()]
    assert all(s is not None and s.chunks > 0 for s in streamed), "SLP never ran"
    d_cpu = [deviation(c, r) for c, r in zip(cpu, ref)]
    d_slp = [deviation(s, r) for s, r in zip(slp, ref)]
    assert np.mean(d_slp) <= 2 * np.mean(d_cpu) + 1e-3, (d_slp, d_cpu)
    for length, r, s, d in zip(LENGTHS, ref, slp, d_cpu):
        margin = r[2][0][1] - r[2][1][1]
        if margin > 0.1 + 4 * d:
            assert s[0] == r[0], (length, r, s)


def test_bad_settings_are_refused(tiny_model_dir):
    model = tiny_model_dir("qwen3_moe", "fp8")
    for kwargs, field in (({"accel": "gpu"}, "accel"),
                          ({"dual_batch": "sometimes"}, "dual_batch"),
                          ({"prefill_path": "slp"}, "prefill_path"),
                          ({"accel": "cpu", "prefill_path": "fast"}, "prefill_path"),
                          ({"accel": "cpu", "prefill_path": "dslp"}, "dslp_ranks")):
        with pytest.raises(ConfigError) as e:
            LLM(model, device="cpu", **kwargs)
        assert e.value.field == field, kwargs


class DenseTwin(CPUDevice):
    """The CPU device standing in for a GPU *with* the GPU's dense part: install takes
    its device branch (DeviceLinear on BF16 tiles, the torch operations for attention,
    norms and routers), so that branch runs where there is no GPU."""
    kind = "dense-twin"


@pytest.mark.parametrize("model", ARCHS, indirect=True, ids=[f"{a}-{f}" for a, f in ARCHS])
def test_the_device_branch_agrees_within_the_contract(model):
    """Judged as tests/test_fidelity.py judges the kernels: mean KL from the FP32
    reference at most 2x the contract emulation's (attention in FP32, as this branch
    attends), top-1 kept at clear-margin positions."""
    ids = prompts()[3]
    ref, emu = reference_logits(model, ids, bf16_attention=False)
    llm = LLM(model, device="cpu", experts="torch")       # the reference, then the branch
    with DenseTwin(bandwidth=PCIE) as device:
        info, accel = install_accel(llm.engine.model, model, device)
        assert info.linears.startswith("dense-twin (") and info.experts.startswith("cpu-")
        assert all(type(lin).__name__ == "DeviceLinear" for _, _, _, m in
                   llm.engine.model.linear_modules() for lin in
                   (getattr(m, a) for a in m.LINEARS) if lin is not None)
        got = llm.logits(ids)
        assert accel.bridge.calls == len(llm.engine.model.moe_layers())
    assert mean_kl(ref, got) <= 2 * mean_kl(ref, emu) + 1e-7, (mean_kl(ref, got), mean_kl(ref, emu))
    clear = clear_margin(ref, 0.5)
    assert (torch.from_numpy(got).argmax(-1) == ref.argmax(-1))[clear].all()


# -- the hybrid engine's prefill worker: a thread on its own device stream
def test_prefill_thread_gives_the_single_engines_bits(tiny_model_dir):
    """Long prompts arriving mid-decode go to the prefill thread; with CPU-expert
    prefill (chunking leaves their bits alone) the outputs are the engine's without it,
    bit for bit, and every block is freed once."""
    from test_prefill_worker import SETTINGS, staggered
    model = tiny_model_dir("qwen3_moe", "fp8", max_position_embeddings=512)
    kw = dict(device="cpu", accel="cpu", prefill_path="cpu", **SETTINGS)
    single = staggered(LLM(model, **kw), GREEDY)
    with LLM(model, prefill_worker="on", **kw) as llm:
        eng = llm.engine
        assert type(eng.worker).__name__ == "PrefillThread"
        sent, original = [], eng.worker.submit
        eng.worker.submit = lambda rid, *a: (sent.append(rid), original(rid, *a))[1]
        two = staggered(llm, GREEDY)
        assert sent, "no prompt went to the prefill thread"
        assert two == single
        assert eng.blocks.num_used == 0, "every block freed once"


def test_prefill_thread_runs_stream_loading_prefill(tiny_model_dir):
    """With prefill_path slp the thread's prompt streams its experts (the decode steps
    keep the host's): the first tokens agree with the engine without the thread within
    the contract (SLP's bits follow the chunk, which differs)."""
    from test_prefill_worker import SETTINGS, staggered
    model = tiny_model_dir("qwen3_moe", "fp8", max_position_embeddings=512)
    kw = dict(device="cpu", accel="cpu", prefill_path="slp", **SETTINGS)
    single = staggered(LLM(model, **kw), GREEDY)
    with LLM(model, prefill_worker="on", **kw) as llm:
        eng = llm.engine
        sent, original = [], eng.worker.submit
        eng.worker.submit = lambda rid, *a: (sent.append(a[3]), original(rid, *a))[1]
        streamed = [moe.experts.streamed for _, moe in eng.model.moe_layers()]
        two = staggered(llm, GREEDY)
        assert sent and all(plan.path == "slp" for plan in sent), sent
        assert all(s.chunks > 0 for s in streamed)
        assert eng.blocks.num_used == 0
    assert [t[:2] for t in two] == [t[:2] for t in single]
