"""The engine thread: the only code that touches LLMEngine.

LLMEngine is not thread-safe and `step()` is blocking CPU work, so one thread
owns it. Handlers on the asyncio loop send commands (add, abort, cancel) into a
queue; the thread applies them between steps, so new requests join the next
step (continuous batching), and hands each step's outputs to the text stage
(text_stage.py: detokenization and stop strings on their own thread), which
pushes them to the requests' sinks on the loop.

    loop:  commands -> step -> track phases -> publish snapshot -> deliver

What goes wrong under one request fails that request: a bad admission, a step
that breaks on its values. If the thread dies anyway, every waiting call gets
UNAVAILABLE, later ones too, and `on_dead` tells the server (health NOT_SERVING).
"""
import logging
import queue
import threading
import time
from dataclasses import dataclass

import grpc

from moed.errors import MoedError
from moed.server.status import RequestRejected, from_moed_error
from moed.server.text_stage import TextStage, run_sinks
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
    def __init__(self, make_engine, loop, on_finish=None, on_dead=None, on_worker=None):
        self._make_engine = make_engine         # () -> LLMEngine, run on the engine thread
        self._loop = loop
        self._on_finish = on_finish or (lambda tracked: None)
        self._on_dead = on_dead or (lambda error: None)     # run on the loop
        # (which, up) of the engine's worker processes, on the loop: which is "prefill"
        # (the prefill worker) or "engine" (the engine process)
        self._on_worker = on_worker or (lambda which, up: None)
        self._up = {}
        self._commands = queue.Queue()
        self._lock = threading.Lock()           # submit checks `dead` and queues in one step
        self.dead = None                        # what killed the engine thread
        self.text = None                        # TextStage, once the engine is loaded
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
        self._put(("add", tracked, fut))
        return await fut

    def _put(self, cmd):
        with self._lock:
            if self.dead is not None:
                raise dead_engine(self.dead)
            self._commands.put(cmd)

    def abort(self, tracked):
        """The client went away (cancel, deadline): free its blocks, deliver nothing more.
        Keyed by the Tracked itself, so a rejected duplicate id never aborts the original."""
        with self._lock:
            self._commands.put(("abort", tracked, None))

    async def cancel(self, request_id):
        """Operator cancel: free its blocks and end its stream as cancelled. -> found?"""
        fut = self._loop.create_future()
        self._put(("cancel", request_id, fut))
        return await fut

    def stop(self, timeout=None):
        self._commands.put(("stop", None, None))
        if self._thread.is_alive():
            self._thread.join(timeout)
        if self.text is not None:
            self.text.stop(timeout)

    # -- the engine thread
    def _run(self):
        try:
            self.engine = self._make_engine()
        except BaseException as e:     # reported by the server; the thread has nothing to do
            self.load_error = e
            self.loaded.set()
            return
        detokenizes = getattr(self.engine, "detokenize", True)
        self.text = TextStage(self._loop, None if detokenizes else self.engine.tokenizer,
                              on_stop=self._stopped_by_text)
        self.text.start()
        self._publish()
        self.loaded.set()
        try:
            while True:
                if not self._apply_commands(block=not self.engine.has_unfinished()):
                    return
                if self.engine.has_unfinished():
                    self._step()
                self._publish()
        except BaseException as e:
            log.exception("the engine thread died")
            self._die(e)
        finally:
            close = getattr(self.engine, "close", None)
            if close is not None:          # its worker processes, if any
                close()

    def _die(self, error):
        """No engine any more: fail what is in flight and what is queued, refuse the rest."""
        with self._lock:
            self.dead = error
        rejected = dead_engine(error)
        batch = [(t, Event(error=rejected)) for t in self._tracked.values()]
        self._tracked.clear()
        self._deliver(batch)
        while True:
            try:
                _, _, fut = self._commands.get_nowait()
            except queue.Empty:
                break
            if fut is not None:
                self._loop.call_soon_threadsafe(_resolve, fut, None, rejected)
        self._loop.call_soon_threadsafe(self._on_dead, error)

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
            try:
                getattr(self, f"_cmd_{kind}")(arg, fut)
            except Exception as e:      # a bug under one command: it fails, the thread goes on
                log.exception("engine command %s failed", kind)
                if fut is not None:
                    self._loop.call_soon_threadsafe(_resolve, fut, None, RequestRejected(
                        grpc.StatusCode.INTERNAL, f"the server failed to {kind} the request "
                        f"({type(e).__name__}); it keeps serving the others"))
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                cmd = None
        return True

    def _cmd_add(self, tracked, fut):
        try:
            rid = self.engine.add_request(tracked.prompt, tracked.params,
                                          request_id=tracked.request_id or None)
        except Exception as e:
            rejected = from_moed_error(e) if isinstance(e, MoedError) else None
            if rejected is None:            # a bug admitting this one: it fails, not the thread
                log.exception("admitting request %s failed", tracked.request_id)
                if tracked.request_id not in self._tracked:
                    self.engine.abort_request(tracked.request_id)
                rejected = RequestRejected(grpc.StatusCode.INTERNAL, "the server failed to "
                                           f"admit the request ({type(e).__name__}); it keeps "
                                           "serving the others")
            self._loop.call_soon_threadsafe(_resolve, fut, None, rejected)
            return
        self._tracked[rid] = tracked
        tracked.request_id = rid
        seq = self.engine.seqs[rid]
        tracked.num_prompt_tokens = len(seq.prompt_ids)
        if seq.prefill_plan is not None:
            tracked.prefill_plan = seq.prefill_plan.summary()
            tracked.prefill_path = seq.prefill_plan.path
        self._loop.call_soon_threadsafe(_resolve, fut, rid, None)

    def _cmd_abort(self, tracked, fut):
        if self._tracked.get(tracked.request_id) is not tracked:
            return                          # finished already, or never admitted
        del self._tracked[tracked.request_id]
        self.engine.abort_request(tracked.request_id)
        self._finish(tracked, "cancelled", deliver=False)

    def _stopped_by_text(self, tracked):
        """The text stage cut `tracked` at a stop string (on its thread)."""
        with self._lock:
            self._commands.put(("stopped", tracked, None))

    def _cmd_stopped(self, tracked, fut):
        if self._tracked.get(tracked.request_id) is not tracked:
            return                          # it ended in the engine meanwhile: the stage saw it
        del self._tracked[tracked.request_id]
        self.engine.abort_request(tracked.request_id)
        tracked.num_output_tokens = tracked.stopped_at
        self._publish()
        self._finish(tracked, "stop_sequence", deliver=True, through_text=False)

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
            self._watch_worker()
            return
        self.steps += 1
        self._watch_worker()
        self._track_prefill(prefilling, t0)
        batch = []
        for out in outputs:
            tracked = self._tracked.get(out.request_id)
            if tracked is None:
                continue
            batch.append((tracked, self._account(tracked, out)))
        self.rate.add(sum(len(o.new_token_ids) for o in outputs))
        self._publish()         # before delivering: a client that saw its request end
        self._deliver(batch)    # must find its KV blocks freed in the status

    def _watch_worker(self):
        """Tell the server when a worker process goes down or comes back."""
        worker = getattr(self.engine, "worker", None)
        states = {"prefill": None if worker is None else worker.alive}
        if hasattr(self.engine, "process"):            # the engine in a process of its own
            states["engine"] = self.engine.process is not None and self.engine.process.is_alive()
        for which, up in states.items():
            if up is not None and up != self._up.get(which):
                self._up[which] = up
                self._loop.call_soon_threadsafe(self._on_worker, which, up)

    def _track_prefill(self, prefilling, t0):
        """Count the prompt chunks each still-prefilling request got this step."""
        remote = getattr(self.engine, "remote", {})
        for t in prefilling:
            seq = self.engine.seqs.get(t.request_id)
            if t.request_id in remote and t.t_scheduled is None:    # handed to the worker
                t.t_scheduled, t.prefill_where = t0, "prefill worker"
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
        tracked.num_cached_tokens = getattr(out, "num_cached_tokens", 0)
        if not out.finished:
            return Event(out)
        self._tracked.pop(out.request_id, None)
        timing = self._finish(tracked, out.finish_reason, deliver=False)
        if getattr(out, "error", None) is not None:
            return Event(error=out.error)
        return Event(out, timing)

    def _finish(self, tracked, reason, deliver, through_text=True):
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
            self._deliver([(tracked, Event(out, timing))], through_text)
        return timing

    def _fail_all(self, error):
        batch = []
        for rid, tracked in list(self._tracked.items()):
            if self.engine is not None:
                self.engine.abort_request(rid)
            batch.append((tracked, Event(error=error)))
        self._tracked.clear()
        self._deliver(batch)

    def _deliver(self, batch, through_text=True):
        """[(tracked, Event)] -> the sinks: through the text stage, or straight to the loop
        (the end of a request the text stage already cut)."""
        if not batch:
            return
        if through_text and self.text is not None:
            self.text.put(batch)
            return
        sinks = [(t.sink, ev) for t, ev in batch if t.sink is not None]
        if sinks:
            self._loop.call_soon_threadsafe(run_sinks, sinks)

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


def dead_engine(error):
    return RequestRejected(grpc.StatusCode.UNAVAILABLE,
                           f"the engine stopped ({type(error).__name__}); this server cannot "
                           "generate any more: retry on another")
