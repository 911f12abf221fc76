"""A checkpoint that ships a tiktoken BPE (`tiktoken.model`, Kimi-K2) instead of a
`tokenizer.json`, loaded without running the checkpoint's own tokenizer code.

`tiktoken.model` holds one `base64(token bytes) rank` per line, ranks 0..N-1
with every single byte among them. The added tokens of tokenizer_config.json
(`added_tokens_decoder`) take the ids after the ranks; an id between the ranks
and the last added token that the config leaves unnamed is reserved and named
`<|reserved_token_{id}|>`, as Kimi's tokenizer names it. Text is split by Kimi's
pre-tokenizer regex before the merges: the file does not carry one, and Kimi's
is the only one a supported checkpoint ships with it.

TiktokenBPE answers the calls moed.model.tokenizer.Tokenizer makes on a
`tokenizers.Tokenizer` (get_vocab_size, token_to_id, encode_batch, decode), so
special tokens, chat templates, stop strings and streaming detokenization work
the same for both kinds of checkpoint.
"""
import base64
import binascii
import re
from collections import namedtuple

from moed.errors import CheckpointError

TIKTOKEN_FILE = "tiktoken.model"

# Kimi's split: runs of Han characters; words with their leading non-letter and
# English contractions (cased and uncased); 1-3 digits; punctuation runs; newlines;
# other whitespace.
KIMI_PATTERN = "|".join([
    r"[\p{Han}]+",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*"
    r"[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+"
    r"[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
    r"\p{N}{1,3}",
    r" ?[^\s\p{L}\p{N}]+[\r\n]*",
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
])

# tiktoken's regex backtracks badly on very long inputs and runs (its issue 195):
# encode pieces of at most this many characters, cut inside runs longer than this
# many whitespace or non-whitespace characters (the same cuts as Kimi's tokenizer).
MAX_PIECE_CHARS = 400_000
MAX_RUN_CHARS = 25_000

Encoded = namedtuple("Encoded", "ids")      # what encode_batch returns per text, like tokenizers


def read_ranks(path):
    """bytes -> rank from a tiktoken.model; CheckpointError naming the line at fault."""
    def bad(why):
        return CheckpointError(f"{path}: not a tiktoken BPE file: {why}", path=str(path))
    try:
        lines = path.read_bytes().splitlines()
    except OSError as e:
        raise CheckpointError(f"{path}: unreadable ({e})", path=str(path)) from e
    ranks = {}
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2 or not fields[1].isdigit():
            raise bad(f"line {n} is not 'base64-token rank'")
        try:
            token = base64.b64decode(fields[0], validate=True)
        except binascii.Error as e:
            raise bad(f"line {n}: token is not base64 ({e})") from e
        if not token or token in ranks:
            raise bad(f"line {n}: token {token!r} is empty or listed twice")
        ranks[token] = int(fields[1])
    check_ranks(ranks, bad)
    return ranks


def check_ranks(ranks, bad):
    if sorted(ranks.values()) != list(range(len(ranks))):
        missing = min(set(range(len(ranks))) - set(ranks.values()))
        raise bad(f"ranks are not 0..{len(ranks) - 1} each once (no rank {missing})")
    missing = [b for b in range(256) if bytes([b]) not in ranks]
    if missing:     # the merges could not spell text holding that byte
        raise bad(f"{len(missing)} single bytes have no rank (first: {missing[0]:#04x})")


def added_tokens(config, num_ranks, path):
    """id -> (content, special) for the ids after the ranks, reserved gaps named."""
    added = {}
    for key, entry in (config.get("added_tokens_decoder") or {}).items():
        content = entry.get("content") if isinstance(entry, dict) else None
        if not str(key).isdigit() or not isinstance(content, str) or not content:
            raise CheckpointError(f"{path}: added_tokens_decoder[{key!r}] needs an integer id "
                                  "and a non-empty 'content'", path=str(path))
        if int(key) < num_ranks:
            raise CheckpointError(f"{path}: added token {content!r} has id {key}, inside the "
                                  f"BPE ranks 0..{num_ranks - 1}", path=str(path))
        added[int(key)] = (content, bool(entry.get("special", True)))
    for i in range(num_ranks, max(added, default=num_ranks - 1)):
        added.setdefault(i, (f"<|reserved_token_{i}|>", True))
    names = [content for content, _ in added.values()]
    if len(set(names)) != len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise CheckpointError(f"{path}: added tokens {twice} have more than one id",
                              path=str(path))
    return added


def byte_level_alphabet():
    """byte -> the character byte-level BPE vocabularies spell it with (GPT-2's map):
    printable Latin-1 bytes as themselves, the others shifted to U+0100 and up."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    shifted = iter(range(256, 512))
    return {b: chr(b) if b in kept else chr(next(shifted)) for b in range(256)}


def pieces(text):
    """text cut where tiktoken needs it (MAX_PIECE_CHARS, MAX_RUN_CHARS)."""
    n = MAX_RUN_CHARS + 1
    long_runs = re.compile(rf"\s{{{n},}}|\S{{{n},}}")     # re caches it
    for start in range(0, len(text), MAX_PIECE_CHARS):
        chunk, cut = text[start:start + MAX_PIECE_CHARS], 0
        for run in long_runs.finditer(chunk):
            for at in range(run.start() + MAX_RUN_CHARS, run.end(), MAX_RUN_CHARS):
                yield chunk[cut:at]
                cut = at
        yield chunk[cut:]


class TiktokenBPE:
    """Ranked byte merges + added tokens, behind the tokenizers.Tokenizer calls we use."""

    def __init__(self, ranks, added):
        import tiktoken
        self.num_ranks = len(ranks)
        self.ranks = ranks                                    # bytes -> rank
        self.ids = {content: i for i, (content, _) in added.items()}
        self.special_ids = frozenset(i for i, (_, special) in added.items() if special)
        self.encoding = tiktoken.Encoding(TIKTOKEN_FILE, pat_str=KIMI_PATTERN,
                                          mergeable_ranks=ranks, special_tokens=self.ids)
        self._bytes_of = {ch: b for b, ch in byte_level_alphabet().items()}

    @classmethod
    def from_files(cls, path, config, config_path):
        ranks = read_ranks(path)
        return cls(ranks, added_tokens(config, len(ranks), config_path))

    def get_vocab_size(self, with_added_tokens=True):
        return self.num_ranks + (len(self.ids) if with_added_tokens else 0)

    def token_to_id(self, token):
        """An added token by its content, a ranked one by its byte-level spelling."""
        if token in self.ids:
            return self.ids[token]
        if all(ch in self._bytes_of for ch in token):
            return self.ranks.get(bytes(self._bytes_of[ch] for ch in token))
        return None

    def encode_batch(self, texts, add_special_tokens=True):
        """Added tokens written in the text are their own ids, as with tokenizers; there
        is no post-processor, so add_special_tokens adds nothing (tokenizer_config's
        add_bos_token does, in Tokenizer.encode). tiktoken encodes without the GIL."""
        return [Encoded([i for piece in pieces(text)
                         for i in self.encoding.encode(piece, allowed_special="all")])
                for text in texts]

    def decode(self, ids, skip_special_tokens=True):
        """Ids outside the vocabulary are dropped, as tokenizers drops them; a split
        UTF-8 character decodes to U+FFFD."""
        size, skip = self.get_vocab_size(), self.special_ids if skip_special_tokens else ()
        return self.encoding.decode([i for i in ids if 0 <= i < size and i not in skip],
                                    errors="replace")
