"""MoedServer: the grpc.aio server around one engine loop.

Lifecycle:  start (bind; health "" and generation NOT_SERVING; load the model on
the engine thread, start the tokenizer workers) -> ready ("" and generation
SERVING) -> drain / resume -> shutdown (drain, let in-flight streams finish,
stop). While loading or draining, Generate gets UNAVAILABLE and health "" (what
load balancers and k8s gRPC probes read) says NOT_SERVING; in-flight streams are
never cut by a drain. If the engine thread dies, every service is NOT_SERVING.
"""
import asyncio
import contextlib
import ipaddress
import logging
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from moed.engine.reasoning import reasoning_tags
from moed.errors import ConfigError
from moed.server.admin import AdminServicer
from moed.server.auth import AdminAuthInterceptor
from moed.server.engine_loop import EngineLoop
from moed.server.gen import admin_pb2, admin_pb2_grpc, generation_pb2, generation_pb2_grpc
from moed.server.generation import GenerationServicer
from moed.server.telemetry import Telemetry
from moed.server.tokenizer_pool import TokenizerPool
from moed.server.wire import WireDecodeInterceptor

log = logging.getLogger("moed.server")
GENERATION = generation_pb2.DESCRIPTOR.services_by_name["GenerationService"].full_name
ADMIN = admin_pb2.DESCRIPTOR.services_by_name["AdminService"].full_name
PREFILL_WORKER = "moed.v1.PrefillWorker"     # health entries only (engine.prefill_worker,
ENGINE_PROCESS = "moed.v1.EngineProcess"     # server.engine_process)
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


def default_engine_factory(model_dir, cfg):
    def make():
        if cfg.engine_process:          # the engine (and the weights) in a process of its own
            from moed.server.engine_process import RemoteEngine
            return RemoteEngine(model_dir, cfg.engine_kwargs())
        from moed.engine.llm_engine import LLMEngine
        # text is the server's text stage's job, off the engine thread
        return LLMEngine(model_dir, **cfg.engine_kwargs(), detokenize=False)
    return make


def plaintext_exposure(cfg):
    """A warning when the daemon listens beyond this machine without TLS, else None."""
    if cfg.tls:
        return None
    hosts = [cfg.host] + ([cfg.http_host] if cfg.http_port is not None else [])
    exposed = next((h for h in hosts if not is_loopback(h)), None)
    if exposed is None:
        return None
    return (f"listening on {exposed} without TLS: prompts, outputs and the admin token "
            "cross the network in the clear; set server.tls_cert_file and "
            "server.tls_key_file, or bind 127.0.0.1")


def is_loopback(host):
    host = host.strip("[]")
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False                    # a host name: it may well be reachable


class MoedServer:
    def __init__(self, cfg, model_dir, make_engine=None, telemetry=None):
        self.cfg = cfg
        self.model_dir = Path(model_dir)
        self._make_engine = make_engine or default_engine_factory(self.model_dir, cfg)
        self.telemetry = telemetry or Telemetry(cfg.service_name, self.model_dir.name)
        self.started = time.monotonic()
        self.started_wall = time.time()
        self.ready = False
        self.draining = False
        self.active_streams = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.port = None
        self.http = None                        # HttpServer (the OpenAI API), when on
        self.engine_loop = None
        self.server = None
        self.health = health.aio.HealthServicer()
        self.tokenizers = None                  # TokenizerPool, from start()
        self.reasoning_tags = None              # (<think>, </think>) ids, for reasoning models

    @property
    def served_model_name(self):
        """The model's name on the HTTP API."""
        return self.cfg.served_model_name or self.model_dir.name

    # -- lifecycle
    async def start(self):
        """Bind and serve; the model loads in the background (see wait_ready)."""
        self.engine_loop = EngineLoop(self._make_engine, asyncio.get_running_loop(),
                                      on_finish=self.telemetry.record,
                                      on_dead=self._engine_died,
                                      on_worker=self._worker_changed)
        self.telemetry.engine_stats = lambda: self.engine_loop.snapshot.stats
        self.tokenizers = TokenizerPool(self.model_dir, self.cfg.tokenizer_processes,
                                        lambda: self.engine_loop.engine.tokenizer)
        self.server = self._build_server()
        self.port = self._bind()
        if self.cfg.http_port is not None:      # bound now: a bad port fails the start
            from moed.server.http_api import HttpServer
            self.http = HttpServer(self)
        warning = plaintext_exposure(self.cfg)
        if warning:
            log.warning(warning)
        self.telemetry.server_address = (self.cfg.host, self.port)
        await self._set_ready_health()
        await self.health.set(ADMIN, SERVING)
        await self.server.start()
        if self.http is not None:
            await self.http.start()
        self.tokenizers.start()
        self.engine_loop.start()
        self._load_task = asyncio.create_task(self._await_load())
        return self.port

    async def _set_ready_health(self):
        """"" and generation follow readiness: loaded, not draining, engine alive."""
        up = self.ready and not self.draining and self.engine_loop.dead is None
        for service in ("", GENERATION):
            await self.health.set(service, SERVING if up else NOT_SERVING)

    def _worker_changed(self, which, up):
        """Health PREFILL_WORKER / ENGINE_PROCESS: SERVING while that process runs,
        NOT_SERVING while it is down. The daemon keeps serving: long prompts prefill in
        the engine meanwhile, and the next request starts a new engine process."""
        (log.info if up else log.warning)("%s %s", which, "up" if up else "down")
        service = PREFILL_WORKER if which == "prefill" else ENGINE_PROCESS
        asyncio.ensure_future(self.health.set(service, SERVING if up else NOT_SERVING))

    def _engine_died(self, error):
        log.error("the engine thread died (%r): every service reports NOT_SERVING", error)
        self.ready = False
        asyncio.ensure_future(self._set_dead_health())

    async def _set_dead_health(self):
        await self._set_ready_health()
        await self.health.set(ADMIN, NOT_SERVING)

    def _build_server(self):
        limit = self.cfg.max_message_bytes
        server = grpc.aio.server(
            interceptors=[AdminAuthInterceptor(self.cfg.admin_token), WireDecodeInterceptor()],
            options=[("grpc.max_send_message_length", limit),
                     ("grpc.max_receive_message_length", limit),
                     ("grpc.so_reuseport", 0)])
        generation_pb2_grpc.add_GenerationServiceServicer_to_server(GenerationServicer(self), server)
        admin_pb2_grpc.add_AdminServiceServicer_to_server(AdminServicer(self), server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection.enable_server_reflection(
            (GENERATION, ADMIN, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
        return server

    def _bind(self):
        address = f"{self.cfg.host}:{self.cfg.port}"
        try:
            if self.cfg.tls:
                return self.server.add_secure_port(address, self._credentials())
            return self.server.add_insecure_port(address)
        except RuntimeError as e:
            raise ConfigError(f"server.port: cannot bind {address}: {e}", field="server.port") from e

    def _credentials(self):
        def read(name):
            path = getattr(self.cfg, name)
            try:
                return Path(path).read_bytes()
            except OSError as e:
                raise ConfigError(f"server.{name}: cannot read {path}: {e.strerror}",
                                  field=f"server.{name}") from e
        return grpc.ssl_server_credentials([(read("tls_key_file"), read("tls_cert_file"))])

    async def _await_load(self):
        await asyncio.get_running_loop().run_in_executor(None, self.engine_loop.loaded.wait)
        if self.engine_loop.load_error is not None:
            log.error("loading %s failed: %s", self.model_dir, self.engine_loop.load_error)
            return
        tokenizer = getattr(self.engine_loop.engine, "tokenizer", None)
        self.reasoning_tags = reasoning_tags(tokenizer) if tokenizer is not None else None
        self.ready = True
        info = self.engine_loop.engine.model_info
        log.info("model loaded: %s (%s) on %s, experts %s, isa %s", info["architecture"],
                 info["weight_format"], info["device"], info["experts"], info["isa"])
        await self._set_ready_health()

    async def wait_ready(self):
        """Until the model is loaded; re-raises a load failure."""
        await asyncio.shield(self._load_task)
        if self.engine_loop.load_error is not None:
            raise self.engine_loop.load_error

    async def drain(self):
        self.draining = True
        await self._set_ready_health()

    async def resume(self):
        self.draining = False
        await self._set_ready_health()

    async def shutdown(self, timeout=None):
        """Drain, wait up to `timeout` (default drain_timeout_s) for in-flight streams,
        then stop: streams still running are cancelled."""
        timeout = self.cfg.drain_timeout_s if timeout is None else timeout
        await self.drain()
        await self.health.enter_graceful_shutdown()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)
        await self.server.stop(grace=1.0)
        if self.http is not None:
            await self.http.stop()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self.engine_loop.stop, 10.0)
        await loop.run_in_executor(None, self.tokenizers.shutdown)
        self.telemetry.shutdown()

    # -- admission, for the handlers
    async def require_loaded(self, context):
        if not self.ready:
            await context.abort(grpc.StatusCode.UNAVAILABLE, self._not_ready_reason())
        return self.engine_loop.engine

    def _not_ready_reason(self):
        if self.engine_loop.dead is not None:
            return "the engine stopped: this server cannot generate any more; retry on another"
        if self.engine_loop.load_error is not None:
            return "the model failed to load"
        return "the model is still loading"

    async def require_serving(self, context):
        engine = await self.require_loaded(context)
        if self.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                "the server is draining: it finishes in-flight requests and "
                                "admits no new ones")
        return engine

    @contextlib.asynccontextmanager
    async def stream_slot(self):
        """Count a Generate stream as in flight for the drain."""
        self.active_streams += 1
        self._idle.clear()
        try:
            yield
        finally:
            self.active_streams -= 1
            if self.active_streams == 0:
                self._idle.set()
