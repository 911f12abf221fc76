"""One request's stream, for any front end (gRPC Generate, the HTTP API).

    admit -> [engine events -> Update (text split into reasoning and answer)]* -> end

The front ends validate and tokenize in their own terms, then iterate `stream()`;
whatever ends the iteration early (the client went away, a deadline, the server
stopping) aborts the request on the engine thread, which frees its KV blocks at once.
"""
import asyncio
from dataclasses import dataclass, field

import grpc

from moed.engine.reasoning import ReasoningSplitter, opens_in_reasoning
from moed.errors import MoedError
from moed.server.status import RequestRejected, from_moed_error


@dataclass
class Update:
    """What a request produced since the previous update."""
    token_ids: list = field(default_factory=list)
    text: str = ""                  # answer text delta (stop strings cut)
    reasoning: str = ""             # reasoning text delta (chat replies of reasoning models)
    logprobs: list = field(default_factory=list)    # [(token id, logprob, [(id, logprob)])]
    final: object = None            # the last engine output (finish reason, usage), at the end
    timing: object = None           # Timing, at the end

    @property
    def empty(self):
        return not (self.token_ids or self.text or self.reasoning)


async def stream(app, tracked, split_reasoning=False):
    """Admit `tracked` and yield its Updates, the first (empty) once it is admitted; raises
    RequestRejected (admission, or the request's failure in the engine).
    `split_reasoning`: a chat reply of a model with <think> tags (app.reasoning_tags)."""
    events = asyncio.Queue()
    tracked.sink = events.put_nowait
    tags = app.reasoning_tags if split_reasoning else None
    splitter = ReasoningSplitter(opens_in_reasoning(tracked.prompt, tags)) if tags else None
    finished = False
    async with app.stream_slot():
        try:
            await app.engine_loop.submit(tracked)
            yield Update()                      # admitted: the front end may answer now
            while not finished:
                batch = [await events.get()]
                while not events.empty():
                    batch.append(events.get_nowait())
                failed = next((ev.error for ev in batch if ev.error is not None), None)
                if failed is not None:
                    raise as_rejection(failed)
                update = merge(batch, splitter)
                finished = update.final is not None
                yield update
        finally:
            if not finished:
                app.engine_loop.abort(tracked)


def merge(batch, splitter):
    """Engine events since the last update -> one Update."""
    update = Update()
    for ev in batch:
        out = ev.output
        update.token_ids.extend(out.new_token_ids)
        update.text += out.new_text
        update.logprobs.extend(out.logprobs or ())
        if out.finished:
            update.final, update.timing = out, ev.timing
    if splitter is not None:
        update.reasoning, update.text = splitter.feed(update.text,
                                                      final=update.final is not None)
    return update


def as_rejection(error):
    """A request's failure in the engine -> RequestRejected (a bug: INTERNAL, said
    without details; they are in the server's log)."""
    if isinstance(error, MoedError):
        error = from_moed_error(error) or error
    if isinstance(error, RequestRejected):
        return error
    return RequestRejected(grpc.StatusCode.INTERNAL, "the engine failed while running this "
                           f"request ({type(error).__name__}); other requests are unaffected")
