"""`moectl bench`: N concurrent greedy streams of a fixed prompt and output length;
`moectl bench --mixed`: N streams decoding while long prompts arrive.

Measured on the client, per stream: TTFT (send -> first token) and TPOT
((last token - first token) / (tokens - 1)); overall: output tokens / wall time.
The prompt is token ids (no tokenizer needed on the client) and EOS is ignored,
so every stream produces exactly the asked number of tokens.
"""
import asyncio
import secrets
import sys
import time
from dataclasses import dataclass, field

import grpc

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


def prompt_ids(vocab_size, n, stream, salt=0):
    # Spread over the vocabulary, different per stream so no two prompts are equal, and
    # per run (salt) so that a run never hits the prefix cache an earlier one filled.
    return [((salt + stream) * 7919 + i * 104729) % (vocab_size - 1) + 1 for i in range(n)]


def run_salt():
    return secrets.randbelow(1 << 30)


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
        salt = run_salt()
        t0 = time.perf_counter()
        results = await asyncio.gather(*(
            one_stream(stub, prompt_ids(info.vocab_size, prompt_tokens, s, salt), output_tokens,
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
    # a bar on a terminal only: in a log its redraws would be thousands of lines
    return tqdm(total=total, unit="tok", desc="bench", file=sys.stderr, leave=False,
                disable=not show or not sys.stderr.isatty())


# -- bench --mixed: decoding streams while long prompts arrive
@dataclass
class OpenStream:
    """A stream that decodes until stopped; token_times are its tokens' arrivals."""
    token_times: list = field(default_factory=list)
    call: object = None


async def open_stream(stub, s, ids, max_new_tokens, progress):
    """Run OpenStream s until its call ends or is cancelled -> s."""
    req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=ids), ignore_eos=True,
                             sampling=pb.SamplingParams(temperature=0,
                                                        max_new_tokens=max_new_tokens))
    s.call = stub.Generate(req)
    try:
        async for msg in s.call:
            if msg.HasField("chunk") and msg.chunk.token_ids:
                s.token_times += [time.perf_counter()] * len(msg.chunk.token_ids)
                progress(len(msg.chunk.token_ids))
    except asyncio.CancelledError:
        pass
    except grpc.aio.AioRpcError as e:       # CANCELLED: we stopped it
        if e.code() != grpc.StatusCode.CANCELLED:
            raise
    return s


def gaps_within(streams, start, end, whole=False):
    """Inter-token gaps (s) of every stream whose later token arrived in [start, end)
    (whole: both tokens did)."""
    return [b - a for s in streams for a, b in zip(s.token_times, s.token_times[1:])
            if start <= b < end and (not whole or a >= start)]


async def until(predicate, poll=0.005):
    while not predicate():
        await asyncio.sleep(poll)


async def run_mixed(client, streams, prompt_tokens, long_tokens, long_prompts=1,
                    idle_tokens=16, show_progress=True):
    """`streams` greedy streams decode; once each has `idle_tokens` tokens (the idle
    window), `long_prompts` prompts of `long_tokens` tokens arrive together (one output
    token each); after the last one's first token the streams decode `idle_tokens` more
    and are stopped. Each long prompt is first timed alone (its solo TTFT). TPOT here
    is the gap between a stream's consecutive tokens: idle (before the long prompts
    and after them) and during their prefill."""
    async with client.channel(aio=True) as channel:
        stub = client.generation(channel)
        info = await stub.GetModelInfo(pb.GetModelInfoRequest())
        salt = run_salt()
        ids_of = lambda n, stream: prompt_ids(info.vocab_size, n, stream, salt)  # noqa: E731
        # the solo prompts differ from the mixed ones: the prefix cache must not serve them
        long_ids = [ids_of(long_tokens, 2000 + i) for i in range(long_prompts)]
        await one_stream(stub, ids_of(8, 999), 2, lambda n: None)  # warm
        solo = [(await one_stream(stub, ids_of(long_tokens, 1000 + i), 1, lambda n: None)).ttft_s
                for i in range(long_prompts)]
        bar = _progress_bar(None, show_progress)
        budget = max(2 * idle_tokens, info.context_length - prompt_tokens - 1)
        opened = [OpenStream() for _ in range(streams)]
        t0 = time.perf_counter()
        tasks = [asyncio.create_task(open_stream(stub, s, ids_of(prompt_tokens, i),
                                                 budget, bar.update))
                 for i, s in enumerate(opened)]
        await until(lambda: all(t.done() or len(s.token_times) >= idle_tokens
                                for t, s in zip(tasks, opened)))
        sent = time.perf_counter()
        mixed = await asyncio.gather(*(one_stream(stub, ids, 1, bar.update) for ids in long_ids))
        done = time.perf_counter()
        marks = [len(s.token_times) for s in opened]
        await until(lambda: all(t.done() or len(s.token_times) >= m + idle_tokens
                                for t, s, m in zip(tasks, opened, marks)))
        for s in opened:
            s.call.cancel()
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - t0
        bar.close()
    # idle: once every stream has its first token (their own prompts are prefilled), and
    # after the long prompts; `whole`: both tokens of a gap inside the window
    settled = max((s.token_times[0] for s in opened if s.token_times), default=t0)
    idle = gaps_within(opened, settled, sent, whole=True) + \
        gaps_within(opened, done, float("inf"), whole=True)
    during = gaps_within(opened, sent, done)
    ms = lambda xs, q: round(1000 * percentile(xs, q), 2) if xs else None  # noqa: E731
    total = sum(len(s.token_times) for s in opened) + sum(r.num_tokens for r in mixed)
    out = {"model": info.architecture, "weight_format": info.weight_format, "isa": info.isa,
           "device": info.device, "streams": streams, "prompt_tokens": prompt_tokens,
           "long_prompt_tokens": long_tokens, "long_prompts": long_prompts,
           "tpot_idle_p50_ms": ms(idle, 50), "tpot_idle_p99_ms": ms(idle, 99),
           "tpot_prefill_p50_ms": ms(during, 50), "tpot_prefill_p99_ms": ms(during, 99),
           "long_ttft_solo_ms": ms(solo, 50),
           "long_ttft_mixed_ms": ms([r.ttft_s for r in mixed], 50),
           "total_tokens": total, "wall_s": round(wall, 3),
           "throughput_tok_s": round(total / wall, 2)}
    worst = max(((b - a, b) for st in opened for a, b in zip(st.token_times, st.token_times[1:])
                 if a >= settled), default=None)
    if worst is not None:      # the longest gap, and when it ended (ms after the prompts came)
        out["worst_gap_ms"] = round(1000 * worst[0], 2)
        out["worst_gap_end_ms"] = round(1000 * (worst[1] - sent), 2)
        out["prefill_window_ms"] = round(1000 * (done - sent), 2)
    for ratio, num, den in (("tpot_p99_ratio", "tpot_prefill_p99_ms", "tpot_idle_p99_ms"),
                            ("long_ttft_ratio", "long_ttft_mixed_ms", "long_ttft_solo_ms")):
        if out[num] and out[den]:
            out[ratio] = round(out[num] / out[den], 2)
    return out
