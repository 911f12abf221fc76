"""The stream-loading ring's protocol, checked from a CPUDevice event log, and the
hand-built expert layers the accelerator tests share."""
from collections import Counter

import torch

from moed.backends.torch import TorchExperts
from moed.model.formats import Weight, quantize_fp8


def expert_layer(fmt, E=8, D=192, I=80, seed=0):
    """TorchExperts with E random experts, FP8 (128x128 blocks, partial edge blocks at
    D=192, I=80) or BF16."""
    g = torch.Generator().manual_seed(seed)

    def weight(out, inp):
        w = torch.randn(out, inp, generator=g) * inp ** -0.5
        if fmt == "fp8":
            return Weight(*quantize_fp8(w), (128, 128))
        return Weight(w.to(torch.bfloat16))
    return TorchExperts([weight(I, D) for _ in range(E)], [weight(I, D) for _ in range(E)],
                        [weight(D, I) for _ in range(E)])


def check_protocol(log, chunk, topk_ids, ring_length, num_experts):
    """Assert one chunk's ring protocol from the device log; -> (copies, launches)."""
    log = [e for e in log if e.tag.get("chunk", chunk) == chunk]
    copies = {e.tag["position"]: e for e in log if e.kind == "copy_start"}
    copy_ends = {e.tag["position"]: e for e in log if e.kind == "copy_end"}
    launches = {e.tag["position"]: e for e in log if e.kind == "launch_start"}
    ready = {e.tag["position"]: e for e in log if e.kind == "record" and e.event.startswith("ready")}
    done = {e.tag["position"]: e for e in log if e.kind == "record" and e.event.startswith("done")}
    used = sorted(set(topk_ids.reshape(-1).tolist()))

    # every used expert copied exactly once, in ascending order; unused never
    copied = Counter(e.tag["expert"] for e in copies.values())
    assert copied == Counter(used), f"copied {dict(copied)}, used {used}"
    assert not set(copied) - set(used)
    assert [copies[i].tag["expert"] for i in sorted(copies)] == used
    assert all(c.tag["slot"] == i % ring_length for i, c in copies.items())

    for i, launch in launches.items():
        s = launch.tag["slot"]
        # no compute on a slot before its ready event (for this very position)
        assert ready[i].seq < launch.seq, f"position {i}: compute before ready[{s}]"
        assert ready[i].event == f"ready[{s}]" and copy_ends[i].seq < ready[i].seq
        # and the slot still holds this expert: the last copy into it is this one
        last = max((c for c in copy_ends.values() if c.tag["slot"] == s and c.seq < launch.seq),
                   key=lambda c: c.seq)
        assert last.tag["position"] == i, f"slot {s} overwritten before position {i} ran"

    for i, copy in copies.items():
        s = copy.tag["slot"]
        # no slot reused before the done event of every earlier use
        for p in range(i % ring_length, i, ring_length):
            assert done[p].event == f"done[{s}]"
            assert done[p].seq < copy.seq, f"slot {s} refilled (position {i}) before done of {p}"
    assert sorted(launches) == sorted(copies) == list(range(len(used)))
    return copies, launches


def intervals(log, chunk, start, end):
    """{position: (t_start, t_end)} of one chunk's start/end entry pairs."""
    begin = {e.tag["position"]: e.time for e in log if e.kind == start and e.tag.get("chunk") == chunk}
    return {p: (t, next(e.time for e in log if e.kind == end and e.tag.get("chunk") == chunk
                        and e.tag["position"] == p)) for p, t in begin.items()}


def overlaps(copy_spans, compute_spans):
    """Pairs (copy position, compute position) whose time spans intersect."""
    return [(c, k) for c, (a, b) in copy_spans.items() for k, (s, e) in compute_spans.items()
            if c != k and a < e and s < b]
