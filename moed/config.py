"""The daemon's settings: one validated dataclass, read from YAML + env + flags.

Precedence, lowest first: defaults here -> the YAML file (etc/moed.yaml
documents every setting) -> environment (MOED_ADMIN_TOKEN) -> command-line
flags. A bad value raises ConfigError naming the setting as `section.key`.
"""
import os
from dataclasses import dataclass, field, fields

from moed.errors import ConfigError

SECTIONS = ("server", "engine", "limits", "telemetry")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMAT = "%(asctime)s %(name)s %(levelname)s %(message)s"    # the daemon's and its workers'
BATCHED_TOKENS = 256       # engine.max_num_batched_tokens when unset (null)
KV_CACHE_DTYPES = ("bfloat16", "float32", "fp8_e4m3")   # moed.model.kv_dtype's names


def _setting(default, section, kind, *, nullable=False):
    return field(default=default, metadata={"section": section, "kind": kind, "nullable": nullable})


@dataclass
class Config:
    # server
    model: str = _setting(None, "server", str, nullable=True)   # None: the built-in demo model
    host: str = _setting("127.0.0.1", "server", str)
    port: int = _setting(50051, "server", int)                   # 0: any free port
    admin_token: str = _setting(None, "server", str, nullable=True)
    tls_cert_file: str = _setting(None, "server", str, nullable=True)
    tls_key_file: str = _setting(None, "server", str, nullable=True)
    max_message_bytes: int = _setting(4 << 20, "server", int)
    drain_timeout_s: float = _setting(60.0, "server", float)
    log_level: str = _setting("info", "server", str)
    tokenizer_processes: int = _setting(2, "server", int)        # 0: one thread in the daemon
    engine_process: bool = _setting(True, "server", bool)        # the engine in its own process
    # the OpenAI-compatible HTTP API (and /health, /metrics)
    http_host: str = _setting("127.0.0.1", "server", str)
    http_port: int = _setting(8000, "server", int, nullable=True)   # 0: any free port; None: off
    api_key: str = _setting(None, "server", str, nullable=True)     # the HTTP API's bearer token
    served_model_name: str = _setting(None, "server", str, nullable=True)  # None: the directory's
    # engine
    device: str = _setting("auto", "engine", str)
    accel: str = _setting("auto", "engine", str)                 # auto | off | cpu
    prefill_path: str = _setting("auto", "engine", str)          # auto | cpu | slp | dslp
    dslp_ranks: int = _setting(None, "engine", int, nullable=True)  # None: every visible GPU
    dual_batch: str = _setting("auto", "engine", str)            # auto | on | off
    prefill_worker: str = _setting("auto", "engine", str)        # auto | on | off
    prefill_worker_cpus: int = _setting(None, "engine", int, nullable=True)  # None: half
    tpot_target_ms: float = _setting(None, "engine", float, nullable=True)  # decode steps' time target
    max_num_seqs: int = _setting(64, "engine", int)
    max_num_batched_tokens: int = _setting(None, "engine", int, nullable=True)  # None: BATCHED_TOKENS
    prefill_chunk: object = _setting("auto", "engine", (str, int))   # "auto" | tokens
    num_kv_blocks: int = _setting(None, "engine", int, nullable=True)
    block_size: int = _setting(16, "engine", int)
    kv_cache_dtype: str = _setting("bfloat16", "engine", str)     # bfloat16 | float32 | fp8_e4m3
    max_waiting: int = _setting(256, "engine", int)
    prefix_caching: bool = _setting(True, "engine", bool)       # share KV blocks of common prefixes
    experts: str = _setting("auto", "engine", str)
    deterministic: bool = _setting(True, "engine", bool)
    verify_store: bool = _setting(False, "engine", bool)          # checksum the packed stores at start
    # limits (per request, checked before the engine sees it)
    max_stop_strings: int = _setting(8, "limits", int)
    max_stop_string_chars: int = _setting(128, "limits", int)
    max_stop_token_ids: int = _setting(64, "limits", int)
    max_request_id_chars: int = _setting(128, "limits", int)
    max_prompt_chars: int = _setting(1 << 20, "limits", int)
    # telemetry
    service_name: str = _setting("moed", "telemetry", str)

    def __post_init__(self):
        for f in fields(self):
            _check_type(self, f)
        self._check_ranges()

    def _check_ranges(self):
        positive = ("max_message_bytes", "max_num_seqs", "block_size",
                    "max_waiting", "max_stop_string_chars", "max_request_id_chars",
                    "max_prompt_chars")
        for name in positive:
            if getattr(self, name) < 1:
                _bad(name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("max_stop_strings", "max_stop_token_ids", "drain_timeout_s",
                     "tokenizer_processes"):
            if getattr(self, name) < 0:
                _bad(name, f"must be >= 0, got {getattr(self, name)}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            _bad("max_num_batched_tokens", f"must be >= 1 or null, got {self.max_num_batched_tokens}")
        if self.prefill_chunk != "auto" and (isinstance(self.prefill_chunk, str)
                                             or self.prefill_chunk < 1):
            _bad("prefill_chunk", f"must be auto or a number of tokens >= 1, got "
                 f"{self.prefill_chunk!r}")
        if self.tpot_target_ms is not None and not self.tpot_target_ms > 0:
            _bad("tpot_target_ms", f"must be > 0 or null, got {self.tpot_target_ms}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            _bad("num_kv_blocks", f"must be >= 1 or null, got {self.num_kv_blocks}")
        if not 0 <= self.port <= 65535:
            _bad("port", f"must be in [0, 65535], got {self.port}")
        if self.http_port is not None and not 0 <= self.http_port <= 65535:
            _bad("http_port", f"must be in [0, 65535] or null, got {self.http_port}")
        if self.api_key == "":
            _bad("api_key", "is empty (null: no key)")
        if (self.max_num_batched_tokens or BATCHED_TOKENS) < self.max_num_seqs:
            _bad("max_num_batched_tokens", "must be >= engine.max_num_seqs (every running "
                 "sequence decodes one token per step)")
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            _bad("tls_cert_file", "TLS needs both server.tls_cert_file and server.tls_key_file")
        if self.log_level not in LOG_LEVELS:
            _bad("log_level", f"must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            _bad("kv_cache_dtype", f"must be one of {', '.join(KV_CACHE_DTYPES)}, got "
                 f"{self.kv_cache_dtype!r}")
        if self.experts not in ("auto", "cpu", "torch"):
            _bad("experts", f"must be auto, cpu or torch, got {self.experts!r}")
        for name, choices in (("accel", ("auto", "off", "cpu")),
                              ("prefill_path", ("auto", "cpu", "slp", "dslp")),
                              ("dual_batch", ("auto", "on", "off")),
                              ("prefill_worker", ("auto", "on", "off"))):
            if getattr(self, name) not in choices:
                _bad(name, f"must be one of {', '.join(choices)}, got {getattr(self, name)!r}")

    @property
    def tls(self):
        return self.tls_cert_file is not None

    def engine_kwargs(self):
        """Keyword arguments of LLMEngine."""
        return dict(device=self.device, max_num_seqs=self.max_num_seqs,
                    max_num_batched_tokens=self.max_num_batched_tokens,
                    prefill_chunk=self.prefill_chunk, accel=self.accel,
                    prefill_path=self.prefill_path, dual_batch=self.dual_batch,
                    dslp_ranks=self.dslp_ranks, prefill_worker=self.prefill_worker, tpot_target_ms=self.tpot_target_ms,
                    prefill_worker_cpus=self.prefill_worker_cpus,
                    num_kv_blocks=self.num_kv_blocks, block_size=self.block_size,
                    kv_cache_dtype=self.kv_cache_dtype,
                    max_waiting=self.max_waiting, prefix_caching=self.prefix_caching,
                    # "auto" defers to the engine, which honours MOED_EXPERTS
                    experts=None if self.experts == "auto" else self.experts,
                    deterministic=self.deterministic,
                    # unset: the engine keeps its default (no full read at start)
                    verify_store=self.verify_store)


def qualified(name):
    """`section.key` of a setting, as the YAML file spells it."""
    f = next((f for f in fields(Config) if f.name == name), None)
    return f"{f.metadata['section']}.{name}" if f else name


def _bad(name, why):
    raise ConfigError(f"{qualified(name)}: {why}", field=qualified(name))


# str settings whose choices include on / off: YAML 1.1 reads a bare on, off, yes or
# no as a boolean, so those booleans stand for the words (accel has no "on")
ON_OFF = {"prefill_worker": ("off", "on"), "dual_batch": ("off", "on"), "accel": ("off", None)}


def _check_type(cfg, f):
    value, kind = getattr(cfg, f.name), f.metadata["kind"]
    if isinstance(value, bool) and f.name in ON_OFF and ON_OFF[f.name][value] is not None:
        value = ON_OFF[f.name][value]
        setattr(cfg, f.name, value)
    if value is None:
        if not f.metadata["nullable"]:
            _bad(f.name, "must be set")
        return
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        setattr(cfg, f.name, float(value))
        return
    if (isinstance(value, bool) and kind is not bool) or not isinstance(value, kind):
        names = " or ".join(k.__name__ for k in kind) if isinstance(kind, tuple) else kind.__name__
        _bad(f.name, f"must be {names}, got {type(value).__name__} {value!r}")


def flatten_yaml(doc, path="<config>"):
    """{section: {key: value}} -> {key: value}; unknown sections and keys are errors."""
    if doc is None:
        return {}
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections", field="<root>")
    known = {f.name: f.metadata["section"] for f in fields(Config)}
    flat = {}
    for section, body in doc.items():
        if section not in SECTIONS:
            raise ConfigError(f"{path}: unknown section {section!r} (known: {', '.join(SECTIONS)})",
                              field=str(section))
        for key, value in (body or {}).items():
            if known.get(key) != section:
                raise ConfigError(f"{path}: unknown setting {section}.{key}",
                                  field=f"{section}.{key}")
            flat[key] = value
    return flat


def read_yaml(path):
    import yaml
    try:
        with open(path, encoding="utf-8") as fh:
            doc = yaml.safe_load(fh)
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror}", field="--config") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path} is not valid YAML: {e}", field="--config") from e
    return flatten_yaml(doc, path)


def load_config(path=None, overrides=None, env=None):
    """Defaults < YAML file < environment < overrides (flags; None values are ignored)."""
    env = os.environ if env is None else env
    values = read_yaml(path) if path else {}
    if env.get("MOED_ADMIN_TOKEN"):
        values["admin_token"] = env["MOED_ADMIN_TOKEN"]
    if env.get("MOED_API_KEY"):
        values["api_key"] = env["MOED_API_KEY"]
    values.update({k: v for k, v in (overrides or {}).items() if v is not None})
    return Config(**values)
