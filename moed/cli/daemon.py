"""`moed`: the daemon.

    moed [--config FILE] [--model DIR] [--host H] [--port P] [...]

Flags override the config file (etc/moed.yaml documents every setting). With no
model configured it serves the built-in demo model. An invalid setting exits
with code 2 and names it; SIGTERM or Ctrl-C drains (in-flight streams finish,
new ones get UNAVAILABLE) and exits 0; a second Ctrl-C exits at once.
"""
import argparse
import asyncio
import dataclasses
import logging
import os
import signal
import sys
from pathlib import Path

from moed.config import LOG_FORMAT, load_config
from moed.errors import ConfigError, MoedError

EXIT_CONFIG = 2
DEMO_MODEL_NAME = "moed-demo"      # the built-in demo model's name on the HTTP API
FLAGS = {   # flag -> (setting, type)
    "--model": ("model", str), "--host": ("host", str), "--port": ("port", int),
    "--device": ("device", str), "--max-num-seqs": ("max_num_seqs", int),
    "--max-num-batched-tokens": ("max_num_batched_tokens", int),
    "--num-kv-blocks": ("num_kv_blocks", int), "--max-waiting": ("max_waiting", int),
    "--experts": ("experts", str), "--log-level": ("log_level", str),
    "--tokenizer-processes": ("tokenizer_processes", int),
    "--http-host": ("http_host", str), "--http-port": ("http_port", int),
    "--served-model-name": ("served_model_name", str),
}


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="moed", description="moed inference daemon (gRPC)")
    ap.add_argument("--config", help="YAML settings file (see etc/moed.yaml)")
    for flag, (name, kind) in FLAGS.items():
        ap.add_argument(flag, dest=name, type=kind, help=f"overrides the `{name}` setting")
    return ap.parse_args(argv)


def resolve_model(cfg):
    """The checkpoint to serve: the configured one, or the demo model (built once)."""
    if cfg.model is None:
        from moed.demo import demo_model_dir
        return demo_model_dir()
    path = Path(cfg.model).expanduser()
    if not (path / "config.json").is_file():
        raise ConfigError(f"server.model: {path} is not a checkpoint directory "
                          "(no config.json)", field="server.model")
    return path


async def serve(cfg, model_dir):
    from moed.server.app import MoedServer
    app = MoedServer(cfg, model_dir)
    port = await app.start()
    print(f"moed: listening on {cfg.host}:{port} (model {model_dir})", file=sys.stderr, flush=True)
    if app.http is not None:
        scheme = "https" if cfg.tls else "http"
        print(f"moed: HTTP API on {scheme}://{cfg.http_host}:{app.http.port}/v1 (model name "
              f"{app.served_model_name!r})", file=sys.stderr, flush=True)
    stop = asyncio.Event()
    _install_signals(stop)
    ready = asyncio.create_task(app.wait_ready())
    stopped = asyncio.create_task(stop.wait())
    await asyncio.wait({ready, stopped}, return_when=asyncio.FIRST_COMPLETED)
    if ready.done() and ready.exception() is not None:
        print(f"moed: error: loading {model_dir} failed: {ready.exception()}", file=sys.stderr)
        await app.shutdown(timeout=0)
        return 1
    if ready.done():
        print("moed: ready", file=sys.stderr, flush=True)
    await stopped
    print("moed: draining", file=sys.stderr, flush=True)
    await app.shutdown()
    ready.cancel()
    print("moed: stopped", file=sys.stderr, flush=True)
    return 0


def _install_signals(stop):
    loop = asyncio.get_running_loop()

    def on_signal(signum):
        if stop.is_set() and signum == signal.SIGINT:
            os._exit(130)           # second Ctrl-C: the operator does not want to wait
        stop.set()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)


def main(argv=None):
    args = parse_args(argv)
    overrides = {name: getattr(args, name) for name, _ in FLAGS.values()}
    try:
        cfg = load_config(args.config, overrides)
        model_dir = resolve_model(cfg)
        if cfg.model is None and cfg.served_model_name is None:
            cfg = dataclasses.replace(cfg, served_model_name=DEMO_MODEL_NAME)
    except ConfigError as e:
        print(f"moed: error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    logging.basicConfig(level=cfg.log_level.upper(), format=LOG_FORMAT)
    try:
        return asyncio.run(serve(cfg, model_dir))
    except ConfigError as e:            # found at bind time (port in use, TLS files)
        print(f"moed: error: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except MoedError as e:
        print(f"moed: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
