"""The OpenAI-compatible HTTP API, /health and Prometheus /metrics: FastAPI on uvicorn,
served in the daemon's own event loop beside gRPC, over the same engine loop,
admission, limits, drain and cancellation (a dropped connection aborts its request
and frees its KV blocks at once).

    POST /v1/completions        POST /v1/chat/completions      (SSE when stream: true)
    GET  /v1/models             GET  /v1/models/{id}
    GET  /health                GET  /metrics                   (always open)

The /v1 endpoints need `Authorization: Bearer <server.api_key>` when a key is set;
bound beyond loopback the daemon refuses to start without one.
"""
import asyncio
import contextlib
import json
import logging
import secrets
import socket
import uuid

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from opentelemetry import propagate
from starlette.exceptions import HTTPException

from moed.errors import ConfigError
from moed.server import openai_protocol as oai
from moed.server.app import is_loopback
from moed.server import streams
from moed.server.status import RequestRejected
from moed.server.tracked import Tracked

log = logging.getLogger("moed.server")
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"


def required_key(cfg):
    """The bearer token the /v1 endpoints need (None: open); ConfigError when bound beyond
    loopback without one."""
    if cfg.api_key is None and not is_loopback(cfg.http_host):
        raise ConfigError(f"server.api_key: the HTTP API on {cfg.http_host} needs a bearer "
                          "token (set server.api_key or MOED_API_KEY), or bind "
                          "server.http_host to 127.0.0.1", field="server.api_key")
    return cfg.api_key


def build_app(server):
    """The FastAPI application over a MoedServer."""
    api = OpenAIHandlers(server)
    app = FastAPI(title="moed", docs_url=None, redoc_url=None)
    app.add_exception_handler(oai.APIError, _api_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
    auth = [Depends(api.authorize)]
    app.post("/v1/completions", dependencies=auth)(api.completions)
    app.post("/v1/chat/completions", dependencies=auth)(api.chat_completions)
    app.get("/v1/models", dependencies=auth)(api.models)
    app.get("/v1/models/{model_id:path}", dependencies=auth)(api.model)
    app.get("/health")(api.health)
    app.get("/metrics")(api.metrics)
    return app


async def _api_error(request, exc):
    return JSONResponse(exc.body(), status_code=exc.status)


async def _validation_error(request, exc):
    first = exc.errors()[0] if exc.errors() else {}
    if first.get("type") == "json_invalid":
        message = f"the request body is not valid JSON ({first.get('ctx', {}).get('error')})"
        return JSONResponse(oai.APIError(400, message).body(), status_code=400)
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    message = first.get("msg", "invalid request body")
    if param is None and first.get("type") == "model_attributes_type":
        message = "the request body must be a JSON object (Content-Type: application/json)"
    return JSONResponse(oai.APIError(400, f"{param}: {message}" if param else message,
                                     param=param).body(), status_code=400)


async def _http_error(request, exc):
    type_ = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return JSONResponse(oai.APIError(exc.status_code, str(exc.detail), type_).body(),
                        status_code=exc.status_code)


async def _unexpected(request, exc):
    log.error("HTTP %s %s failed: %r", request.method, request.url.path, exc, exc_info=exc)
    return JSONResponse(oai.APIError(500, f"the server failed on this request "
                                          f"({type(exc).__name__})", "server_error").body(),
                        status_code=500)


class OpenAIHandlers:
    def __init__(self, server):
        self.server = server                    # MoedServer
        self.key = required_key(server.cfg)

    # -- open endpoints
    async def health(self):
        s = self.server
        if s.engine_loop is None or s.engine_loop.dead is not None:
            return JSONResponse({"status": "stopped"}, status_code=503)
        if not s.ready:
            return JSONResponse({"status": "loading"}, status_code=503)
        if s.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return {"status": "ok"}

    async def metrics(self):
        return Response(self.server.telemetry.prometheus_text(), media_type=PROMETHEUS_TEXT)

    # -- /v1
    async def authorize(self, request: Request):
        if self.key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(),
                                                                     self.key.encode()):
            raise oai.APIError(401, "a valid API key is needed (Authorization: Bearer <key>)",
                               "authentication_error", code="invalid_api_key")

    @property
    def model_name(self):
        return self.server.served_model_name

    def _model_card(self):
        card = {"id": self.model_name, "object": "model", "owned_by": "moed",
                "created": int(self.server.started_wall)}
        if self.server.ready:
            card["max_model_len"] = self.server.engine_loop.engine.model_info["context_length"]
        return card

    async def models(self):
        return {"object": "list", "data": [self._model_card()]}

    async def model(self, model_id: str):
        self._check_model(model_id)
        return self._model_card()

    def _check_model(self, name):
        if name and name != self.model_name:
            raise oai.APIError(404, f"the model {name!r} does not exist; this server serves "
                               f"{self.model_name!r}", "not_found_error", "model",
                               "model_not_found")

    def _engine(self):
        s = self.server
        if not s.ready:
            raise oai.APIError(503, s._not_ready_reason(), "service_unavailable")
        if s.draining:
            raise oai.APIError(503, "the server is draining: it finishes in-flight requests "
                               "and admits no new ones", "service_unavailable")
        return s.engine_loop.engine

    async def completions(self, body: oai.CompletionRequest, request: Request):
        body.check_supported()
        self._check_model(body.model)
        engine = self._engine()
        prompt = body.single_prompt()
        ids = await self._encode(prompt, engine)
        max_tokens = body.max_tokens if body.max_tokens is not None \
            else oai.COMPLETION_DEFAULT_MAX_TOKENS
        params = body.sampling_params(max_tokens, body.logprobs, self.server.cfg)
        return await self._respond(CompletionFormat(self, body), ids, params, request,
                                   split_reasoning=False)

    async def chat_completions(self, body: oai.ChatCompletionRequest, request: Request):
        body.check_supported()
        self._check_model(body.model)
        engine = self._engine()
        messages = body.conversation(self.server.cfg.max_prompt_chars)
        ids = await self._tokenize(self.server.tokenizers.encode_chat(messages), "messages",
                                   engine)
        ctx = engine.model_info["context_length"]
        max_tokens = body.requested_max_tokens
        if max_tokens is None:          # unset: what the context leaves
            max_tokens = max(1, ctx - len(ids))
        params = body.sampling_params(max_tokens, body.num_logprobs, self.server.cfg)
        return await self._respond(ChatFormat(self, body), ids, params, request,
                                   split_reasoning=True)

    async def _encode(self, prompt, engine):
        if isinstance(prompt, str):
            if len(prompt) > self.server.cfg.max_prompt_chars:
                raise oai.bad_request("prompt", f"{len(prompt)} characters; the limit is "
                                      f"{self.server.cfg.max_prompt_chars}")
            return await self._tokenize(self.server.tokenizers.encode(prompt), "prompt", engine)
        ctx = engine.model_info["context_length"]
        if len(prompt) >= ctx:
            raise oai.bad_request("prompt", f"{len(prompt)} tokens; the context is {ctx}")
        return list(prompt)             # the engine checks the ids against the vocabulary

    async def _tokenize(self, encoding, param, engine):
        try:
            ids = await encoding
        except RequestRejected as r:
            raise oai.from_rejection(r, {r.field: param} if r.field else {}) from None
        ctx = engine.model_info["context_length"]
        if len(ids) >= ctx:
            raise oai.bad_request(param, f"the prompt is {len(ids)} tokens; the context is "
                                  f"{ctx}")
        return ids.tolist()

    async def _respond(self, fmt, ids, params, request, split_reasoning):
        tracked = Tracked(fmt.ids.id, ids, params,
                          trace_context=propagate.extract(dict(request.headers)),
                          operation="chat" if split_reasoning else "text_completion")
        updates = streams.stream(self.server, tracked, split_reasoning=split_reasoning)
        try:
            await updates.__anext__()           # admitted (or refused: an error status)
        except RequestRejected as r:
            await updates.aclose()
            raise oai.from_rejection(r, fmt.field_names()) from None
        if fmt.body.stream:
            return StreamingResponse(self._sse(fmt, updates), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        return await self._whole(fmt, updates, request)

    async def _sse(self, fmt, updates):
        async with contextlib.aclosing(updates):
            try:
                for chunk in fmt.opening():
                    yield sse(chunk)
                async for update in updates:
                    for chunk in fmt.chunks(update):
                        yield sse(chunk)
            except RequestRejected as r:        # the stream has begun: the error goes in it
                yield sse(oai.from_rejection(r, fmt.field_names()).body())
            yield "data: [DONE]\n\n"

    async def _whole(self, fmt, updates, request):
        """Collect the whole reply, aborting if the client hangs up meanwhile."""
        async def collect():
            async with contextlib.aclosing(updates):
                return [u async for u in updates]
        work = asyncio.ensure_future(collect())
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not work.done():                 # the client left: abort, free its blocks
                work.cancel()
                with contextlib.suppress(asyncio.CancelledError, RequestRejected):
                    await work
        if work.cancelled():
            return Response(status_code=499)
        try:
            return fmt.whole(work.result())
        except RequestRejected as r:
            raise oai.from_rejection(r, fmt.field_names()) from None


async def _disconnected(request):
    while (await request.receive())["type"] != "http.disconnect":
        pass


def sse(obj):
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


class _Format:
    """What one endpoint's responses look like; token text for logprobs from the
    front end's own tokenizer."""
    prefix = ""

    def __init__(self, handlers, body):
        self.body = body
        self.ids = oai.ResponseIds(f"{self.prefix}-{uuid.uuid4().hex[:24]}", handlers.model_name)
        tokenizer = handlers.server.engine_loop.engine.tokenizer
        self.token_text = lambda tid: tokenizer.decode([tid], skip_special_tokens=False)

    def field_names(self):
        names = dict(oai.FIELDS)
        names.update({f: self.body.param_name(f) for f in ("max_new_tokens", "logprobs")})
        return names

    def opening(self):
        return ()

    def usage_chunk(self, final):
        if not self.body.include_usage:
            return []
        return [{**self.ids.envelope(self.chunk_object), "choices": [], "usage": oai.usage(final)}]

    def with_usage_field(self, chunk):
        if self.body.include_usage:
            chunk["usage"] = None
        return chunk


class CompletionFormat(_Format):
    prefix, chunk_object = "cmpl", "text_completion"

    def __init__(self, handlers, body):
        super().__init__(handlers, body)
        self.logprobs = oai.CompletionLogprobs(self.token_text)

    def _choice(self, text, entries, reason):
        lp = self.logprobs.of(entries) if self.body.logprobs is not None else None
        return {"index": 0, "text": text, "logprobs": lp, "finish_reason": reason}

    def chunks(self, update):
        out = []
        reason = oai.finish_reason(update.final) if update.final is not None else None
        if update.text or update.logprobs or reason:
            out.append(self.with_usage_field({**self.ids.envelope(self.chunk_object),
                                              "choices": [self._choice(update.text,
                                                                       update.logprobs,
                                                                       reason)]}))
        if update.final is not None:
            out += self.usage_chunk(update.final)
        return out

    def whole(self, updates):
        final = updates[-1].final
        text = "".join(u.text for u in updates)
        entries = [e for u in updates for e in u.logprobs]
        return {**self.ids.envelope("text_completion"),
                "choices": [self._choice(text, entries, oai.finish_reason(final))],
                "usage": oai.usage(final)}


class ChatFormat(_Format):
    prefix, chunk_object = "chatcmpl", "chat.completion.chunk"

    def _logprobs(self, entries):
        return oai.chat_logprobs(entries, self.token_text) if self.body.logprobs else None

    def _chunk(self, delta, entries=(), reason=None):
        return self.with_usage_field({**self.ids.envelope(self.chunk_object), "choices": [
            {"index": 0, "delta": delta, "logprobs": self._logprobs(entries) if entries else None,
             "finish_reason": reason}]})

    def opening(self):
        return [self._chunk({"role": "assistant", "content": ""})]

    def chunks(self, update):
        out = []
        delta = {}
        if update.reasoning:
            delta["reasoning_content"] = update.reasoning
        if update.text:
            delta["content"] = update.text
        if delta or update.logprobs:
            out.append(self._chunk(delta, update.logprobs))
        if update.final is not None:
            out.append(self._chunk({}, reason=oai.finish_reason(update.final)))
            out += self.usage_chunk(update.final)
        return out

    def whole(self, updates):
        final = updates[-1].final
        message = {"role": "assistant", "content": "".join(u.text for u in updates)}
        reasoning = "".join(u.reasoning for u in updates)
        if reasoning:
            message["reasoning_content"] = reasoning
        entries = [e for u in updates for e in u.logprobs]
        return {**self.ids.envelope("chat.completion"), "choices": [
            {"index": 0, "message": message, "logprobs": self._logprobs(entries),
             "finish_reason": oai.finish_reason(final)}], "usage": oai.usage(final)}


# ---------------------------------------------------------------- serving

def bind(host, port):
    """A listening socket on host:port (ConfigError naming server.http_port if it cannot)."""
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
        family, type_, proto, _, address = infos[0]
        sock = socket.socket(family, type_, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        raise ConfigError(f"server.http_port: cannot bind {host}:{port}: {e.strerror or e}",
                          field="server.http_port") from e
    sock.setblocking(False)
    return sock


class HttpServer:
    """uvicorn in the running event loop, on a socket bound up front (port 0 works)."""

    def __init__(self, server):
        cfg = server.cfg
        self.app = build_app(server)
        self.sock = bind(cfg.http_host, cfg.http_port)
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(self.app, log_config=None, access_log=False, lifespan="off",
                                ssl_certfile=cfg.tls_cert_file, ssl_keyfile=cfg.tls_key_file,
                                timeout_graceful_shutdown=1)
        self.uvicorn = _Uvicorn(config)
        self.task = None
        # its start and stop lines say nothing the daemon's own do not
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)

    async def start(self):
        self.task = asyncio.create_task(self.uvicorn.serve(sockets=[self.sock]))
        while not self.uvicorn.started and not self.task.done():
            await asyncio.sleep(0.01)
        if self.task.done():
            self.task.result()          # raises what stopped it

    async def stop(self):
        if self.task is None:
            return
        self.uvicorn.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        self.sock.close()


class _Uvicorn(uvicorn.Server):
    """uvicorn.Server without its signal handlers: the daemon owns SIGTERM and SIGINT."""

    @contextlib.contextmanager
    def capture_signals(self):
        yield
