"""A checkpoint's tokenizer: `tokenizer.json` through the `tokenizers` library
(or, where a checkpoint ships none, `tiktoken.model`: moed.model.tiktoken_bpe),
special tokens from `tokenizer_config.json` / `generation_config.json`, the
chat template (jinja2, sandboxed, with the globals hub templates expect) and
streaming detokenization that never emits half a UTF-8 character.

Imports neither torch nor the checkpoint loader: the daemon's tokenizer worker
processes load this module alone. Errors a client can see (chat templates) name
a checkpoint file by its name only; `path` keeps the full path for the operator.
"""
import json
from datetime import datetime
from pathlib import Path

from moed.errors import CheckpointError, InvalidRequestError

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
GENERATION_CONFIG = "generation_config.json"
TEMPLATE_FILE = "chat_template.jinja"
REPLACEMENT = "\ufffd"          # what an incomplete UTF-8 sequence decodes to


def optional_json(path):
    """{} when the file is absent; CheckpointError naming it when unreadable."""
    if not path.exists():
        return {}
    try:        # checkpoint.read_json's rule, without importing torch along with it
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})", path=str(path)) from e


class NoChatTemplate(CheckpointError):
    """The checkpoint has no chat template: what the model cannot do (not the request)."""


class NoTokenizer(CheckpointError):
    """The checkpoint has no tokenizer files: it serves token ids only."""


class BrokenChatTemplate(CheckpointError):
    """The chat template does not compile or does something the sandbox forbids."""


def token_content(value):
    """tokenizer_config writes special tokens as a string or an AddedToken dict."""
    return value.get("content") if isinstance(value, dict) else value


def as_id_set(value):
    if value is None:
        return set()
    return {int(v) for v in value} if isinstance(value, list) else {int(value)}


def has_tokenizer(model_dir):
    """Whether the directory holds a tokenizer file load_backend reads."""
    from moed.model.tiktoken_bpe import TIKTOKEN_FILE
    return any((Path(model_dir) / name).is_file() for name in (TOKENIZER_FILE, TIKTOKEN_FILE))


def load_backend(model_dir, config):
    """tokenizer.json where there is one (it says everything), else tiktoken.model."""
    from moed.model.tiktoken_bpe import TIKTOKEN_FILE, TiktokenBPE
    path, tiktoken_path = model_dir / TOKENIZER_FILE, model_dir / TIKTOKEN_FILE
    if not path.is_file() and tiktoken_path.is_file():
        return TiktokenBPE.from_files(tiktoken_path, config, model_dir / TOKENIZER_CONFIG)
    return load_tokenizer_json(path)


def load_tokenizer_json(path):
    from tokenizers import Tokenizer as Backend
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found (nor tiktoken.model beside it)",
                              path=str(path))
    try:
        return Backend.from_file(str(path))
    except Exception as e:          # the Rust side raises its own exception type
        raise CheckpointError(f"{path}: unreadable tokenizer ({e})", path=str(path)) from e


class Tokenizer:
    """Text <-> token ids for one checkpoint directory."""

    def __init__(self, backend, config, generation, model_config=None, model_dir=None):
        self.backend = backend
        self.config = config                      # tokenizer_config.json
        self.dir = Path(model_dir) if model_dir else None
        self.bos_token = token_content(config.get("bos_token"))
        self.eos_token = token_content(config.get("eos_token"))
        self.bos_token_id = self._bos_id(generation, model_config or {})
        self.eos_token_ids = self._eos_ids(generation, model_config or {})
        # None: the checkpoint does not say; tokenizer.json's post-processor decides.
        self.add_bos = config.get("add_bos_token")
        self.add_eos = bool(config.get("add_eos_token", False))
        self._templates = None

    has_text = True

    @classmethod
    def from_dir(cls, model_dir):
        """The directory's tokenizer; a TokenIdsOnly stand-in when it ships no tokenizer file
        (clients that send token ids need none)."""
        d = Path(model_dir)
        if not has_tokenizer(d):
            return TokenIdsOnly.from_dir(d)
        config = optional_json(d / TOKENIZER_CONFIG)
        backend = load_backend(d, config)
        model_config = optional_json(d / "config.json")
        return cls(backend, config, optional_json(d / GENERATION_CONFIG), model_config, d)

    def _bos_id(self, generation, model_config):
        if "bos_token" in self.config:            # explicit, possibly null (Qwen: no BOS)
            return self.token_to_id(self.bos_token)
        bos = generation.get("bos_token_id", model_config.get("bos_token_id"))
        return bos if isinstance(bos, int) else None

    def _eos_ids(self, generation, model_config):
        ids = as_id_set(generation.get("eos_token_id", model_config.get("eos_token_id")))
        eos = self.token_to_id(self.eos_token)
        return ids | ({eos} if eos is not None else set())

    # ---------------------------------------------------------------- ids

    @property
    def vocab_size(self):
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token):
        return None if token is None else self.backend.token_to_id(token)

    def encode(self, text, add_special_tokens=True):
        if not isinstance(text, str):
            raise InvalidRequestError(f"prompt must be a string, got {type(text).__name__}",
                                      field="prompt")
        if self.add_bos is None:
            return self._encode(text, add_special_tokens)
        ids = self._encode(text, False)
        if add_special_tokens and self.add_bos and self.bos_token_id is not None:
            ids = [self.bos_token_id] + ids
        if add_special_tokens and self.add_eos and self.eos_token is not None:
            ids = ids + [self.token_to_id(self.eos_token)]
        return ids

    def _encode(self, text, add_special_tokens):
        # The batch call releases the GIL while it works (backend.encode holds it: a 1 MB
        # prompt froze every other thread for 1.1 s) and skips the offsets: 0.55 s, not 1.2.
        fast = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        return fast([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids, skip_special_tokens=True):
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # ---------------------------------------------------------------- chat

    def apply_chat_template(self, messages, add_generation_prompt=True, template_name=None,
                            **kwargs):
        """The conversation rendered as the checkpoint's chat template says (a string)."""
        check_messages(messages)
        template, source = self._template(template_name)
        special = {k: token_content(self.config.get(k))
                   for k in ("bos_token", "eos_token", "pad_token", "unk_token")}
        context = {**special, **kwargs, "messages": messages,
                   "add_generation_prompt": add_generation_prompt}
        return render(template, context, source)

    def _template(self, name):
        if self._templates is None:
            self._templates = self._load_templates()
        if not self._templates:
            raise NoChatTemplate(f"the model has no chat template ({TOKENIZER_CONFIG} has no "
                                 f"'chat_template' and there is no {TEMPLATE_FILE})",
                                 path=str(self.dir / TOKENIZER_CONFIG) if self.dir else None)
        if name is None:
            name = "default" if "default" in self._templates else next(iter(self._templates))
        if name not in self._templates:
            raise InvalidRequestError(f"chat template {name!r} not found; the checkpoint has "
                                      f"{sorted(self._templates)}", field="chat_template")
        return self._templates[name]

    def _load_templates(self):
        """name -> (compiled template, source file); a .jinja file wins like on the hub."""
        if self.dir is not None and (self.dir / TEMPLATE_FILE).is_file():
            path = self.dir / TEMPLATE_FILE
            return {"default": (compile_template(read_text(path), path), path)}
        raw = self.config.get("chat_template")
        source = (self.dir / TOKENIZER_CONFIG) if self.dir else Path(TOKENIZER_CONFIG)
        if isinstance(raw, str):
            return {"default": (compile_template(raw, source), source)}
        if isinstance(raw, list):
            return {t["name"]: (compile_template(t["template"], source), source) for t in raw
                    if isinstance(t, dict) and "name" in t and "template" in t}
        return {}


class TokenIdsOnly:
    """A checkpoint without tokenizer files: its special ids from config.json and
    generation_config.json, no text. Encoding and chat templates raise NoTokenizer (the
    server answers FAILED_PRECONDITION); generated ids decode to no text."""
    has_text = False
    bos_token = eos_token = None
    add_bos, add_eos = None, False

    def __init__(self, model_dir, generation, model_config):
        self.dir = Path(model_dir)
        self.config = {}
        bos = generation.get("bos_token_id", model_config.get("bos_token_id"))
        self.bos_token_id = bos if isinstance(bos, int) else None
        self.eos_token_ids = as_id_set(generation.get("eos_token_id",
                                                      model_config.get("eos_token_id")))
        self.vocab_size = model_config.get("vocab_size")

    @classmethod
    def from_dir(cls, model_dir):
        return cls(model_dir, optional_json(model_dir / GENERATION_CONFIG),
                   optional_json(model_dir / "config.json"))

    def refuse(self, what):
        raise NoTokenizer(f"the model has no tokenizer ({self.dir.name} ships neither "
                          f"{TOKENIZER_FILE} nor tiktoken.model): {what} needs one; send "
                          "token ids instead", path=str(self.dir))

    def token_to_id(self, token):
        return None

    def encode(self, text, add_special_tokens=True):
        self.refuse("text")

    def apply_chat_template(self, messages, **kwargs):
        self.refuse("a chat prompt")

    def decode(self, ids, skip_special_tokens=True):
        return ""


def read_text(path):
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})", path=str(path)) from e


def check_messages(messages):
    if isinstance(messages, (str, bytes)) or not hasattr(messages, "__iter__"):
        raise InvalidRequestError("messages must be a list of {role, content} objects",
                                  field="messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise InvalidRequestError(f"messages[{i}] needs a string 'role'",
                                      field=f"messages[{i}].role")


# ---------------------------------------------------------------- jinja2

class TemplateRaised(Exception):
    """raise_exception() called by a chat template: the conversation is at fault."""


def raise_exception(message):
    raise TemplateRaised(message)


def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent,
                      separators=separators, sort_keys=sort_keys)


def template_environment():
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    # trim_blocks / lstrip_blocks: hub templates are written for these settings
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def compile_template(text, source):
    from jinja2 import TemplateError
    try:
        return template_environment().from_string(text)
    except (TemplateError, RecursionError, MemoryError) as e:
        raise BrokenChatTemplate(f"{Path(source).name}: chat template does not compile: {e}",
                                 path=str(source)) from e


def render(template, context, source):
    from jinja2.exceptions import SecurityError
    try:
        return template.render(**context)
    except TemplateRaised as e:
        raise InvalidRequestError(f"chat template rejected the conversation: {e}",
                                  field="messages") from e
    except SecurityError as e:
        raise BrokenChatTemplate(f"{Path(source).name}: chat template does something "
                                 f"unsafe: {e}", path=str(source)) from e
    except Exception as e:      # whatever a template's expressions raise on these messages
        raise InvalidRequestError(f"chat template ({Path(source).name}) cannot render these "
                                  f"messages: {type(e).__name__}: {e}", field="messages") from e


# ---------------------------------------------------------------- streaming

class IncrementalDetokenizer:
    """Text deltas for generated tokens, one token at a time.

    Decodes a short window of ids (a few already-emitted ones for context, then
    the pending ones) and emits what the window adds. While the window's text
    ends in U+FFFD, its last token(s) split a multi-byte character: hold them
    back until the character completes. The deltas concatenate to
    decode(output ids) because windows always start on a character boundary.
    """
    CONTEXT = 4                 # prompt tokens kept in front of the first window

    def __init__(self, tokenizer, prompt_ids=None, skip_special_tokens=True):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        self.ids = self._context(list(prompt_ids or ()))
        self.prefix = 0                      # window start: emitted context
        self.read = len(self.ids)            # ids before this are already emitted

    def _context(self, prompt_ids):
        """Last prompt tokens, only if they end on a character boundary."""
        tail = prompt_ids[-self.CONTEXT:]
        return tail if not self.tok.decode(tail, self.skip).endswith(REPLACEMENT) else []

    def push(self, token_id):
        """The new text that token_id completes ("" while a character is incomplete)."""
        self.ids.append(int(token_id))
        return self._emit(final=False)

    def flush(self):
        """Whatever is still held back (an incomplete character stays U+FFFD)."""
        return self._emit(final=True)

    def _emit(self, final):
        before = self.tok.decode(self.ids[self.prefix:self.read], self.skip)
        text = self.tok.decode(self.ids[self.prefix:], self.skip)
        if len(text) <= len(before) and not final:
            return ""
        if text.endswith(REPLACEMENT) and not final:
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(before):]
