"""One request's state through the engine."""
import enum
import itertools

import torch

_ids = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    def __init__(self, request_id, prompt_ids, params, detokenizer=None, stops=None):
        self.request_id = request_id
        self.order = next(_ids)                 # arrival order (FIFO tie-break)
        self.prompt_ids = list(prompt_ids)
        self.output_ids = []
        self.params = params
        self.status = Status.WAITING
        self.num_computed = 0                   # tokens whose KV is in the cache
        self.block_table = []
        self.block_hashes = []                  # chain hashes of its registered blocks
        self.num_cached_tokens = 0              # prompt tokens found in the prefix cache
        self.detokenizer = detokenizer
        self.stops = stops                      # StopChecker over the output text
        self.text = ""                          # output text released so far (stops cut)
        self.finish_reason = None
        self.prefill_plan = None                # PrefillPlan (moed.engine.planner), set on add
        self.prefill_chunk = None               # its chunk: tokens of a step with no decode
        self.generator = None
        if params.seed is not None:
            self.generator = torch.Generator().manual_seed(params.seed)

    @property
    def num_tokens(self):
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def token_ids(self):
        return self.prompt_ids + self.output_ids

    def tokens(self, start, end):
        """token_ids[start:end] without building the whole list (hot in decode)."""
        n = len(self.prompt_ids)
        if start >= n:
            return self.output_ids[start - n:end - n]
        return self.prompt_ids[start:end] + self.output_ids[:max(0, end - n)]

    @property
    def num_remaining(self):
        """Tokens still to be run through the model before the next sample."""
        return self.num_tokens - self.num_computed

    @property
    def finished(self):
        return self.status is Status.FINISHED
