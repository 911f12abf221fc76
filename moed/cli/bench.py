"""`moectl bench`: N concurrent greedy streams of a fixed prompt and output length.

Measured on the client, per stream: TTFT (send -> first token) and TPOT
((last token - first token) / (tokens - 1)); overall: output tokens / wall time.
The prompt is token ids (no tokenizer needed on the client) and EOS is ignored,
so every stream produces exactly the asked number of tokens.
"""
import asyncio
import sys
import time
from dataclasses import dataclass, field

from moed.server.gen import generation_pb2 as pb


@dataclass
class StreamResult:
    ttft_s: float = None
    token_times: list = field(default_factory=list)
    num_tokens: int = 0

    @property
    def tpot_s(self):
        if self.num_tokens < 2:
            return None
        return (self.token_times[-1] - self.token_times[0]) / (self.num_tokens - 1)


def percentile(values, q):
    """Nearest-rank percentile of a non-empty list (q in [0, 100])."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


def prompt_ids(vocab_size, n, stream):
    # Spread over the vocabulary, different per stream so no two prompts are equal.
    return [(stream * 7919 + i * 104729) % (vocab_size - 1) + 1 for i in range(n)]


async def one_stream(stub, ids, output_tokens, progress):
    req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), ignore_eos=True,
                             sampling=pb.SamplingParams(temperature=0, max_new_tokens=output_tokens))
    result, t0 = StreamResult(), time.perf_counter()
    async for msg in stub.Generate(req):
        if msg.HasField("chunk") and msg.chunk.token_ids:
            now = time.perf_counter()
            if result.ttft_s is None:
                result.ttft_s = now - t0
            result.token_times += [now] * len(msg.chunk.token_ids)
            result.num_tokens += len(msg.chunk.token_ids)
            progress(len(msg.chunk.token_ids))
    return result


async def run_bench(client, streams, prompt_tokens, output_tokens, show_progress=True):
    async with client.channel(aio=True) as channel:
        stub = client.generation(channel)
        info = await stub.GetModelInfo(pb.GetModelInfoRequest())
        bar = _progress_bar(streams * output_tokens, show_progress)
        t0 = time.perf_counter()
        results = await asyncio.gather(*(
            one_stream(stub, prompt_ids(info.vocab_size, prompt_tokens, s), output_tokens,
                       bar.update) for s in range(streams)))
        wall = time.perf_counter() - t0
        bar.close()
    return summarize(results, wall, streams, prompt_tokens, output_tokens, info)


def summarize(results, wall, streams, prompt_tokens, output_tokens, info):
    ttft = [r.ttft_s for r in results if r.ttft_s is not None]
    tpot = [r.tpot_s for r in results if r.tpot_s is not None]
    total = sum(r.num_tokens for r in results)
    ms = lambda xs, q: round(1000 * percentile(xs, q), 2) if xs else None  # noqa: E731
    return {"model": info.architecture, "weight_format": info.weight_format, "isa": info.isa,
            "device": info.device, "streams": streams, "prompt_tokens": prompt_tokens,
            "output_tokens": output_tokens, "ttft_p50_ms": ms(ttft, 50), "ttft_p99_ms": ms(ttft, 99),
            "tpot_p50_ms": ms(tpot, 50), "tpot_p99_ms": ms(tpot, 99),
            "total_output_tokens": total, "wall_s": round(wall, 3),
            "throughput_tok_s": round(total / wall, 2)}


def _progress_bar(total, show):
    from tqdm import tqdm
    return tqdm(total=total, unit="tok", desc="bench", file=sys.stderr, disable=not show,
                leave=False)
