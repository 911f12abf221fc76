"""The prefill planner (moed/engine/planner.py): its choices follow its own cost model
(short prompts stay on the CPU; past its predicted crossover, SLP), it honours the
override, it survives missing or absurd measurements, and the scheduler takes its
chunk only where no decode is running and free KV blocks allow."""
import math

import pytest

from moed import LLM, SamplingParams
from moed.engine import planner as P
from moed.engine.kv_cache import BlockManager
from moed.engine.planner import MachineConstants, ModelShape, PrefillPlanner
from moed.engine.scheduler import Scheduler
from moed.engine.sequence import Sequence

# Qwen3-30B-A3B per layer: q/k/v/o + router; 128 experts of 3 x 2048 x 768, 8 active; FP8
QWEN3_30B = ModelShape(layers=48, hidden=2048, dense_params=(2 * 32 * 128 + 2 * 4 * 128) * 2048
                       + 128 * 2048, experts=128, active=8, expert_params=3 * 2048 * 768,
                       moe_layers=48, attention_flops=4 * 32 * 128, weight_bytes=1.0)
CPU = MachineConstants(cpu="test", threads=16, cpu_read_bps=200e9, cpu_flops=2e12,
                       source="measured")
ONE_GPU = MachineConstants(cpu="test", threads=16, cpu_read_bps=200e9, cpu_flops=2e12,
                           h2d_bps=16e9, gpu_flops=200e12, num_gpus=1, source="measured")


@pytest.mark.parametrize("tokens", [100, 256, 512, 1000, 4096, 20000])
def test_chunk_is_the_smallest_within_tolerance_of_the_models_best(tokens):
    planner = PrefillPlanner(CPU, QWEN3_30B)
    plan = planner.plan(tokens)
    costs = planner.costs(tokens)
    best = min(costs.values())
    assert plan.path == "cpu" and plan.reason == "auto"
    assert plan.predicted_s == costs[("cpu", plan.chunk)] <= best * (1 + P.TOLERANCE)
    assert all(costs[("cpu", c)] > best * (1 + P.TOLERANCE)
               for c in planner.chunks if c < plan.chunk and ("cpu", c) in costs)
    assert plan == planner.plan(tokens), "a plan depends on the request alone"


def test_larger_chunks_pay_on_the_cpu_where_weights_dominate():
    # 256 tokens leave 16 per expert: the GEMM runs below its best and reads every
    # expert per chunk; the model must prefer a larger chunk for a long prompt
    planner = PrefillPlanner(CPU, QWEN3_30B)
    assert planner.cpu_s(4096, 4096) < planner.cpu_s(4096, 256)
    assert planner.plan(4096).chunk > 256
    assert planner.plan(100).chunk == 256, "a short prompt: one step of the smallest chunk"


def test_short_prompts_stay_on_the_cpu_and_past_the_crossover_slp():
    planner = PrefillPlanner(ONE_GPU, QWEN3_30B)
    cross = planner.crossover()
    assert cross is not None and cross > P.CHUNKS[0], "the CPU must win for short prompts"
    assert planner.plan(P.CHUNKS[0]).path == "cpu"
    assert planner.plan(cross // 2).path == "cpu"
    for tokens in (cross, 2 * cross, 4 * cross):
        plan = planner.plan(tokens)
        assert plan.path == "slp", (tokens, plan.summary())
        costs = planner.costs(tokens)
        assert min(t for (path, _), t in costs.items() if path == "slp") < \
            min(t for (path, _), t in costs.items() if path == "cpu")


def test_dslp_is_a_candidate_only_with_several_gpus():
    one = PrefillPlanner(ONE_GPU, QWEN3_30B).costs(8192)
    two = PrefillPlanner(MachineConstants(**{**ONE_GPU.__dict__, "num_gpus": 2}),
                         QWEN3_30B).costs(8192)
    assert not any(path == "dslp" for path, _ in one)
    assert any(path == "dslp" for path, _ in two)
    assert min(t for (p, _), t in two.items() if p == "dslp") < \
        min(t for (p, _), t in one.items() if p == "slp")


def test_no_gpu_paths_without_gpu_constants():
    planner = PrefillPlanner(CPU, QWEN3_30B)
    assert planner.crossover() is None
    assert all(path == "cpu" for path, _ in planner.costs(100000))


def test_override_is_honoured():
    planner = PrefillPlanner(ONE_GPU, QWEN3_30B, override=1024)
    for tokens in (100, 4096, 100000):
        plan = planner.plan(tokens)
        assert (plan.path, plan.chunk, plan.reason) == ("cpu", 1024, "override")


def test_slp_takes_the_largest_chunks_device_memory_allows():
    planner = PrefillPlanner(ONE_GPU, QWEN3_30B, slp_chunks=(1024, 2048, 4096, 8192))
    plan = planner.plan(32768)
    assert plan.path == "slp" and plan.chunk == 8192, plan.summary()
    small = PrefillPlanner(ONE_GPU, QWEN3_30B, slp_chunks=(1024, 2048))
    assert small.plan(32768).chunk == 2048
    assert small.plan(32768).predicted_s > plan.predicted_s, "weights cross PCIe once per chunk"


@pytest.mark.parametrize("consts", [CPU, ONE_GPU], ids=["no-gpu", "one-gpu"])
def test_a_forced_path_is_taken_by_every_prompt(consts):
    slp = PrefillPlanner(consts, QWEN3_30B, path="slp")
    for tokens in (5, 300, 100000):
        plan = slp.plan(tokens)
        assert (plan.path, plan.reason) == ("slp", "override"), plan.summary()
        assert plan.chunk in slp.slp_chunks
    if not consts.has_gpu:      # nothing to predict with: the largest chunk
        assert slp.plan(100000).chunk == max(slp.slp_chunks)
    cpu = PrefillPlanner(consts, QWEN3_30B, path="cpu")
    assert {cpu.plan(t).path for t in (5, 300, 100000)} == {"cpu"}
    both = PrefillPlanner(consts, QWEN3_30B, path="slp", override=512).plan(4096)
    assert (both.path, both.chunk, both.reason) == ("slp", 512, "override")


def test_a_bad_path_is_a_config_error():
    with pytest.raises(P.ConfigError) as e:
        PrefillPlanner(CPU, QWEN3_30B, path="fastest")
    assert e.value.field == "prefill_path"


def chunks(n):
    return [(object(), 1)] * n


def test_dual_batch_policy_follows_the_measured_step_times():
    on, off = P.DualBatchPolicy("on"), P.DualBatchPolicy("off")
    assert on.use(chunks(2)) and not on.use(chunks(1)) and not on.use([(object(), 5)] * 2)
    assert not off.use(chunks(8))
    auto = P.DualBatchPolicy("auto")
    assert not auto.use(chunks(4)), "nothing measured yet: single batches"
    auto.observe(4, False, step_s=0.040, cpu_s=0.002)     # 5% in CPU experts: not worth it
    assert not auto.use(chunks(4))
    for _ in range(30):
        auto.observe(4, False, step_s=0.040, cpu_s=0.018)  # 45% in CPU experts
    assert auto.use(chunks(4))
    for _ in range(30):
        auto.observe(4, True, step_s=0.060, cpu_s=0.018)   # measured slower when dual
    assert sum(auto.use(chunks(4)) for _ in range(64)) <= 1, "back to single batches"
    twin = P.DualBatchPolicy("auto", overlap=False)
    for _ in range(5):
        twin.observe(4, False, step_s=0.040, cpu_s=0.020)
    assert not twin.use(chunks(4)), "nothing overlaps on the CPU device"
    with pytest.raises(P.ConfigError):
        P.DualBatchPolicy("sometimes")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0, 0.0, 1e30, "fast", None])
def test_absurd_or_missing_measurements_fall_back_to_defaults(bad):
    consts = MachineConstants(cpu_read_bps=bad, cpu_flops=bad, h2d_bps=bad, gpu_flops=bad,
                              num_gpus=1)
    assert consts.cpu_read_bps is None and consts.cpu_flops is None
    assert not consts.has_gpu
    assert (consts.read_bps, consts.flops) == (P.DEFAULT_READ_BPS, P.DEFAULT_CPU_FLOPS)
    planner = PrefillPlanner(consts, QWEN3_30B)
    for tokens in (1, 512, 4096):
        plan = planner.plan(tokens)
        assert plan.path == "cpu" and plan.chunk in planner.chunks
        assert math.isfinite(plan.predicted_s) and plan.predicted_s > 0
    assert "n/a" in planner.summary()


class BrokenKernels:
    def read_seconds(self, buf, nbytes, threads):
        return 0.0                      # a zero time: an infinite bandwidth

    def peak_flops(self, iters, threads):
        raise RuntimeError("no probe")


class AbsurdKernels:
    def read_seconds(self, buf, nbytes, threads):
        return 1e-12                    # 10^20 bytes/s

    def peak_flops(self, iters, threads):
        return float("nan")


def test_a_failing_probe_gives_defaults_and_is_not_cached(tmp_path):
    consts = MachineConstants.load(threads=3, cache_dir=tmp_path, kernels=BrokenKernels())
    assert consts.source == "default" and consts.cpu_read_bps is None
    consts = MachineConstants.load(threads=3, cache_dir=tmp_path, kernels=AbsurdKernels())
    assert consts.cpu_read_bps is None and consts.cpu_flops is None
    assert not list(tmp_path.rglob("*.json")), "a failed measurement must be re-taken next start"


class FixedKernels:
    calls = 0

    def read_seconds(self, buf, nbytes, threads):
        FixedKernels.calls += 1
        return nbytes / 20e9

    def peak_flops(self, iters, threads):
        return 500e9


def test_constants_are_cached_per_machine_and_thread_count(tmp_path):
    first = MachineConstants.load(threads=3, cache_dir=tmp_path, kernels=FixedKernels())
    calls = FixedKernels.calls
    again = MachineConstants.load(threads=3, cache_dir=tmp_path, kernels=FixedKernels())
    assert first.source == "measured" and again.source == "cache"
    assert FixedKernels.calls == calls, "a cached machine is not probed again"
    assert (again.cpu_read_bps, again.cpu_flops) == pytest.approx((20e9, 500e9))
    other = MachineConstants.load(threads=5, cache_dir=tmp_path, kernels=FixedKernels())
    assert other.source == "measured" and len(list(tmp_path.rglob("*.json"))) == 2


def test_a_corrupt_cache_file_is_measured_again(tmp_path):
    path = P.cache_file(P.cpu_model(), 3, tmp_path)
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    consts = MachineConstants.load(threads=3, cache_dir=tmp_path, kernels=FixedKernels())
    assert consts.source == "measured" and consts.cpu_flops == pytest.approx(500e9)
    path.write_text('{"version": 1, "cpu_read_bps": "x", "cpu_flops": -4, "threads": 3}')
    assert MachineConstants.load(threads=3, cache_dir=tmp_path).cpu_flops is None


def test_the_real_probes_are_short_and_sane(tmp_path):
    try:
        from moed.backends.cpu.isa import load_kernels
        kernels = load_kernels()
    except Exception as e:
        pytest.skip(f"the compiled kernels are not built here: {e}")
    import time
    t0 = time.perf_counter()
    consts = P.measure(2, kernels)
    # ~0.3 s on an idle 2-core VM (filling the buffer is most of it); a loaded one may
    # take a few times that
    assert time.perf_counter() - t0 < 3.0
    assert consts.source == "measured" and consts.cpu_read_bps and consts.cpu_flops


# -- the scheduler takes the chunk only where no decode runs, within free KV blocks
def seq(n, chunk=None, max_new=4):
    s = Sequence(f"r{n}", list(range(3, 3 + n)), SamplingParams(max_new_tokens=max_new))
    s.prefill_chunk = chunk
    return s


def step(sched):
    chunks = sched.schedule()
    for s, n in chunks:
        s.num_computed += n
        if s.num_computed == s.num_tokens:        # sampled: one more token to decode
            s.output_ids.append(7)
    return [(s.request_id, n) for s, n in chunks]


def test_a_prefill_alone_takes_its_chunk_and_decodes_keep_the_budget():
    sched = Scheduler(BlockManager(1000, 16), 4, 64, 16)
    a = seq(1000, chunk=512)
    sched.add(a)
    assert step(sched) == [("r1000", 512)]
    assert step(sched) == [("r1000", 488)]
    b = seq(600, chunk=512)
    sched.add(b)                                   # a now decodes: b is chunked by 63
    assert step(sched) == [("r1000", 1), ("r600", 63)]


def test_an_unplanned_prefill_keeps_max_num_batched_tokens():
    sched = Scheduler(BlockManager(1000, 16), 4, 64, 16)
    sched.add(seq(200))
    assert step(sched) == [("r200", 64)]


def test_a_large_chunk_never_preempts_and_stops_at_free_blocks():
    blocks = BlockManager(40, 16)                  # 640 token slots
    sched = Scheduler(blocks, 4, 64, 16)
    a, b = seq(300, chunk=4096), seq(1000, chunk=4096)
    sched.add(a)
    sched.add(b)
    preempted = []
    sched.preempt = lambda s: preempted.append(s)
    first = step(sched)
    assert first[0] == ("r300", 300)
    assert sum(n for _, n in first) * 1 <= blocks.num_blocks * 16
    assert not preempted and blocks.num_free >= 0
    assert all(len(s.block_table) * 16 >= s.num_computed for s in (a, b))


# -- through the engine: the planner's chunks change no greedy token
def test_engine_plans_logs_and_keeps_greedy_output(tiny_model_dir):
    model = tiny_model_dir("qwen3_moe", "fp8", max_position_embeddings=512)
    params = SamplingParams(temperature=0, max_new_tokens=6, ignore_eos=True, logprobs=0)
    prompt = [int(3 + (i * 37) % 190) for i in range(300)]
    planned = LLM(model, device="cpu", prefill_chunk=128)
    fixed = LLM(model, device="cpu", max_num_batched_tokens=16, max_num_seqs=4)
    sizes = []
    run = planned.engine.runner.run
    planned.engine.runner.run = lambda chunks, **kw: (sizes.append([n for _, n in chunks]),
                                                       run(chunks, **kw))[1]
    a = planned.generate([prompt], params)[0]
    b = fixed.generate([prompt], params)[0]
    assert sizes[:3] == [[128], [128], [44]], sizes
    assert a.token_ids == b.token_ids
    assert [lp[1] for lp in a.logprobs] == [lp[1] for lp in b.logprobs]
    assert fixed.engine.planner is None and "off" in fixed.model_info["planner"]
    auto = LLM(model, device="cpu")
    assert auto.engine.planner is not None and "chunk auto" in auto.model_info["planner"]


def test_model_shape_counts_mla_and_shared_experts(tiny_model_dir):
    from moed.model.checkpoint import Checkpoint
    from moed.model.registry import load_model
    import torch
    d = tiny_model_dir("deepseek_v3", "fp8")
    model = load_model(Checkpoint(d), torch.device("cpu"))
    shape, c = ModelShape.of(model), model.cfg.raw
    H, D = c["num_attention_heads"], c["hidden_size"]
    dn, dr, dv = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
    assert shape.attention_flops == 2 * H * (dn + dr) + 2 * H * dv
    shared = 3 * D * c["n_shared_experts"] * c["moe_intermediate_size"]
    assert shape.dense_params > shared + c["n_routed_experts"] * D


def test_tpot_budget_follows_the_measured_step_times():
    b = P.TPOTBudget(0.100, max_tokens=256, per_token_s=0.002)
    assert b.budget(2) == 2 + P.TPOT_MIN_PREFILL, "before any measurement: cautious"
    for _ in range(20):
        b.observe(2, 0, 0.040)                       # decode-only steps: 40 ms
    assert b.budget(2) == 2 + 30                     # (100 - 40) ms / 2 ms a token
    for _ in range(40):
        b.observe(2, 60, 0.040 + 60 * 0.004)         # prompt tokens cost 4 ms each
    assert abs(b.budget(2) - (2 + 15)) <= 1
    slow = P.TPOTBudget(0.030, max_tokens=256, per_token_s=0.002)
    slow.observe(2, 0, 0.040)                        # over the target already
    assert slow.budget(2) == 2 + P.TPOT_MIN_PREFILL, "prompts still progress"
    fast = P.TPOTBudget(10.0, max_tokens=64, per_token_s=0.001)
    fast.observe(4, 0, 0.010)
    assert fast.budget(4) == 64, "never past max_num_batched_tokens"
    mixed = P.TPOTBudget(0.100, max_tokens=256, per_token_s=0.002)
    mixed.observe(2, 20, 0.080)                      # no decode-only step yet
    assert mixed.decode_s == pytest.approx(0.040) and mixed.budget(2) == 2 + 30
    for bad in (0, -1.0, float("nan"), True, "fast"):
        with pytest.raises(P.ConfigError):
            P.TPOTBudget(bad, 256, 0.001)


def test_a_tpot_target_keeps_greedy_output_and_bounds_the_steps(tiny_model_dir):
    model = tiny_model_dir("qwen3_moe", "fp8", max_position_embeddings=512)
    params = SamplingParams(temperature=0, max_new_tokens=10, ignore_eos=True, logprobs=0)
    prompts_ = [list(range(3, 3 + n)) for n in (5, 120, 9, 200)]
    run = lambda llm: [(o.token_ids, [lp[1] for lp in o.logprobs])  # noqa: E731
                       for o in llm.generate(prompts_, params)]
    plain = run(LLM(model, device="cpu", max_num_batched_tokens=256))
    llm = LLM(model, device="cpu", max_num_batched_tokens=256, tpot_target_ms=1e-3)
    sizes, schedule = [], llm.engine.scheduler.schedule

    def watched():
        chunks = schedule()
        if any(n == 1 for _, n in chunks) and any(n > 1 for _, n in chunks):
            sizes.append(sum(n for _, n in chunks))
        return chunks
    llm.engine.scheduler.schedule = watched
    assert run(llm) == plain
    assert sizes and max(sizes) <= 4 + P.TPOT_MIN_PREFILL, sizes
    assert "TPOT target" in llm.engine.planner_summary()


def test_decode_keeps_the_fewest_cpus_that_read_nearly_all_the_memory_can_give():
    saturating = lambda k: min(k, 6) * 10e9          # noqa: E731 - 6 CPUs saturate the memory
    assert P.decode_cpus(saturating, 64) == 6
    assert P.decode_cpus(lambda k: k * 1e9, 16) == 15, "never saturated: all but one"
    assert P.decode_cpus(lambda k: 50e9, 16) == 1, "one CPU reads it all"
    assert P.decode_cpus(saturating, 2) == 1
    broken = lambda k: 1 / 0                          # noqa: E731

    assert P.decode_cpus(broken, 8) == 4, "a failing probe: half"
    with pytest.raises(P.ConfigError):
        P.decode_cpus(saturating, 1)
    probe = P.read_probe()
    assert probe(1) > 1e8


def test_figures_measured_on_a_busy_machine_are_measured_again_once_it_is_quiet(tmp_path,
                                                                               monkeypatch):
    monkeypatch.setattr(P, "load_average", lambda: 4.0)        # busy: 2 per thread
    busy = MachineConstants.load(threads=2, cache_dir=tmp_path, kernels=SlowKernels())
    assert busy.source == "measured" and busy.load_avg == 4.0
    assert MachineConstants.load(threads=2, cache_dir=tmp_path).source == "cache", \
        "still busy: the cache stands"
    monkeypatch.setattr(P, "load_average", lambda: 0.1)        # quiet now
    again = MachineConstants.load(threads=2, cache_dir=tmp_path, kernels=FixedKernels())
    assert again.source == "measured"
    assert (again.cpu_read_bps, again.cpu_flops) == pytest.approx((20e9, 500e9))
    kept = MachineConstants.load(threads=2, cache_dir=tmp_path, kernels=SlowKernels())
    assert kept.source == "cache" and kept.cpu_flops == pytest.approx(500e9), \
        "measured quiet: cached for good"


class SlowKernels:
    def read_seconds(self, buf, nbytes, threads):
        return nbytes / 5e9

    def peak_flops(self, iters, threads):
        return 100e9
