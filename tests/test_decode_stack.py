"""The compiled decode stack (moed/backends/cpu/decode_stack.py, cython_src/decode_stack.c)
against the layer loop it stands in for. It makes the same kernel calls with the
same inputs and thread count, so the logits must be equal bit for bit, on every
ISA that builds it, for both cache dtypes, ragged batches included. It must also
decline what it does not cover (prefills, swapped hooks, other models) and fail
bad tables the way the layer loop does.
"""
import numpy as np
import pytest
import torch

import moed.backends.cpu.isa as cpu
from moed import LLM, SamplingParams
from moed.engine.sequence import Sequence
from moed.errors import InvalidRequestError
from moed.backends.cpu.decode_stack import DecodeStack, StackedLayers
from moed.backends.torch import LayerLoop
from moed.model.base import AttentionBatch
from moed.testing.tiny import build_tiny_model

from isa_kernels import kernels_or_skip

# staggered starts: contexts differ within every step, and batches of 1..3 decodes
PROMPTS = [[5, 17, 42, 99, 7, 3, 60, 8, 11, 2], [9, 4, 2, 11, 12, 30, 31], [1, 2, 3, 4, 5]]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    # head dims of 64: q's rows a multiple of 128, so q and k sit side by side in the
    # fused projection and take the compiled norm + rotary (real models' shapes); the
    # tiny Qwen3's first layer is a dense MLP: the stack starts at layer 1
    root = tmp_path_factory.mktemp("stack")
    return {("qwen3_moe", "fp8"): build_tiny_model(root / "qwen-fp8", "qwen3_moe", "fp8",
                                                   overrides={"head_dim": 64}),
            ("qwen3_moe", "int4-ct"): build_tiny_model(root / "qwen-int4", "qwen3_moe", "int4-ct",
                                                       overrides={"head_dim": 64}),
            ("qwen3_moe", "int4-gptq"): build_tiny_model(
                root / "qwen-gptq", "qwen3_moe", "int4-gptq", overrides={"head_dim": 64},
                int4={"sym": False, "group_size": 64}),
            ("mixtral", "bf16"): build_tiny_model(root / "mixtral", "mixtral", "bf16",
                                                  overrides={"hidden_size": 256}),
            ("deepseek_v3", "bf16"): build_tiny_model(root / "deepseek", "deepseek_v3", "bf16")}


NO_STACK = ("generic with deterministic off: no decode stack (torch decodes attention "
            "there); its absence checked")


def use_isa(isa, monkeypatch):
    """Select `isa` for the engines built next; for an ISA this CPU lacks, the refusal
    is asserted and the test skipped."""
    kernels_or_skip(isa)
    monkeypatch.setenv("MOED_ISA", isa)


def stack_or_skip(model):
    """The model's decode stack; on generic, which builds none, its absence is
    asserted and the test skipped."""
    if stack_of(model) is None:
        assert cpu.load_kernels().ISA == "generic"
        pytest.skip(NO_STACK)
    return stack_of(model)


def stack_of(model):
    """The decode stack the CPU backend set, or None (the plain layer loop)."""
    return getattr(model.ops, "stack", None)


class Counted:
    """The model's stack, counting the steps it took and those it declined."""

    def __init__(self, stack):
        self.stack, self.took, self.declined = stack, 0, 0
        self.first = stack.first
        self.routed = []                 # each step's expert ids [layers, B, k]

    def __call__(self, *args):
        out = self.stack(*args)
        if out is None:
            self.declined += 1
        else:
            self.took += 1
            self.routed.append(self.stack.routed.clone())
        return out


class Recorded:
    """A router, recording the expert ids it picks."""

    def __init__(self, router, log):
        self.router, self.log = router, log

    def __call__(self, x):
        ids, wts = self.router(x)
        self.log.append(ids.clone())
        return ids, wts


def ragged_logits(llm, prompts):
    """Logits of every step of one-token steps over the prompts, sequence i joining at
    step i: every step is decode-only, with ragged contexts."""
    eng = llm.engine
    seqs = [Sequence(f"s{i}", ids, SamplingParams(max_new_tokens=1))
            for i, ids in enumerate(prompts)]
    for s, ids in zip(seqs, prompts):
        eng.blocks.grow(s.block_table, len(ids))
    outs = []
    try:
        for t in range(max(len(p) + i for i, p in enumerate(prompts))):
            live = [s for i, s in enumerate(seqs) if i <= t and s.num_computed < len(prompts[i])]
            if live:
                outs.append(eng.runner.run([(s, 1) for s in live]).float().numpy())
                for s in live:
                    s.num_computed += 1
    finally:
        for s in seqs:
            eng.blocks.free(s.block_table)
    return outs


@pytest.mark.parametrize("isa", cpu.ISAS)
@pytest.mark.parametrize("kv_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("arch,fmt", [("qwen3_moe", "fp8"), ("mixtral", "bf16"),
                                      ("qwen3_moe", "int4-ct"), ("qwen3_moe", "int4-gptq")])
def test_stack_logits_equal_the_layer_loop_bit_for_bit(arch, fmt, kv_dtype, isa, models,
                                                       monkeypatch):
    use_isa(isa, monkeypatch)
    model = models[(arch, fmt)]
    fast = LLM(model, device="cpu", kv_cache_dtype=kv_dtype)
    stack = stack_or_skip(fast.engine.model)
    assert isinstance(stack, DecodeStack) and stack.kernels.ISA == isa
    counted = Counted(stack)
    fast.engine.model.ops = StackedLayers(counted)
    monkeypatch.setenv("MOED_DECODE_STACK", "0")
    loop = LLM(model, device="cpu", kv_cache_dtype=kv_dtype)
    assert type(loop.engine.model.ops) is LayerLoop
    picked = []
    for layer in loop.engine.model.layers[stack.first:]:
        layer.mlp.router = Recorded(layer.mlp.router, picked)
    a, b = ragged_logits(fast, PROMPTS), ragged_logits(loop, PROMPTS)
    assert counted.took == len(a) and counted.declined == 0
    # the stack keeps each step's expert ids per layer: the loop's routers' picks
    layers = len(loop.engine.model.layers) - stack.first
    steps = [torch.stack(picked[i:i + layers]) for i in range(0, len(picked), layers)]
    assert len(steps) == len(counted.routed) and \
        all(torch.equal(x, y) for x, y in zip(counted.routed, steps))
    assert len(a) == len(b) and all(x.shape == y.shape for x, y in zip(a, b))
    assert all(np.array_equal(x, y) for x, y in zip(a, b)), \
        max(float(np.abs(x - y).max()) for x, y in zip(a, b))
    # and through the engine: prefill chunks take the layer loop, decodes the stack
    greedy = SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True)
    took = counted.took
    assert [o.token_ids for o in fast.generate(PROMPTS, greedy)] == \
           [o.token_ids for o in loop.generate(PROMPTS, greedy)]
    assert counted.took > took and counted.declined == 0
    print(f"{arch} {fmt} {isa} {kv_dtype}: {len(a)} ragged steps equal bit for bit, "
          f"{counted.took} stack steps")


def test_prefills_and_swapped_hooks_take_the_layer_loop(models, monkeypatch):
    model = models[("qwen3_moe", "fp8")]
    llm = LLM(model, device="cpu")
    m = llm.engine.model
    counted = Counted(stack_or_skip(m))
    m.ops = StackedLayers(counted)
    # a prompt of several tokens is a prefill: the forward never asks the stack
    llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_new_tokens=1))
    assert counted.took == counted.declined == 0
    # a hook swapped after the build (tests count calls through them): declined
    attn = m.layers[1].attn
    calls = []
    original = attn.ops.decode
    attn.ops.decode = lambda *a, **k: calls.append(1) or original(*a, **k)
    out = llm.generate([PROMPTS[1]], SamplingParams(temperature=0, max_new_tokens=3,
                                                    ignore_eos=True))
    assert counted.took == 0 and counted.declined == 2 and len(calls) == 2
    attn.ops.decode = original
    again = llm.generate([PROMPTS[1]], SamplingParams(temperature=0, max_new_tokens=3,
                                                      ignore_eos=True))
    assert counted.took == 2 and again[0].token_ids == out[0].token_ids


def test_built_only_for_what_it_covers(models, monkeypatch):
    isa = cpu.load_kernels().ISA
    # MLA (DeepSeek) keeps the layer loop; so does the torch reference
    assert stack_of(LLM(models[("deepseek_v3", "bf16")], device="cpu").engine.model) is None
    ref = LLM(models[("qwen3_moe", "fp8")], device="cpu", experts="torch")
    assert stack_of(ref.engine.model) is None
    built = stack_of(LLM(models[("qwen3_moe", "fp8")], device="cpu").engine.model)
    assert built is not None            # deterministic: the decode kernel on every ISA
    fastest = LLM(models[("qwen3_moe", "fp8")], device="cpu", deterministic=False)
    assert (stack_of(fastest.engine.model) is not None) == (isa != "generic")
    monkeypatch.setenv("MOED_DECODE_STACK", "0")
    assert stack_of(LLM(models[("qwen3_moe", "fp8")], device="cpu").engine.model) is None


def test_bad_tables_fail_as_in_the_layer_loop(models, monkeypatch):
    llm = LLM(models[("mixtral", "bf16")], device="cpu")
    m, runner = llm.engine.model, llm.engine.runner
    stack = stack_or_skip(m)
    S = runner.kv_caches[0].shape[0]
    ids, positions = torch.tensor([5, 9]), torch.tensor([3, 0])

    def batch(mapping, slots, context):
        t = lambda a: torch.tensor(a, dtype=torch.int64)          # noqa: E731
        rows, slots, context = t([0, 1]), t(slots), t(context)
        mask = torch.arange(slots.shape[1])[None, None, :] < context[:, None, None]
        return AttentionBatch(t(mapping), runner.kv_caches, rows, slots, mask, [], context)

    cases = [(([3, S], [[0, 1, 2, 3], [S, S, S, S]], [4, 1]), "slot_mapping"),
             (([3, 4], [[0, 1, 2, 3], [4, 4, 4, 4]], [4, 5]), "context"),
             (([3, 4], [[0, 1, 2, 3], [4, S + 7, 4, 4]], [4, 2]), "slots")]
    for args, field in cases:
        errors = []
        for m.ops in (StackedLayers(stack), LayerLoop()):
            with pytest.raises(InvalidRequestError) as e:
                m.forward(ids, positions, batch(*args))
            errors.append((e.value.field, str(e.value)))
        assert errors[0] == errors[1] and errors[0][0] == field, errors
    m.ops = StackedLayers(stack)
    # the engine still serves after the refusals
    out = llm.generate([PROMPTS[2]], SamplingParams(temperature=0, max_new_tokens=2))
    assert len(out[0].token_ids) >= 1
