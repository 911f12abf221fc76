"""The engine thread: the only code that touches LLMEngine.

LLMEngine is not thread-safe and `step()` is blocking CPU work, so one thread
owns it. Handlers on the asyncio loop send commands (add, abort, cancel) into a
queue; the thread applies them between steps, so new requests join the next
step (continuous batching), and pushes each step's outputs to the request's
sink on the loop with one call_soon_threadsafe per step.

    loop:  commands -> step -> track phases -> deliver -> publish snapshot
"""
import logging
import queue
import threading
import time
from dataclasses import dataclass

import grpc

from moed.errors import MoedError
from moed.server.status import RequestRejected, from_moed_error
from moed.server.throughput import TokenRate

log = logging.getLogger("moed.server")


@dataclass
class Event:
    """What a request's sink receives: an engine output, the final timing, or a failure."""
    output: object = None           # RequestOutput
    timing: object = None           # Timing, on the final event only
    error: Exception = None         # the engine failed under this request


@dataclass
class EndedOutput:
    """The last output of a request ended outside the engine's step (operator cancel);
    the same fields as the engine's RequestOutput."""
    request_id: str
    finish_reason: str
    num_prompt_tokens: int
    num_output_tokens: int
    new_token_ids: tuple = ()
    new_text: str = ""
    logprobs: list = None
    finished: bool = True


@dataclass
class Snapshot:
    """Published by the engine thread after every step; read by status RPCs."""
    stats: dict
    requests: list                  # [(request_id, state, prompt tokens, output tokens, t_arrival)]


class EngineLoop:
    def __init__(self, make_engine, loop, on_finish=None):
        self._make_engine = make_engine         # () -> LLMEngine, run on the engine thread
        self._loop = loop
        self._on_finish = on_finish or (lambda tracked: None)
        self._commands = queue.Queue()
        self._tracked = {}                      # request_id -> Tracked (engine thread only)
        self._thread = threading.Thread(target=self._run, name="moed-engine", daemon=True)
        self.engine = None
        self.loaded = threading.Event()         # set when the model loaded, or failed to
        self.load_error = None
        self.rate = TokenRate()
        self.requests_served = 0
        self.steps = 0                          # forward steps run (batching is visible in it)
        self.snapshot = Snapshot({"num_running": 0, "num_waiting": 0, "kv_blocks_used": 0,
                                  "kv_blocks_total": 0}, [])

    # -- called from the asyncio loop
    def start(self):
        self._thread.start()

    async def submit(self, tracked):
        """Admit a request; raises RequestRejected (engine validation, capacity)."""
        fut = self._loop.create_future()
        self._commands.put(("add", tracked, fut))
        return await fut

    def abort(self, tracked):
        """The client went away (cancel, deadline): free its blocks, deliver nothing more.
        Keyed by the Tracked itself, so a rejected duplicate id never aborts the original."""
        self._commands.put(("abort", tracked, None))

    async def cancel(self, request_id):
        """Operator cancel: free its blocks and end its stream as cancelled. -> found?"""
        fut = self._loop.create_future()
        self._commands.put(("cancel", request_id, fut))
        return await fut

    def stop(self, timeout=None):
        self._commands.put(("stop", None, None))
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- the engine thread
    def _run(self):
        try:
            self.engine = self._make_engine()
        except BaseException as e:     # reported by the server; the thread has nothing to do
            self.load_error = e
            self.loaded.set()
            return
        self._publish()
        self.loaded.set()
        while True:
            if not self._apply_commands(block=not self.engine.has_unfinished()):
                return
            if self.engine.has_unfinished():
                self._step()
            self._publish()

    def _apply_commands(self, block):
        """Apply every queued command (waiting for one when idle). -> False on stop."""
        try:
            cmd = self._commands.get(block=block)
        except queue.Empty:
            return True
        while cmd is not None:
            kind, arg, fut = cmd
            if kind == "stop":
                self._fail_all(RequestRejected(grpc.StatusCode.UNAVAILABLE,
                                               "the server is shutting down"))
                return False
            getattr(self, f"_cmd_{kind}")(arg, fut)
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                cmd = None
        return True

    def _cmd_add(self, tracked, fut):
        try:
            rid = self.engine.add_request(tracked.prompt, tracked.params,
                                          request_id=tracked.request_id or None)
        except MoedError as e:
            rejected = from_moed_error(e) or e
            self._loop.call_soon_threadsafe(_resolve, fut, None, rejected)
            return
        tracked.request_id = rid
        tracked.num_prompt_tokens = len(self.engine.seqs[rid].prompt_ids)
        self._tracked[rid] = tracked
        self._loop.call_soon_threadsafe(_resolve, fut, rid, None)

    def _cmd_abort(self, tracked, fut):
        if self._tracked.get(tracked.request_id) is not tracked:
            return                          # finished already, or never admitted
        del self._tracked[tracked.request_id]
        self.engine.abort_request(tracked.request_id)
        self._finish(tracked, "cancelled", deliver=False)

    def _cmd_cancel(self, request_id, fut):
        tracked = self._tracked.pop(request_id, None)
        found = self.engine.abort_request(request_id)
        if tracked is not None:
            self._finish(tracked, "cancelled", deliver=True)
        self._loop.call_soon_threadsafe(_resolve, fut, found, None)

    def _step(self):
        prefilling = [t for t in self._tracked.values() if t.t_first_token is None]
        t0 = time.time_ns()
        try:
            outputs = self.engine.step()
        except Exception as e:              # a bug under some request: fail them, keep serving
            log.exception("engine step failed")
            self._fail_all(e)
            return
        self.steps += 1
        self._track_prefill(prefilling, t0)
        batch = []
        for out in outputs:
            tracked = self._tracked.get(out.request_id)
            if tracked is None:
                continue
            batch.append((tracked.sink, self._account(tracked, out)))
        self.rate.add(sum(len(o.new_token_ids) for o in outputs))
        self._publish()         # before delivering: a client that saw its request end
        self._deliver(batch)    # must find its KV blocks freed in the status

    def _track_prefill(self, prefilling, t0):
        """Count the prompt chunks each still-prefilling request got this step."""
        for t in prefilling:
            seq = self.engine.seqs.get(t.request_id)
            computed = seq.num_computed if seq is not None else t.num_prompt_tokens
            if computed != t.computed:
                t.prefill_chunks += 1
                t.computed = computed
                if t.t_scheduled is None:
                    t.t_scheduled = t0

    def _account(self, tracked, out):
        now = time.time_ns()
        if tracked.t_first_token is None and out.new_token_ids:
            tracked.t_first_token = now
        tracked.num_output_tokens = out.num_output_tokens
        tracked.num_prompt_tokens = out.num_prompt_tokens or tracked.num_prompt_tokens
        if not out.finished:
            return Event(out)
        self._tracked.pop(out.request_id, None)
        return Event(out, self._finish(tracked, out.finish_reason, deliver=False))

    def _finish(self, tracked, reason, deliver):
        tracked.t_finished = time.time_ns()
        tracked.finish_reason = reason
        self.requests_served += 1
        timing = tracked.timing()
        try:
            self._on_finish(tracked)
        except Exception:                   # telemetry never takes a request down
            log.exception("recording request %s failed", tracked.request_id)
        if deliver:
            out = EndedOutput(tracked.request_id, reason, tracked.num_prompt_tokens,
                              tracked.num_output_tokens)
            self._deliver([(tracked.sink, Event(out, timing))])
        return timing

    def _fail_all(self, error):
        batch = []
        for rid, tracked in list(self._tracked.items()):
            if self.engine is not None:
                self.engine.abort_request(rid)
            batch.append((tracked.sink, Event(error=error)))
        self._tracked.clear()
        self._deliver(batch)

    def _deliver(self, batch):
        batch = [(sink, ev) for sink, ev in batch if sink is not None]
        if batch:
            self._loop.call_soon_threadsafe(_run_sinks, batch)

    def _publish(self):
        reqs = [(t.request_id, t.state, t.num_prompt_tokens, t.num_output_tokens, t.t_arrival)
                for t in self._tracked.values()]
        self.snapshot = Snapshot(self.engine.stats(), reqs)


def _resolve(fut, value, error):
    if fut.done():          # the handler was cancelled while the command was queued
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(value)


def _run_sinks(batch):
    for sink, event in batch:
        sink(event)
