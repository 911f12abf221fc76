"""GenerationService: a thin adapter, protobuf -> Tracked -> engine loop -> protobuf.

No scheduling here: a handler validates, has the tokenizer pool tokenize,
submits, and relays its events. If the stream ends early (client cancel,
deadline, server stop), the `finally` aborts the request on the engine thread,
which frees its KV blocks at once.
"""
import contextlib
import uuid

import grpc
from opentelemetry import propagate

from moed.server import protocol, streams
from moed.server.auth import is_admin
from moed.server.gen import generation_pb2_grpc
from moed.server.status import RequestRejected, abort, invalid
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
        chat = protocol.is_chat(request)
        tracked = Tracked(request.request_id or new_request_id(), prompt, params,
                          trace_context=propagate.extract(dict(context.invocation_metadata())),
                          operation="chat" if chat else "text_completion")
        updates = streams.stream(self.app, tracked, split_reasoning=chat)
        async with contextlib.aclosing(updates):
            try:
                async for update in updates:
                    if not update.empty:
                        yield protocol.chunk_response(tracked.request_id, update)
                    if update.final is not None:
                        yield protocol.complete_response(tracked.request_id, update.final,
                                                         update.timing)
            except RequestRejected as r:
                await abort(context, self._labelled(r, request))

    @staticmethod
    def _labelled(r, request):
        """An engine field name -> the protobuf field path the client sent."""
        if not r.field:
            return r
        field = protocol.field_path(r.field, request)
        msg = str(r) if str(r).startswith(field) else f"{field}: {r}"
        code = grpc.StatusCode.ALREADY_EXISTS if field == "request_id" else r.code
        return RequestRejected(code, msg, field)

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
