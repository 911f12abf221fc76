"""A MoedServer on its own event-loop thread, for embedding the daemon in a
Python process (tests, notebooks) next to synchronous code.

    with BackgroundServer(Config(port=0), model_dir) as srv:
        channel = grpc.insecure_channel(srv.target)
"""
import asyncio
import threading

from moed.server.app import MoedServer


class BackgroundServer:
    def __init__(self, cfg, model_dir, **server_kwargs):
        self.app = MoedServer(cfg, model_dir, **server_kwargs)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="moed-server",
                                        daemon=True)

    @property
    def target(self):
        return f"{self.app.cfg.host}:{self.app.port}"

    def call(self, coro, timeout=120):
        """Run a coroutine on the server's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self, wait_ready=True):
        self._thread.start()
        self.call(self.app.start())
        if wait_ready:
            self.call(self.app.wait_ready())
        return self

    def stop(self, timeout=5.0):
        try:
            self.call(self.app.shutdown(timeout=timeout))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
