"""The decode engine in a process of its own (`server.engine_process: true`): the gRPC
front end keeps no weights (the tokenizer only), the engine process holds the model
and the KV cache and runs the steps, and its prefill worker (if any) is its child.

RemoteEngine stands in for LLMEngine on the server's engine thread: every call is one
message over a pipe (add, abort, step, stats), answered in order. A step's answer
carries its outputs and what the server tracks of each request (how much of its
prompt is computed, whether the prefill worker holds it). An engine process that dies
fails the requests it held with UNAVAILABLE (WorkerLostError); the next request
starts a new one (the model loads again), so the daemon keeps serving.
"""
import logging
import os
from dataclasses import dataclass

from moed.engine.prefill_worker import spawn, stop_process
from moed.errors import ConfigError, MoedError, WorkerLostError

log = logging.getLogger("moed.server.engine_process")

READY_TIMEOUT_S = 900


def engine_main(conn, model_dir, kwargs, log_level=logging.INFO):
    """The engine process: build the engine, then answer the front end's calls. It logs
    to the daemon's stderr (inherited) at the daemon's level."""
    from moed.config import LOG_FORMAT
    from moed.engine.llm_engine import LLMEngine
    logging.basicConfig(level=log_level, format=LOG_FORMAT)
    try:
        engine = LLMEngine(model_dir, **kwargs)
    except BaseException as e:           # noqa: BLE001 - reported to the front end
        conn.send(("failed", e if isinstance(e, MoedError) else RuntimeError(repr(e))))
        return
    conn.send(("ready", engine.model_info))
    try:
        while True:
            try:
                cmd = conn.recv()
            except (EOFError, OSError):
                return
            if cmd is None:
                return
            try:
                conn.send(("ok", answer(engine, cmd)))
            except Exception as e:       # noqa: BLE001 - the call's own failure
                conn.send(("error", e if isinstance(e, MoedError) else RuntimeError(repr(e))))
    finally:
        engine.close()


def answer(engine, cmd):
    kind, args = cmd[0], cmd[1:]
    if kind == "add":
        rid = engine.add_request(*args)
        seq = engine.seqs[rid]
        plan = seq.prefill_plan
        return rid, len(seq.prompt_ids), (plan.summary(), plan.path) if plan is not None else None
    if kind == "abort":
        return engine.abort_request(*args)
    if kind == "step":
        outputs = engine.step()
        worker = engine.worker.alive if engine.worker is not None else None
        return (outputs, engine.has_unfinished(),
                {rid: seq.num_computed for rid, seq in engine.seqs.items()},
                set(engine.remote), worker)
    if kind == "stats":
        return engine.stats()
    raise ValueError(f"unknown engine call {kind!r}")


@dataclass
class SeqView:
    """What the server reads of a request's sequence, as of the last step."""
    prompt_ids: range
    num_computed: int = 0
    prefill_plan: object = None


@dataclass
class PlanView:
    text: str
    path: str

    def summary(self):
        return self.text


@dataclass
class WorkerView:
    alive: bool


class RemoteEngine:
    """LLMEngine's calls the server makes, answered by the engine process."""

    def __init__(self, model_dir, kwargs):
        from moed.model.tokenizer import Tokenizer
        self.model_dir, self.kwargs = str(model_dir), dict(kwargs, detokenize=False)
        self.tokenizer = Tokenizer.from_dir(model_dir)
        self.detokenize = False
        self.seqs, self.remote, self.worker = {}, set(), None
        self._unfinished = False
        self._pending = None             # a loss the next step reports
        self.process = self.conn = None
        self.model_info = self._start()

    def _start(self):
        # not a daemonic process: it has a child of its own (the prefill worker)
        self.conn, self.process, (status, detail) = spawn(
            engine_main, "moed-engine", False, "engine_process", self.model_dir, self.kwargs,
            timeout=READY_TIMEOUT_S)
        if status != "ready":
            self.process = None
            raise detail if isinstance(detail, BaseException) else \
                ConfigError(f"the engine process failed to start: {detail}",
                            field="engine_process")
        info = dict(detail, engine_process=self.process.pid)
        log.info("engine process (pid %d) ready", self.process.pid)
        return info

    def _recv(self):
        try:
            return self.conn.recv()
        except (EOFError, OSError):
            raise self._lost() from None

    def _lost(self):
        """The engine process is gone: -> the error its requests fail with, also kept
        for the next step to raise wherever the loss was seen (a stats call, say), so
        that the server fails the requests it held."""
        if self.process is not None:
            self.process.join(5)
        code = self.process.exitcode if self.process is not None else None
        self.seqs, self.remote, self._unfinished = {}, set(), False
        self.process = None
        self._pending = WorkerLostError(f"the engine process died (exit code {code}) under "
                                        f"this request; it is restarted, retry the request")
        return self._pending

    def _call(self, *cmd):
        if self.process is None:                   # died before: a new one (loads again)
            self.model_info = self._start()
        try:
            self.conn.send(cmd)
        except (OSError, ValueError):
            raise self._lost() from None
        status, value = self._recv()
        if status == "error":
            raise value
        return value

    # -- what the server calls
    def add_request(self, prompt, params, request_id=None):
        rid, n, plan = self._call("add", prompt, params, request_id)
        self.seqs[rid] = SeqView(range(n), 0, PlanView(*plan) if plan else None)
        self._unfinished = True
        return rid

    def abort_request(self, request_id):
        if self.process is None:
            return self.seqs.pop(request_id, None) is not None
        try:
            found = self._call("abort", request_id)
        except WorkerLostError:                # the next step fails what it held
            found = False
        self.seqs.pop(request_id, None)
        return found

    def step(self):
        if self._pending is not None:
            err, self._pending = self._pending, None
            raise err
        try:
            outputs, self._unfinished, computed, self.remote, worker = self._call("step")
        except WorkerLostError:
            self._pending = None               # raised here: reported once
            raise
        for rid, n in computed.items():
            if rid in self.seqs:
                self.seqs[rid].num_computed = n
        for rid in set(self.seqs) - set(computed):
            del self.seqs[rid]
        self.worker = None if worker is None else WorkerView(worker)
        return outputs

    def has_unfinished(self):
        return self._unfinished or self._pending is not None

    def stats(self):
        """The engine's counters; zeros while there is no engine process (never raises:
        the server publishes them after every step)."""
        if self.process is not None:
            try:
                return self._call("stats")
            except WorkerLostError:
                pass
        return {"num_running": 0, "num_waiting": 0, "kv_blocks_used": 0, "kv_blocks_total": 0}

    def close(self):
        if self.process is not None:
            stop_process(self.conn, self.process, 10)
            self.process = None


def engine_pid(engine):
    """The engine process's pid, or this process's when the engine runs here."""
    return engine.process.pid if isinstance(engine, RemoteEngine) and engine.process \
        else os.getpid()
