"""GenerationService: a thin adapter, protobuf -> Tracked -> engine loop -> protobuf.

No scheduling here: a handler validates, has the tokenizer pool tokenize,
submits, and relays its events. If the stream ends early (client cancel,
deadline, server stop), the `finally` aborts the request on the engine thread,
which frees its KV blocks at once.
"""
import asyncio
import uuid

import grpc
from opentelemetry import propagate

from moed.errors import MoedError
from moed.server import protocol
from moed.server.auth import is_admin
from moed.server.gen import generation_pb2_grpc
from moed.server.status import RequestRejected, abort, from_moed_error, invalid
from moed.server.tracked import Tracked


def new_request_id():
    return f"req-{uuid.uuid4().hex[:16]}"


class GenerationServicer(generation_pb2_grpc.GenerationServiceServicer):
    def __init__(self, app):
        self.app = app          # MoedServer: config, engine loop, admission state

    async def Generate(self, request, context):
        engine = await self.app.require_serving(context)
        ctx = engine.model_info["context_length"]
        try:
            protocol.check_request(request, self.app.cfg, engine.model_info["vocab_size"], ctx)
            params = protocol.sampling_params(request)
            prompt = await protocol.prompt_ids(request, self.app.tokenizers, ctx)
            protocol.fit_max_new_tokens(params, request, len(prompt), ctx)
        except RequestRejected as r:
            await abort(context, r)
        events = asyncio.Queue()
        tracked = Tracked(request.request_id or new_request_id(), prompt, params,
                          sink=events.put_nowait,
                          trace_context=propagate.extract(dict(context.invocation_metadata())))
        finished = False
        async with self.app.stream_slot():
            try:
                await self._admit(tracked, request, context)
                async for message in self._relay(tracked.request_id, events, context):
                    finished = message.HasField("complete")
                    yield message
            finally:
                if not finished:
                    self.app.engine_loop.abort(tracked)

    async def _admit(self, tracked, request, context):
        try:
            await self.app.engine_loop.submit(tracked)
        except RequestRejected as r:
            if r.field:
                field = protocol.field_path(r.field, request)
                msg = str(r) if str(r).startswith(field) else f"{field}: {r}"
                code = grpc.StatusCode.ALREADY_EXISTS if field == "request_id" else r.code
                r = RequestRejected(code, msg, field)
            await abort(context, r)

    async def _relay(self, request_id, events, context):
        """Events -> messages; whatever queued up while we were busy goes out as one chunk."""
        while True:
            batch = [await events.get()]
            while not events.empty():
                batch.append(events.get_nowait())
            failed = next((ev.error for ev in batch if ev.error is not None), None)
            if failed is not None:
                await self._fail(context, failed)
            chunk = protocol.chunk_response(request_id, [ev.output for ev in batch])
            if chunk is not None:
                yield chunk
            last = batch[-1]
            if last.output.finished:
                yield protocol.complete_response(request_id, last.output, last.timing)
                return

    async def _fail(self, context, error):
        if isinstance(error, MoedError):        # the request's own failure, said plainly
            error = from_moed_error(error) or error
        if isinstance(error, RequestRejected):
            await abort(context, error)
        # a bug, not the client's doing; the details (paths, values) are in the server's log
        await context.abort(grpc.StatusCode.INTERNAL, "the engine failed while running this "
                            f"request ({type(error).__name__}); other requests are unaffected")

    async def Tokenize(self, request, context):
        await self.app.require_loaded(context)
        if len(request.text) > self.app.cfg.max_prompt_chars:
            await abort(context, invalid("text", f"longer than "
                                                  f"{self.app.cfg.max_prompt_chars} characters"))
        try:
            return await self.app.tokenizers.tokenize(request.text, request.add_special_tokens)
        except RequestRejected as r:
            await abort(context, r)

    async def GetModelInfo(self, request, context):
        engine = await self.app.require_loaded(context)
        admin = is_admin(context.invocation_metadata(), self.app.cfg.admin_token)
        return protocol.model_info_response(engine.model_info,
                                            self.app.model_dir if admin else None)
