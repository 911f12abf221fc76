"""Next-token sampling and logprobs, one row per sequence.

Order: penalties -> (greedy | temperature -> min-p -> top-k -> top-p -> draw).
Logprobs are those of the model's raw distribution (log-softmax of the
logits before penalties and truncation), like vLLM's default.
Shape legend: B rows, V vocab.
"""
from dataclasses import dataclass

import torch


@dataclass
class Sample:
    token_id: int
    logprob: float = None          # of the chosen token (when asked)
    top: list = None               # [(token_id, logprob)] * n (when asked)


def apply_penalties(logits, params, prompt_ids, output_ids):
    # logits [V] float32 (a copy)
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt_ids) | set(output_ids)), dtype=torch.int64,
                            device=logits.device)
        if seen.numel():
            vals = logits[seen]
            logits[seen] = torch.where(vals > 0, vals / params.repetition_penalty,
                                       vals * params.repetition_penalty)
    if (params.presence_penalty or params.frequency_penalty) and output_ids:
        out = torch.tensor(output_ids, dtype=torch.int64, device=logits.device)
        counts = torch.bincount(out, minlength=logits.shape[0]).float()
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0)
    # a penalty near 0 divides logits past float range: +inf would make the softmax NaN
    big = torch.finfo(logits.dtype).max
    return logits.clamp_(-big, big)


def truncate(probs, params):
    """Zero out what min-p, top-k and top-p exclude; probs [V] sums to 1."""
    if params.min_p > 0:
        probs = torch.where(probs < params.min_p * probs.max(), 0.0, probs)
    if 0 < params.top_k < probs.shape[0]:
        kth = probs.topk(params.top_k).values[-1]
        probs = torch.where(probs < kth, 0.0, probs)
    if params.top_p < 1.0:
        sorted_p, order = probs.sort(descending=True)
        cum = sorted_p.cumsum(0)
        drop = (cum - sorted_p) >= params.top_p * cum[-1]     # mass before it already enough
        drop[0] = False         # a top_p so small that top_p * mass underflows keeps the top token
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return probs


def sample_row(logits, params, prompt_ids, output_ids, generator):
    """logits [V] float32 -> Sample."""
    raw = logits
    logits = apply_penalties(logits.clone(), params, prompt_ids, output_ids)
    if params.greedy:
        token = int(torch.argmax(logits))
    else:
        # shifted so the top logit is 0 before the division: a tiny temperature sends the
        # others to -inf (probability 0), never the top one to +inf (NaN)
        probs = truncate(torch.softmax((logits - logits.max()) / params.temperature, dim=-1),
                         params)
        token = int(torch.multinomial(probs, 1, generator=generator))
    if params.logprobs is None:
        return Sample(token)
    logp = torch.log_softmax(raw, dim=-1)
    top = []
    if params.logprobs:
        vals, ids = logp.topk(params.logprobs)
        top = list(zip(ids.tolist(), vals.tolist()))
    return Sample(token, float(logp[token]), top)


def _plain_greedy(params):
    return (params.greedy and params.logprobs is None and params.repetition_penalty == 1.0
            and not params.presence_penalty and not params.frequency_penalty)


def sample(logits, seqs):
    # logits [B, V] -> [Sample] * B, one per sequence in order (an Exception in place of
    # a row the sampler failed on)
    out = [None] * len(seqs)
    plain = [i for i, s in enumerate(seqs) if _plain_greedy(s.params)]
    if plain:   # the common decode case in one vectorised argmax, on the logits' device
        rows = logits if len(plain) == len(seqs) else \
            logits.index_select(0, torch.tensor(plain, device=logits.device))
        for i, t in zip(plain, _argmax(rows).tolist()):
            out[i] = Sample(t)
    rest = [i for i in range(len(seqs)) if out[i] is None]
    if rest:
        rows = logits[rest].float().cpu()
        for j, i in enumerate(rest):
            s = seqs[i]
            try:
                out[i] = sample_row(rows[j], s.params, s.prompt_ids, s.output_ids, s.generator)
            except Exception as e:      # this row's values broke it: that request fails alone
                out[i] = e
    return out


def _argmax(rows):
    # rows [B, V] -> [B] int64; on the CPU the compiled pass (same answer as torch's)
    if rows.device.type == "cpu":
        try:
            from moed.backends.cpu.isa import load_kernels
            kernels = load_kernels()
        except ImportError:         # the compiled engine is not built: torch's
            return rows.argmax(dim=-1)
        from moed.backends.cpu.glue import argmax
        return argmax(rows, kernels)
    return rows.argmax(dim=-1)
