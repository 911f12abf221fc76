"""The offline Python API.

    from moed import LLM, SamplingParams
    llm = LLM("/models/Qwen3-30B-A3B-FP8")
    out = llm.generate(["Hello"], SamplingParams(temperature=0, max_new_tokens=32))
    print(out[0].text)
"""
from dataclasses import dataclass, field

import numpy as np

from moed.engine.kv_cache import blocks_for
from moed.engine.llm_engine import LLMEngine
from moed.engine.sampling_params import SamplingParams
from moed.engine.sequence import Sequence
from moed.errors import CapacityError, InvalidRequestError


@dataclass
class CompletionOutput:
    request_id: str
    prompt_token_ids: list
    token_ids: list = field(default_factory=list)
    text: str = ""
    finish_reason: str = None
    logprobs: list = None       # per token: (token_id, logprob, [(id, logprob)] * n)


def _is_token_ids(x):
    return isinstance(x, (list, tuple)) and all(isinstance(t, int) for t in x) and len(x) > 0


class LLM:
    def __init__(self, model_dir, device="auto", **engine_kwargs):
        self.engine = LLMEngine(model_dir, device, **engine_kwargs)
        self.tokenizer = self.engine.tokenizer

    def close(self):
        """Stop the engine's helper processes (prefill worker, DSLP ranks)."""
        self.engine.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def model_info(self):
        return self.engine.model_info

    def logits(self, token_ids):
        """Next-token logits at every position, from one forward pass: [len, V] float32."""
        eng = self.engine
        params = SamplingParams(max_new_tokens=1)
        ids = eng.validate_prompt(list(token_ids), params)
        seq = Sequence("logits", ids, params)
        if eng.planner is not None:          # the path the request would take (one chunk)
            seq.prefill_plan = eng.planner.plan(len(ids))
        if not eng.blocks.can_grow(seq.block_table, len(ids)):
            raise CapacityError(f"{blocks_for(len(ids), eng.block_size)} KV blocks needed, "
                                f"{eng.blocks.num_free} free")
        eng.blocks.grow(seq.block_table, len(ids))
        try:
            out = eng.runner.run([(seq, len(ids))])
        finally:
            eng.blocks.free(seq.block_table)
        return out.float().cpu().numpy().astype(np.float32)

    def generate(self, prompts, params=None):
        """prompts: a string, a list of token ids, or a list of either -> [CompletionOutput]."""
        if isinstance(prompts, str) or _is_token_ids(prompts):
            prompts = [prompts]
        if not prompts:
            raise InvalidRequestError("no prompts given", field="prompt")
        params = params or SamplingParams()
        plist = params if isinstance(params, list) else [params] * len(prompts)
        results = {}
        try:
            for prompt, p in zip(prompts, plist):
                rid = self.engine.add_request(prompt if isinstance(prompt, str) else list(prompt), p)
                results[rid] = CompletionOutput(rid, list(self.engine.seqs[rid].prompt_ids),
                                                logprobs=[] if p.logprobs is not None else None)
            for out in self._run():
                self._merge(results[out.request_id], out)
        finally:            # a bad prompt or an interrupt leaves nothing behind in the engine
            for rid, result in results.items():
                if result.finish_reason is None:
                    self.engine.abort_request(rid)
        return list(results.values())

    def stream(self, prompt, params=None):
        """Yield text deltas of one generation as they are produced."""
        rid = self.engine.add_request(prompt, params or SamplingParams())
        try:
            for out in self._run():
                if out.request_id == rid and out.new_text:
                    yield out.new_text
        finally:
            self.engine.abort_request(rid)

    def chat(self, messages, params=None):
        """One conversation (list of {role, content}) -> CompletionOutput; a list of them -> list."""
        def ids(conversation):   # the template writes BOS and role markers itself
            text = self.tokenizer.apply_chat_template(conversation)
            return self.tokenizer.encode(text, add_special_tokens=False)

        if messages and isinstance(messages[0], dict):
            return self.generate(ids(messages), params)[0]
        return self.generate([ids(m) for m in messages], params)

    def _run(self):
        while self.engine.has_unfinished():
            yield from self.engine.step()

    @staticmethod
    def _merge(result, out):
        if out.error is not None:       # the step failed under this request alone
            raise out.error
        result.token_ids.extend(out.new_token_ids)
        result.text += out.new_text
        if out.logprobs is not None:
            result.logprobs.extend(out.logprobs)
        if out.finished:
            result.finish_reason = out.finish_reason
