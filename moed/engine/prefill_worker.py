"""A prefill worker: long prompts prefilled in a process of their own, on cores of
their own, into the engine's KV cache (shared memory), while the engine's steps keep
the running streams decoding.

    engine (decode)                          prefill worker (a process)
    blocks for the whole prompt  -- ids, block table, chunk -->  chunks into the shared
    decode steps, on the other cores                             KV cache
                                 <-- last position's logits --   (one at a time)
    samples the first token with the request's own sampler state; the sequence joins
    the decode steps

The worker maps the same packed stores (read-only files: the page cache holds one
copy of the weights whichever process reads them) and writes only the KV slots of
the blocks it was handed; the engine owns every block and frees them, so the
accounting stays in one place. The logits come back, not a token: the engine samples
with the sequence's generator and penalties as if it had prefilled itself, so the
output is the single engine's (the CPU kernels give the same bits on any thread
count and chunking).

Shape legend: L prompt tokens, V vocab.
"""
import logging
import os
import threading
from contextlib import nullcontext

import torch
import torch.multiprocessing as mp

from moed.errors import ConfigError, WorkerLostError

log = logging.getLogger("moed.prefill_worker")

READY_TIMEOUT_S = 600          # a worker loads the model (and opens the packed stores)


class PromptSlice:
    """What ModelRunner.prepare reads of a sequence, for a prompt alone."""

    def __init__(self, ids, block_table):
        self.ids, self.block_table, self.num_computed = ids, block_table, 0
        self.prefill_plan = None

    def tokens(self, first, end):
        return self.ids[first:end]


def worker_main(conn, model_dir, kv_caches, block_size, kv_dtype, cpus, backends,
                log_level=logging.INFO):
    """The worker process: load the model on `cpus`, then prefill what arrives (logging
    to the inherited stderr at the engine's level)."""
    from moed.config import LOG_FORMAT
    logging.basicConfig(level=log_level, format=LOG_FORMAT)
    os.sched_setaffinity(0, cpus)
    os.environ["MOED_THREADS"] = str(len(cpus))
    torch.set_num_threads(len(cpus))
    try:
        from moed.backends import install
        from moed.engine.model_runner import ModelRunner
        from moed.model.checkpoint import Checkpoint
        from moed.model.registry import load_model
        model = load_model(Checkpoint(model_dir), torch.device("cpu"))
        install(model, model_dir, **backends)
        runner = ModelRunner(model, 0, block_size, kv_dtype, kv_caches=kv_caches)
    except Exception as e:               # noqa: BLE001 - reported to the engine
        conn.send(("failed", repr(e)))
        return
    conn.send(("ready", os.getpid()))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):      # the engine is gone
            return
        if msg is None:
            return
        rid, ids, table, chunk, first = msg
        try:
            conn.send((rid, prefill(runner, PromptSlice(ids, table), chunk, first)))
        except Exception as e:           # noqa: BLE001 - fails this request only
            conn.send((rid, RuntimeError(f"prefill worker: {e}")))


def prefill(runner, seq, chunk, first=0):
    """A prompt (a PromptSlice) from position `first` (what comes before is in the KV
    cache: a cached prefix) through the runner in chunks -> the last position's
    logits [V]."""
    ids, logits = seq.ids, None
    assert 0 <= first < len(ids), (first, len(ids))
    with torch.inference_mode():
        for start in range(first, len(ids), chunk):
            n = min(chunk, len(ids) - start)
            seq.num_computed = start
            logits = runner.run([(seq, n)], last_of=[0] if start + n == len(ids) else [])
    return logits[0].clone()


class PrefillThread:
    """The hybrid engine's prefill worker: a thread of the engine process over the same
    model and KV cache on the device (one copy of the weights in device memory, no KV
    to move), on a CUDA stream of its own at the lowest priority, so that the decode
    steps' kernels (default stream) run between the prefill's. Its prompt takes the
    path its plan says (stream-loading prefill past the planner's crossover: all
    compute on the GPU while the decode steps' routed experts run on the CPU). The
    same interface as PrefillWorker; it cannot die (an error fails its prompt only).

    On the CPU device (the tests' twin) the device is the cores the steps use: the
    runner's forward lock lets one forward through at a time, so the prefill's
    chunks interleave with the decode steps instead of overlapping them."""

    def __init__(self, runner):
        self.runner = runner
        cuda = runner.device.type == "cuda"
        self.stream = torch.cuda.Stream(runner.device, priority=0) if cuda else None
        self.busy = None                 # the request id in flight, or None
        self._done = threading.Event()
        self._result = None
        self._thread = None

    def submit(self, request_id, ids, block_table, chunk, plan=None, first=0):
        assert self.busy is None
        self.busy, self._result = request_id, None
        self._done.clear()
        seq = PromptSlice(list(ids), list(block_table))
        seq.prefill_plan = plan
        self._thread = threading.Thread(target=self._run, args=(seq, int(chunk), first),
                                        name="moed-prefill", daemon=True)
        self._thread.start()

    def _run(self, seq, chunk, first):
        try:
            with torch.cuda.stream(self.stream) if self.stream is not None else nullcontext():
                logits = prefill(self.runner, seq, chunk, first)
                if self.stream is not None:      # its KV written before a decode reads it
                    self.stream.synchronize()
            self._result = logits
        except Exception as e:           # noqa: BLE001 - fails this request only
            log.exception("prefill thread")
            self._result = RuntimeError(f"prefill worker: {e}")
        self._done.set()

    def poll(self, timeout=0.0):
        if self.busy is None or not self._done.wait(timeout):
            return None
        self._thread.join()
        rid, self.busy = self.busy, None
        return rid, self._result

    @property
    def alive(self):
        return True

    def close(self):
        if self._thread is not None:
            self._thread.join()


class PrefillWorker:
    """The engine's side: one worker process, one prompt at a time."""

    def __init__(self, model_dir, kv_caches, block_size, kv_dtype, cpus, backends):
        self.cpus = sorted(cpus)
        self.conn, self.process, (status, detail) = spawn(
            worker_main, "moed-prefill-worker", True, "prefill_worker",
            str(model_dir), kv_caches, block_size, kv_dtype, self.cpus, backends)
        if status != "ready":
            raise ConfigError(f"the prefill worker failed to start: {detail}",
                              field="prefill_worker")
        self.busy = None                 # the request id in flight, or None

    def submit(self, request_id, ids, block_table, chunk, plan=None, first=0):
        """Prefill ids[first:] (before `first`: a cached prefix, in the KV cache);
        plan: unused (the CPU engine's worker has one path)."""
        assert self.busy is None
        self.busy = request_id
        self.conn.send((request_id, list(ids), list(block_table), int(chunk), int(first)))

    def poll(self, timeout=0.0):
        """-> (request id, logits [V] | Exception) when the prompt in flight is done,
        else None. A dead worker fails its prompt."""
        if self.busy is None:
            return None
        try:
            if not self.conn.poll(timeout):
                if not self.process.is_alive():
                    raise EOFError
                return None
            rid, result = self.conn.recv()
        except (EOFError, OSError):
            rid, result = self.busy, WorkerLostError(
                f"the prefill worker died (exit code {self.process.exitcode}) while "
                f"prefilling this request; it is restarted, retry the request")
        self.busy = None
        return rid, result

    @property
    def alive(self):
        return self.process.is_alive()

    def close(self):
        stop_process(self.conn, self.process, 5)


def spawn(target, name, daemon, field, *args, timeout=READY_TIMEOUT_S):
    """A worker process target(conn, *args, log level), started and waited for: ->
    (conn, process, its first message: ("ready", ...) or ("failed", why)). The process
    is stopped when it does not answer in time or exits instead (then "failed")."""
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    process = ctx.Process(target=target, name=name, daemon=daemon,
                          args=(child, *args, logging.getLogger().getEffectiveLevel()))
    process.start()
    child.close()
    try:
        if not conn.poll(timeout):
            raise ConfigError(f"{name} did not start in {timeout} s", field=field)
        first = conn.recv()
    except (EOFError, OSError):
        process.join(5)
        first = ("failed", f"it exited with code {process.exitcode} while starting")
    except ConfigError:
        stop_process(conn, process, 5)
        raise
    if first[0] != "ready":
        stop_process(conn, process, 5)
    return conn, process, first


def stop_process(conn, process, timeout):
    """Ask a worker process to stop (None on its pipe), kill it past `timeout` s."""
    try:
        conn.send(None)
    except (OSError, ValueError):
        pass
    process.join(timeout)
    if process.is_alive():
        process.kill()
        process.join()


def split_cpus(cpus, worker=None):
    """(engine's cores, the worker's) of the process affinity set: the worker takes the
    last `worker` (default: half, at least one), the engine keeps the rest (at least
    one) for decoding."""
    cpus = sorted(cpus)
    if len(cpus) < 2:
        raise ConfigError("a prefill worker needs at least 2 CPUs (one for decoding)",
                          field="prefill_worker")
    k = max(1, len(cpus) // 2) if worker is None else worker
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k < len(cpus):
        raise ConfigError(f"prefill_worker_cpus must be in [1, {len(cpus) - 1}] (the "
                          f"engine keeps one), got {k!r}", field="prefill_worker_cpus")
    return cpus[:-k], cpus[-k:]


def set_threads(model, n):
    """Every compiled-backend object of the model runs its calls on n threads (the
    kernels' pool uses its first n workers, pinned to the first n CPUs)."""
    seen, todo = set(), [model]
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, (list, tuple)):
            todo.extend(obj)
            continue
        if not type(obj).__module__.startswith("moed.") or not hasattr(obj, "__dict__"):
            continue
        if isinstance(getattr(obj, "threads", None), int) and not isinstance(obj.threads, bool):
            obj.threads = n
        todo.extend(v for v in vars(obj).values() if not isinstance(v, (int, float, str, bytes)))
