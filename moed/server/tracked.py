"""One in-flight request as the server sees it: where its stream goes, and when
each phase began (wall-clock ns, so spans can be written after the fact)."""
import time
from dataclasses import dataclass, field


@dataclass
class Timing:
    queue_s: float
    ttft_s: float
    total_s: float


@dataclass
class Tracked:
    request_id: str
    prompt: list                    # token ids (tokenized before the engine sees them)
    params: object                  # SamplingParams
    sink: object = None             # callable(event) run on the asyncio loop; None: nobody listens
    trace_context: object = None    # OpenTelemetry parent context from the client's metadata
    operation: str = "text_completion"  # GenAI operation: text_completion | chat
    t_arrival: int = field(default_factory=time.time_ns)
    t_scheduled: int = None         # first step that ran any of its prompt
    t_first_token: int = None
    t_finished: int = None
    prefill_chunks: int = 0
    prefill_plan: str = ""          # the planner's choice for its prompt (path, chunk, why)
    prefill_path: str = "cpu"       # cpu | slp | dslp (the planner's; cpu under a fixed budget)
    num_cached_tokens: int = 0      # prompt tokens found in the prefix cache
    prefill_where: str = "engine"   # engine | prefill worker
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    finish_reason: str = None
    computed: int = 0               # prompt tokens in the KV cache at the last look
    # the text stage's (its thread only): text so far, stop strings, where one hit
    detokenizer: object = None      # IncrementalDetokenizer
    stops: object = None            # StopChecker
    stopped_at: int = None          # output tokens when a stop string completed

    @property
    def state(self):
        if self.t_first_token is not None:
            return "decode"
        return "prefill" if self.t_scheduled is not None else "waiting"

    def timing(self):
        end = self.t_finished or time.time_ns()
        start = self.t_arrival

        def since(t):
            return ((t if t is not None else end) - start) / 1e9
        return Timing(since(self.t_scheduled), since(self.t_first_token), since(end))
