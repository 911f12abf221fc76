"""Detokenization and stop strings on their own thread, between the engine thread
and the event loop.

The engine steps on token ids alone (LLMEngine(detokenize=False)); this thread
turns each step's ids into text deltas and cuts them at the first stop string.
A stop decision can lag the engine by a step or two: the tokens generated past
a stop are dropped here, so no text past a stop ever goes out, and the engine
thread is told to end the request (it frees the KV blocks, then sends the
final message).

    engine thread -> put(batch) -> [detokenize, cut at stops] -> event loop sinks
"""
import logging
import queue
import threading
from dataclasses import replace

from moed.engine.llm_engine import next_text
from moed.engine.stops import StopChecker
from moed.model.tokenizer import IncrementalDetokenizer

log = logging.getLogger("moed.server")


class TextStage:
    def __init__(self, loop, tokenizer, on_stop):
        self._loop = loop
        self._tokenizer = tokenizer         # None: the engine writes the text itself
        self._on_stop = on_stop             # (tracked) -> None: end it on the engine thread
        self._queue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="moed-text", daemon=True)

    def start(self):
        self._thread.start()

    def put(self, batch):
        """[(tracked, Event)] in step order -> their sinks on the event loop."""
        self._queue.put(batch)

    def stop(self, timeout=None):
        self._queue.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self):
        while (batch := self._queue.get()) is not None:
            out, stopped = [], []
            for tracked, event in batch:
                try:
                    event = self._text(tracked, event, stopped)
                except Exception as e:          # one request's text: it fails alone
                    log.exception("detokenizing request %s failed", tracked.request_id)
                    event = replace(event, output=None, error=e)
                if event is not None and tracked.sink is not None:
                    out.append((tracked.sink, event))
            if out:
                self._loop.call_soon_threadsafe(run_sinks, out)
            for tracked in stopped:             # after the cut text is on its way
                self._on_stop(tracked)

    def _text(self, tracked, event, stopped):
        """The event with its text, cut at a stop string; None: nothing to send."""
        out = event.output
        if self._tokenizer is None or out is None:
            return event
        if tracked.stopped_at is not None:      # past its stop: only its end goes out
            if not out.finished:
                return None
            return replace(event, output=replace(out, new_token_ids=(), new_text="",
                                                 logprobs=None, finish_reason="stop_sequence",
                                                 num_output_tokens=tracked.stopped_at))
        if tracked.detokenizer is None:
            tracked.detokenizer = IncrementalDetokenizer(self._tokenizer, tracked.prompt)
            tracked.stops = StopChecker(tracked.params.stop)
        reason = out.finish_reason if out.finished else None
        text = ""
        for i, token_id in enumerate(out.new_token_ids):
            last = i == len(out.new_token_ids) - 1
            delta, hit = next_text(tracked.detokenizer, tracked.stops, token_id,
                                   reason if last else None)
            text += delta
            if hit:
                tracked.stopped_at = out.num_output_tokens - len(out.new_token_ids) + i + 1
                cut = dict(new_token_ids=out.new_token_ids[:i + 1], new_text=text,
                           logprobs=out.logprobs[:i + 1] if out.logprobs else out.logprobs)
                if not out.finished:
                    stopped.append(tracked)
                    return replace(event, output=replace(out, **cut))
                return replace(event, output=replace(out, **cut, finish_reason="stop_sequence",
                                                     num_output_tokens=tracked.stopped_at))
        if out.finished and not out.new_token_ids and reason not in (None, "error"):
            text = tracked.stops.feed(tracked.detokenizer.flush(), final=True)[0]
        return replace(event, output=replace(out, new_text=text))


def run_sinks(batch):
    for sink, event in batch:
        sink(event)
