"""The engine: requests in, token/text deltas out, one batched step at a time.

    step = schedule -> run the model -> sample -> postprocess (stops, text) -> outputs

Not thread-safe: one thread owns it (the server's engine thread, or LLM).
"""
import dataclasses
import itertools
import threading
import time
import logging
import os
from numbers import Integral
from dataclasses import dataclass

import torch

from moed.backends import install as install_backends
from moed.backends.cpu.runtime import default_threads
from moed.engine.kv_cache import BlockManager, blocks_for
from moed.engine.model_runner import ModelRunner
from moed.engine.planner import (DUAL_BATCH, SLP_CHUNKS, DualBatchPolicy, MachineConstants,
                                  ModelShape, PrefillPlanner, TPOTBudget, slp_chunks, with_gpu)
from moed.engine.sampler import sample
from moed.engine.scheduler import Scheduler
from moed.engine.prefill_worker import PrefillWorker, set_threads
from moed.engine.sequence import Sequence, Status
from moed.engine.stops import StopChecker
from moed.config import BATCHED_TOKENS
from moed.errors import CapacityError, ConfigError, InvalidRequestError
from moed.model.checkpoint import Checkpoint
from moed.model.kv_dtype import DEFAULT as KV_DEFAULT, cache_dtype, dtype_name
from moed.model.registry import load_model
from moed.engine.reasoning import reasoning_tags
from moed.model.tokenizer import IncrementalDetokenizer, Tokenizer

log = logging.getLogger("moed.engine")

KV_BUDGET_BYTES = 2 << 30     # default KV cache size cap when num_kv_blocks is not given
ACCEL = ("auto", "off", "cpu")


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list
    new_text: str
    logprobs: list = None           # per new token: (token_id, logprob, [(id, logprob)] * n)
    finished: bool = False
    finish_reason: str = None       # eos | stop_sequence | stop_token | length | cancelled | error
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    error: Exception = None         # finish_reason "error": what failed under this request
    num_cached_tokens: int = 0      # prompt tokens found in the prefix cache


def resolve_device(device):
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not str(device).startswith("cuda:"):
        raise ConfigError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}", field="device")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device='cuda' but no CUDA device is available", field="device")
    return torch.device(device)


class LLMEngine:
    def __init__(self, *args, **kwargs):
        """See _init; a setting refused after helper processes started (the DSLP ranks,
        a prefill worker) stops them before the error propagates."""
        self.accel = self.worker = self._replacement = None
        try:
            self._init(*args, **kwargs)
        except BaseException:
            self.close()
            raise

    def _init(self, model_dir, device="auto", *, max_num_seqs=64, max_num_batched_tokens=None,
                 num_kv_blocks=None, block_size=16, max_waiting=256, kv_cache_dtype=None,
                 experts=None, linears=None, detokenize=True, deterministic=True,
                 verify_store=False, prefill_chunk="auto", accel="auto", prefill_path="auto",
                 dual_batch="auto", accel_bandwidth=None, prefill_worker=False,
                 tpot_target_ms=None, prefill_worker_cpus=None, prefix_caching=True,
                 dslp_ranks=None):
        # accel: the hybrid engine (dense part on the device, routed experts on the host):
        # "auto" = on where the device is CUDA, "off", or "cpu" = over the CPU device (the
        # twin the tests run; accel_bandwidth caps its copies, bytes/s). prefill_path:
        # auto | cpu | slp | dslp (the planner's choice, or forced). dual_batch: auto |
        # on | off (two decode micro-batches, one's CPU experts beside the other's GPU work)
        # an explicit max_num_batched_tokens fixes every step's budget (the planner's
        # chunk choice applies only when it is left unset or prefill_chunk is a number)
        # dslp_ranks: the ranks of DSLP (None: every visible GPU; the CPU device needs it)
        fixed_budget = max_num_batched_tokens is not None
        max_num_batched_tokens = max_num_batched_tokens or BATCHED_TOKENS
        # kv_cache_dtype None: bfloat16, float32 on the torch reference path (the tests'
        # oracle, float32 throughout)
        dtype = None if kv_cache_dtype is None else cache_dtype(kv_cache_dtype)
        if max_num_batched_tokens < max_num_seqs:
            raise ConfigError("max_num_batched_tokens must be >= max_num_seqs",
                              field="max_num_batched_tokens")
        self.device = resolve_device(device)
        ckpt = Checkpoint(model_dir)
        self.tokenizer = Tokenizer.from_dir(model_dir)
        if not self.tokenizer.has_text:
            log.info("%s has no tokenizer files: token-id requests only", ckpt.dir.name)
        # experts="torch" alone means the whole reference path (the oracle of the tests)
        experts = experts or os.environ.get("MOED_EXPERTS", "auto")
        linears = linears or os.environ.get("MOED_LINEARS") or (
            "torch" if experts == "torch" else "auto")
        if dtype is None:
            dtype = torch.float32 if experts == "torch" else cache_dtype(KV_DEFAULT)
        self.accel_device = self._accel_device(accel, experts, accel_bandwidth)
        self.accel = None
        if self.accel_device is None:
            self.model = load_model(ckpt, self.device)
            self.backends = install_backends(self.model, model_dir, experts, linears,
                                             deterministic, verify_store)
        else:
            from moed.backends.accel.install import install as install_accel
            self.model = load_model(ckpt, self.device, expert_device=torch.device("cpu"))
            cuda = self.accel_device.kind == "cuda"
            slp = prefill_path in ("slp", "dslp") or (prefill_path == "auto" and cuda)
            ring, budget = 2, None
            if slp and cuda:
                budget = self._ring_budget()       # None: the GPU could not be measured
                ring = "auto" if budget is not None else 2
            dslp = self._dslp_spec(prefill_path, dslp_ranks, model_dir, accel_bandwidth)
            self.backends, self.accel = install_accel(
                self.model, model_dir, self.accel_device, deterministic=deterministic,
                slp=slp, ring_length=ring, ring_budget=budget, verify_store=verify_store,
                dslp=dslp, dslp_optional=prefill_path == "auto")
        log.info("backends: %s", self.backends.summary())
        self.block_size = block_size
        num_blocks = num_kv_blocks or self._default_num_blocks(max_num_seqs, dtype)
        self.blocks = BlockManager(num_blocks, block_size, prefix_caching)
        log.info("KV cache: %d blocks of %d tokens, %s, %.0f MiB", num_blocks, block_size,
                 dtype_name(dtype), num_blocks * self._block_bytes(dtype) / 2**20)
        dbo = None
        if self.accel is not None:
            dbo = DualBatchPolicy(dual_batch, overlap=self.accel_device.kind == "cuda")
        elif dual_batch not in DUAL_BATCH:
            DualBatchPolicy(dual_batch)        # the same error for a bad value
        self.worker = self._replacement = None
        kv, wants_worker = None, self._wants_worker(prefill_worker, experts)
        if wants_worker and self.accel is None:
            kv = self._start_worker(model_dir, num_blocks, block_size, dtype, experts, linears,
                                    deterministic, prefill_worker_cpus)
        self.runner = ModelRunner(self.model, num_blocks, block_size, dtype, self.accel, dbo,
                                  kv_caches=kv)
        if wants_worker and self.accel is not None:
            self._start_prefill_thread()
        self.scheduler = Scheduler(self.blocks, max_num_seqs, max_num_batched_tokens, max_waiting)
        if self.worker is not None:
            self.scheduler.hold = self._waits_for_worker
        if tpot_target_ms is not None:
            self.scheduler.tpot = TPOTBudget.from_ms(tpot_target_ms, max_num_batched_tokens,
                                                     self._per_token_s())
        if prefill_path in ("slp", "dslp") and self.accel is None:
            raise ConfigError(f"prefill_path={prefill_path!r} needs the hybrid engine "
                              f"(accel='auto' on a CUDA device, or accel='cpu')",
                              field="prefill_path")
        self.planner = self._planner(prefill_chunk, max_num_batched_tokens, fixed_budget,
                                     prefill_path)
        self.seqs = {}                              # request_id -> unfinished Sequence
        self.remote = {}                            # request_id -> Sequence in the worker
        # False: outputs carry token ids only, stop strings unchecked (the server does both
        # on its own thread, off the step)
        self.detokenize = detokenize
        self._ids = itertools.count()
        self.model_info = {
            "architecture": self.model.architecture,
            "context_length": self.model.max_positions,
            "vocab_size": self.model.vocab_size,
            "weight_format": "fp8" if ckpt.quant else str(self.model.embed.dtype).replace("torch.", ""),
            "isa": _isa_name(),
            "device": str(self.device),
            "experts": self.backends.experts,
            "linears": self.backends.linears,
            "backends": self.backends.summary(),
            "planner": self.planner_summary(),
            "has_tokenizer": self.tokenizer.has_text,
            "reasoning": reasoning_tags(self.tokenizer) is not None,
        }

    def _accel_device(self, accel, experts, bandwidth):
        """The hybrid engine's device (moed.backends.accel), or None when it is off."""
        if accel not in ACCEL:
            raise ConfigError(f"accel must be one of {', '.join(ACCEL)}, got {accel!r}",
                              field="accel")
        if accel == "off" or experts == "torch" or (accel == "auto" and self.device.type != "cuda"):
            return None
        if accel == "cpu":
            if self.device.type != "cpu":
                raise ConfigError("accel='cpu' runs the hybrid engine over the CPU device: "
                                  "device must be 'cpu'", field="accel")
            from moed.backends.accel.cpu_device import CPUDevice
            return CPUDevice(bandwidth, keep_log=False)
        from moed.backends.accel.cuda_device import CUDADevice
        return CUDADevice(self.device.index or 0)

    def _dslp_spec(self, prefill_path, ranks, model_dir, bandwidth):
        """The DSLP group's RankSpec, or None (one device streams, or none does)."""
        from moed.backends.accel.dslp import RankSpec
        if ranks is not None and (isinstance(ranks, bool) or not isinstance(ranks, Integral)
                                  or ranks < 1):
            raise ConfigError(f"dslp_ranks must be a positive number of ranks, got {ranks!r}",
                              field="dslp_ranks")
        cuda = self.accel_device.kind == "cuda"
        if ranks is None:
            ranks = torch.cuda.device_count() if cuda else None
        if prefill_path == "dslp" and (ranks is None or ranks < 2):
            raise ConfigError("prefill_path='dslp' needs 2 or more ranks: " + (
                f"{ranks} GPU is visible" if cuda else "set dslp_ranks (the CPU device)"),
                field="dslp_ranks")
        if prefill_path not in ("auto", "dslp") or ranks is None or ranks < 2:
            return None
        return RankSpec(str(model_dir), ranks, "cuda" if cuda else "cpu", bandwidth)

    def _wants_worker(self, setting, experts):
        """prefill_worker: True / "on" (an error where it cannot run), "auto" (where it
        can: the CPU engine with its kernels and at least 2 CPUs), False / "off"."""
        if setting in (True, "on"):
            return True
        if setting in (False, "off", None):
            return False
        if setting != "auto":
            raise ConfigError(f"prefill_worker must be auto, on or off, got {setting!r}",
                              field="prefill_worker")
        if self.accel is not None:          # the hybrid engine: a thread on its own stream
            return self.accel_device.kind == "cuda"
        ok = self.device.type == "cpu" and experts != "torch" and \
            len(os.sched_getaffinity(0)) >= 2 and self.backends.experts.startswith("cpu")
        if not ok:
            log.info("prefill worker: off (it needs the CPU engine's kernels and 2 CPUs)")
        return ok

    def _start_prefill_thread(self):
        """The hybrid engine's prefill worker: a thread over the same model and KV cache
        (moed.engine.prefill_worker.PrefillThread)."""
        from moed.engine.prefill_worker import PrefillThread
        self.worker = PrefillThread(self.runner)
        self._replacement, self._restarting = None, False
        self.engine_cpus = self.worker_cpus = None      # the cores are not split
        self.backends.notes.append("prefill worker: a thread on its own device stream")
        log.info("prefill worker: a thread of the engine on its own %s stream",
                 self.accel_device.kind)

    def _start_worker(self, model_dir, num_blocks, block_size, dtype, experts, linears,
                      deterministic, worker_cpus=None):
        """The prefill worker on the last half of the CPUs, over a KV cache in shared
        memory -> the KV cache."""
        from moed.engine.kv_cache import allocate_kv_caches
        from moed.engine.prefill_worker import split_cpus
        if self.device.type != "cpu":
            raise ConfigError("the prefill worker process runs the CPU engine (the hybrid "
                              "engine's is a thread)", field="prefill_worker")
        cpus = os.sched_getaffinity(0)
        if worker_cpus is None and len(cpus) > 2:     # the planner's split: see decode_cpus
            from moed.engine.planner import decode_cpus, read_probe
            worker_cpus = len(cpus) - decode_cpus(read_probe(), len(cpus))
        mine, theirs = split_cpus(cpus, worker_cpus)
        kv = allocate_kv_caches(self.model, num_blocks, block_size, dtype, self.device,
                                shared=True)
        self._worker_args = (model_dir, kv, block_size, dtype, theirs,
                             dict(experts=experts, linears=linears, deterministic=deterministic))
        self.worker = PrefillWorker(*self._worker_args)
        self._replacement = None          # a restarted worker, once it is ready
        self._restarting = False
        self.engine_cpus, self.worker_cpus = mine, theirs
        self.threads_all = default_threads()
        self.backends.notes.append(f"prefill worker on CPUs {theirs}, decoding on {mine}")
        log.info("prefill worker (pid %d) on CPUs %s; decoding on %s", self.worker.process.pid,
                 theirs, mine)
        return kv

    def gpu_constants(self):
        """(MachineConstants with the GPU's figures, free device bytes), measured once."""
        if getattr(self, "_gpu", None) is None:
            self._gpu = with_gpu(MachineConstants.load(), self.device)
        return self._gpu

    def _per_token_s(self):
        """The cost model's time a prompt token adds to a step (the TPOT budget's seed)."""
        model = PrefillPlanner(MachineConstants.load(), ModelShape.of(self.model))
        return max((model.cpu_chunk_s(0, 257) - model.cpu_chunk_s(0, 1)) / 256, 1e-6)

    def _ring_budget(self):
        """What the stream-loading ring's length weighs: the largest chunk's tokens per
        expert, the measured link and GEMM speeds, a quarter of free device memory."""
        from moed.backends.accel.ring import RingBudget
        shape = ModelShape.of(self.model)
        consts, free = self.gpu_constants()
        if consts.h2d_bps is None or consts.gpu_flops is None or not shape.experts:
            return None
        chunk = max(slp_chunks(shape, free))
        return RingBudget(chunk * shape.active / shape.experts, consts.h2d_bps,
                          consts.gpu_flops, free // 4)

    def _planner(self, prefill_chunk, max_num_batched_tokens, fixed_budget, path="auto"):
        """The prefill planner, or None where max_num_batched_tokens fixes every step."""
        if prefill_chunk != "auto" and (isinstance(prefill_chunk, bool) or
                                        not isinstance(prefill_chunk, Integral) or
                                        prefill_chunk < 1):
            raise ConfigError(f"prefill_chunk must be 'auto' or a positive number of tokens, "
                              f"got {prefill_chunk!r}", field="prefill_chunk")
        if prefill_chunk == "auto" and fixed_budget and path == "auto":
            return None
        shape = ModelShape.of(self.model)
        constants = MachineConstants.load()
        if self.accel_device is not None and self.accel_device.kind == "cuda":
            constants, free = self.gpu_constants()
            chunks = slp_chunks(shape, free)
            group = self.accel.dslp if self.accel is not None else None
            if group is not None and group.broken is None:     # DSLP streams on every rank
                constants = dataclasses.replace(constants, num_gpus=group.spec.world_size)
        else:
            chunks = SLP_CHUNKS
        planner = PrefillPlanner(constants, shape, prefill_chunk,
                                 min_chunk=max_num_batched_tokens, path=path,
                                 slp_chunks=chunks)
        log.info("planner: %s", planner.summary())
        return planner

    def planner_summary(self):
        dbo, tpot = self.runner.dbo, self.scheduler.tpot
        tail = (f"; {dbo.summary()}" if dbo is not None else "") + \
            (f"; {tpot.summary()}" if tpot is not None else "")
        if self.planner is None:
            return (f"off: max_num_batched_tokens={self.scheduler.max_tokens} fixes every "
                    f"step{tail}")
        return self.planner.summary() + tail

    def _block_bytes(self, dtype):
        per_token = torch.Size(self.model.kv_token_shape()).numel() * dtype.itemsize
        return per_token * self.block_size * self.model.num_layers

    def _default_num_blocks(self, max_num_seqs, dtype):
        per_block = self._block_bytes(dtype)
        full = max_num_seqs * blocks_for(self.model.max_positions, self.block_size)
        return max(1, min(full, KV_BUDGET_BYTES // per_block))

    # -- requests
    def validate_prompt(self, prompt, params):
        """-> prompt token ids; raises InvalidRequestError naming the field."""
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt is empty", field="prompt")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = list(prompt)
            if not ids:
                raise InvalidRequestError("prompt is empty", field="prompt")
            V = self.model.vocab_size
            if set(map(type, ids)) != {int}:      # numpy integers too; never bools or floats
                kinds = [t for t in ids if isinstance(t, bool) or not isinstance(t, Integral)]
                if kinds:
                    raise InvalidRequestError(f"token_ids: {kinds[0]!r} is not an integer",
                                              field="token_ids")
                ids = [int(t) for t in ids]
            # the C-speed test first: a 100k-token prompt is checked on the engine thread
            if not (min(ids) >= 0 and max(ids) < V):
                bad = next(t for t in ids if not 0 <= t < V)
                raise InvalidRequestError(f"token_ids: {bad} is outside the vocabulary "
                                          f"[0, {V})", field="token_ids")
        params.validate()
        if params.stop and not self.tokenizer.has_text:
            self.tokenizer.refuse("stop strings")       # raises NoTokenizer
        ctx = self.model.max_positions
        if len(ids) >= ctx:
            raise InvalidRequestError(f"prompt has {len(ids)} tokens; the context is {ctx}",
                                      field="prompt")
        if len(ids) + params.max_new_tokens > ctx:
            raise InvalidRequestError(
                f"max_new_tokens={params.max_new_tokens}: prompt ({len(ids)} tokens) + "
                f"max_new_tokens exceeds the context length {ctx}", field="max_new_tokens")
        return ids

    def add_request(self, prompt, params, request_id=None):
        ids = self.validate_prompt(prompt, params)
        if request_id is None or request_id == "":
            request_id = f"req-{next(self._ids)}"
        if request_id in self.seqs:
            raise InvalidRequestError(f"request_id {request_id!r} is already in use",
                                      field="request_id")
        need = blocks_for(len(ids) + params.max_new_tokens, self.block_size)
        if need > self.blocks.num_blocks:
            raise CapacityError(f"the request needs {need} KV blocks; the cache has "
                                f"{self.blocks.num_blocks}")
        if not self.scheduler.can_add():
            raise CapacityError(f"the waiting queue is full ({self.scheduler.max_waiting})")
        seq = Sequence(request_id, ids, params, *(
            (IncrementalDetokenizer(self.tokenizer, ids), StopChecker(params.stop))
            if self.detokenize else ()))
        if self.planner is not None:
            seq.prefill_plan = self.planner.plan(len(ids))
            seq.prefill_chunk = seq.prefill_plan.chunk
            log.info("request %s: %d prompt tokens, prefill %s", request_id, len(ids),
                     seq.prefill_plan.summary())
        self.scheduler.add(seq)
        self.seqs[request_id] = seq
        return request_id

    def abort_request(self, request_id):
        seq = self.seqs.pop(request_id, None)
        if seq is None:
            return False
        if self.remote.get(request_id) is seq:      # its blocks are freed when the
            seq.finish_reason = "cancelled"         # worker is done writing them
            seq.status = Status.FINISHED
            return True
        self.scheduler.finish(seq)
        seq.finish_reason = "cancelled"
        return True

    def close(self):
        """Stop the prefill worker and the DSLP ranks (if any); the engine is not used
        after."""
        if self.accel is not None:
            self.accel.close()
        if self.worker is not None:
            self.worker.close()
        if self._replacement is not None:
            self._replacement.close()

    def has_unfinished(self):
        return self.scheduler.has_work() or bool(self.remote)

    # -- the prefill worker
    def _long(self, seq):
        """A prompt the worker takes: longer than the prompt tokens a step with decodes
        takes (the TPOT budget's, else max_num_batched_tokens), not begun here."""
        sched = self.scheduler
        room = sched.max_tokens if sched.tpot is None else \
            sched.tpot.budget(len(sched.running)) - len(sched.running)
        if seq.num_computed or seq.num_tokens <= max(room, 1):
            return False
        # what the prefix cache holds is not computed again (the lookup stops at its
        # first miss: a prompt never seen costs one hash)
        cached, _ = self.blocks.lookup(seq.token_ids, seq.num_tokens - 1)
        return seq.num_tokens - len(cached) * self.block_size > max(room, 1)

    def _waits_for_worker(self, seq):
        """While streams decode, a long prompt waits for the worker instead of sharing
        their steps (a worker that died is not waited for)."""
        return self._long(seq) and bool(self.scheduler.running) and self.worker.alive

    def _restart_worker(self):
        """A dead worker is replaced in the background (it loads the model: seconds); the
        engine keeps serving, long prompts prefilling here meanwhile."""
        if self._replacement is not None:
            old, self.worker, self._replacement = self.worker, self._replacement, None
            old.close()
            self._restarting = False
            log.info("prefill worker restarted (pid %d)", self.worker.process.pid)
            return
        if self._restarting or self.worker.alive or self.worker.busy is not None:
            return
        self._restarting = True
        log.warning("the prefill worker died: restarting it")

        def start():
            try:
                self._replacement = PrefillWorker(*self._worker_args)
            except Exception as e:        # noqa: BLE001 - tried again on a later step
                log.error("prefill worker restart failed: %s", e)
                self._restarting = False
        threading.Thread(target=start, name="moed-prefill-restart", daemon=True).start()

    def _offload(self):
        """Hand the oldest long waiting prompt to the idle worker while streams are
        decoding, when its blocks are free."""
        w, sched = self.worker, self.scheduler
        if w is not None:
            self._restart_worker()
            w = self.worker
        if w is None or w.busy is not None or not sched.running or not w.alive:
            return
        seq = next((s for s in sched.waiting if self._long(s)), None)
        if seq is None:
            return
        # the cached prefix is shared, as the scheduler's admission shares it; the
        # worker computes from the first uncached position
        shared, hashes = self.blocks.lookup(seq.token_ids, seq.num_tokens - 1)
        if not sched.claim(seq, shared, hashes, seq.num_tokens):
            return
        sched.waiting.remove(seq)
        first = len(shared) * self.blocks.block_size
        self.remote[seq.request_id] = seq
        w.submit(seq.request_id, seq.tokens(0, seq.num_tokens), seq.block_table,
                 seq.prefill_chunk or sched.max_tokens, seq.prefill_plan, first)
        if self.engine_cpus:
            set_threads(self.model, len(self.engine_cpus))

    def _collect(self, timeout=0.0):
        """The worker's finished prompt: it joins the running decodes with its first
        token sampled here -> [RequestOutput]."""
        if self.worker is None:
            return []
        done = self.worker.poll(timeout)
        if done is None:
            return []
        rid, result = done
        if self.engine_cpus:
            set_threads(self.model, self.threads_all)
        seq = self.remote.pop(rid)
        if seq.status is Status.FINISHED:           # cancelled meanwhile
            self.blocks.free(seq.block_table)
            return []
        if isinstance(result, Exception):
            return [self._fail(seq, result)]
        seq.num_computed = seq.num_tokens
        self.scheduler.register(seq)            # what the worker wrote is shareable now
        seq.status = Status.RUNNING
        self.scheduler.running.append(seq)
        return [self._postprocess_or_fail(seq, sample(result[None], [seq])[0])]

    def stats(self):
        return {"num_running": len(self.scheduler.running),
                "num_waiting": len(self.scheduler.waiting),
                "kv_blocks_used": self.blocks.num_used,
                "kv_blocks_total": self.blocks.num_blocks,
                "kv_blocks_cached": self.blocks.num_cached,
                "prefix_cache_queries": self.blocks.queries,
                "prefix_cache_hits": self.blocks.hits}

    # -- the step
    def step(self):
        outputs = self._collect()
        self._offload()
        chunks = self.scheduler.schedule()
        if not chunks:                 # only the worker's prompt in flight: wait for it
            return outputs + (self._collect(0.05) if self.remote else [])
        return outputs + self._step(chunks)

    def _step(self, chunks):
        due = [i for i, (seq, n) in enumerate(chunks) if seq.num_computed + n == seq.num_tokens]
        with self.runner.torch_threads(sum(n for _, n in chunks)):
            start = time.perf_counter()
            try:
                logits = self.runner.run(chunks, last_of=due)
            except Exception:
                return self._run_alone(chunks, due)
            if self.scheduler.tpot is not None:
                decodes = sum(1 for seq, n in chunks if n == 1 and seq.num_remaining == 1)
                self.scheduler.tpot.observe(decodes, sum(n for _, n in chunks) - decodes,
                                            time.perf_counter() - start)
            for seq, n in chunks:
                seq.num_computed += n
                self.scheduler.register(seq)
            seqs = [chunks[i][0] for i in due]
            sampled = sample(logits, seqs) if seqs else []
        return [self._postprocess_or_fail(seq, s) for seq, s in zip(seqs, sampled)]

    def _run_alone(self, chunks, due):
        """The batch's forward failed: run each chunk alone (re-writing its KV slots is
        harmless), so the request that breaks it fails and the others step on."""
        outputs = []
        for i, (seq, n) in enumerate(chunks):
            try:
                logits = self.runner.run([(seq, n)], last_of=[0] if i in due else [])
            except Exception as e:
                outputs.append(self._fail(seq, e))
                continue
            seq.num_computed += n
            self.scheduler.register(seq)
            if logits is not None:
                outputs.append(self._postprocess_or_fail(seq, sample(logits, [seq])[0]))
        return outputs

    def _postprocess_or_fail(self, seq, s):
        if isinstance(s, Exception):        # the sampler failed on this row's values
            return self._fail(seq, s)
        try:
            return self.postprocess(seq, s)
        except Exception as e:
            return self._fail(seq, e)

    def _fail(self, seq, error):
        """End one request with the error that hit it; the rest of the step is unharmed."""
        log.error("request %s failed in the step: %r", seq.request_id, error, exc_info=error)
        self.seqs.pop(seq.request_id, None)
        self.scheduler.finish(seq)
        seq.finish_reason = "error"
        return RequestOutput(seq.request_id, [], "", None, True, "error", len(seq.prompt_ids),
                             len(seq.output_ids), error=error,
                             num_cached_tokens=seq.num_cached_tokens)

    def _text(self, seq, token_id, reason):
        if seq.detokenizer is None:
            return "", False
        return next_text(seq.detokenizer, seq.stops, token_id, reason)

    def postprocess(self, seq, s):
        p = seq.params
        seq.output_ids.append(s.token_id)
        reason = None
        if s.token_id in p.stop_token_ids:
            reason = "stop_token"
        elif not p.ignore_eos and s.token_id in self.tokenizer.eos_token_ids:
            reason = "eos"
        if not reason and (len(seq.output_ids) >= p.max_new_tokens
                           or seq.num_tokens >= self.model.max_positions):
            reason = "length"
        text, hit = self._text(seq, s.token_id, reason)
        if hit:
            reason = "stop_sequence"
        if reason:
            self.seqs.pop(seq.request_id, None)
            self.scheduler.finish(seq)
            seq.finish_reason = reason
        seq.text += text
        logprobs = None if s.logprob is None else [(s.token_id, s.logprob, s.top)]
        return RequestOutput(seq.request_id, [s.token_id], text, logprobs, reason is not None,
                             reason, len(seq.prompt_ids), len(seq.output_ids),
                             num_cached_tokens=seq.num_cached_tokens)


def next_text(detokenizer, stops, token_id, reason):
    """One output token's text, stop strings cut -> (text, stop hit). A token that ends
    the request by itself (eos, stop token) adds no text."""
    delta = "" if reason in ("eos", "stop_token") else detokenizer.push(token_id)
    if reason:
        delta += detokenizer.flush()
    return stops.feed(delta, final=reason is not None)


def _isa_name():
    try:
        from moed.backends.cpu.isa import selected_isa
        return selected_isa()
    except Exception:   # the guard extension not built: report it, never fail a load on it
        return "unknown"
