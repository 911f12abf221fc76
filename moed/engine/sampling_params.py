"""How one request samples and when it stops."""
from dataclasses import dataclass, field

from moed.errors import InvalidRequestError

MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    temperature: float = 1.0          # 0 = greedy
    top_k: int = 0                    # 0 = off
    top_p: float = 1.0                # (0, 1]
    min_p: float = 0.0                # [0, 1)
    repetition_penalty: float = 1.0   # > 0; 1 = off (prompt and output tokens)
    presence_penalty: float = 0.0     # output tokens
    frequency_penalty: float = 0.0    # output tokens
    seed: int = None                  # same seed, same output
    max_new_tokens: int = 64
    stop: list = field(default_factory=list)           # stop strings (not in the text)
    stop_token_ids: list = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int = None              # None = off; n >= 0: chosen token + top n

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        self.validate()

    def validate(self):
        def bad(name, why):
            raise InvalidRequestError(f"sampling.{name}: {why}", field=name)

        if not self.temperature >= 0:
            bad("temperature", f"must be >= 0, got {self.temperature}")
        if not (0 < self.top_p <= 1):
            bad("top_p", f"must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            bad("top_k", f"must be >= 0, got {self.top_k}")
        if not (0 <= self.min_p < 1):
            bad("min_p", f"must be in [0, 1), got {self.min_p}")
        if not self.repetition_penalty > 0:
            bad("repetition_penalty", f"must be > 0, got {self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not (-2.0 <= getattr(self, name) <= 2.0):
                bad(name, f"must be in [-2, 2], got {getattr(self, name)}")
        if self.max_new_tokens < 1:
            bad("max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        if self.logprobs is not None and not (0 <= self.logprobs <= MAX_LOGPROBS):
            bad("logprobs", f"must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop", "stop strings must be non-empty strings")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            bad("stop_token_ids", "must be non-negative integers")

    @property
    def greedy(self):
        return self.temperature == 0
