"""ShardedExperts over 2 and 3 gloo ranks on the CPU (with the reference on each rank,
and as DSLP with each rank streaming its share through StreamedExperts on its CPU
device, against one rank streaming the whole layer): every rank's output equals the
one-rank TorchExperts reference within FP32 reordering (max |diff| <= 1e-5 of max
|reference|), FP8 and BF16, ragged routing (idle experts, one hot, a rank with no
pairs); all ranks agree bit for bit; each rank keeps only its share's Weights; the
shares cover every expert once; clear errors for a world larger than the layer and
for ids outside [0, E)."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from accel_protocol import expert_layer
from moed.backends.accel.cpu_device import CPUDevice
from moed.backends.accel.expert_parallel import ShardedExperts, expert_share
from moed.backends.accel.streamed_experts import StreamedExperts
from moed.errors import ConfigError, InvalidRequestError

E, D, K = 8, 192, 3
TOL = 1e-5
PCIE = 2e9            # bytes/s of the CPU device's copies (DSLP)


def routing(T, unused=(), hot=None, seed=1):
    """x [T, D], topk_ids [T, k] (distinct per row), topk_weights [T, k]; hot: the expert
    most tokens pick; unused: experts no token picks."""
    g = torch.Generator().manual_seed(seed)
    pool = [e for e in range(E) if e not in unused]
    p = torch.tensor([8.0 if e == hot else 1.0 for e in pool])
    ids = torch.stack([torch.tensor(pool)[torch.multinomial(p, K, generator=g)] for _ in range(T)])
    return torch.randn(T, D, generator=g), ids, torch.rand(T, K, generator=g)


CASES = [routing(37, unused=(2, 5), hot=0),          # ragged: one hot, two idle
         routing(29, unused=(6, 7), hot=3, seed=2),  # W = 3: rank 2's share [6, 8) idle
         routing(1, seed=3),                         # a single token
         routing(64, seed=4)]                        # every expert busy


def rank_main(rank, world_size, init_file, out_dir):
    """One rank: shard each layer, run every case, save the outputs."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world_size)
    try:
        results = {}
        for fmt in ("fp8", "bf16"):
            sharded = ShardedExperts.from_reference(expert_layer(fmt, E=E, D=D))
            results[fmt] = {"share": sharded.share, "held": sharded.local.num_experts,
                            "outs": [sharded.forward(*case) for case in CASES]}
            with CPUDevice(bandwidth=PCIE) as device:      # DSLP: each rank streams its share
                streamed = ShardedExperts.from_reference(
                    expert_layer(fmt, E=E, D=D),
                    local=lambda g, u, d: StreamedExperts(g, u, d, device, ring_length=2))
                results[f"dslp-{fmt}"] = [streamed.forward(*case) for case in CASES]
        torch.save(results, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def gloo_available():
    return dist.is_available() and dist.is_gloo_available()


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_equal_reference(tmp_path, world_size):
    if not gloo_available():
        pytest.skip("torch.distributed with the gloo backend is not available")
    mp.spawn(rank_main, args=(world_size, str(tmp_path / "init"), str(tmp_path)),
             nprocs=world_size, join=True)
    ranks = [torch.load(tmp_path / f"{r}.pt", weights_only=False) for r in range(world_size)]
    for fmt in ("fp8", "bf16"):
        ref = expert_layer(fmt, E=E, D=D)
        shares = [r[fmt]["share"] for r in ranks]
        assert sorted(e for s in shares for e in s) == list(range(E))    # each expert once
        assert [r[fmt]["held"] for r in ranks] == [len(s) for s in shares]
        for c, (x, ids, w) in enumerate(CASES):
            want = ref.forward(x, ids, w)
            got = ranks[0][fmt]["outs"][c]
            assert got.dtype == want.dtype and got.shape == want.shape
            err, scale = (got - want).abs().max().item(), want.abs().max().item()
            print(f"W={world_size} {fmt} case {c}: max |diff| {err:.3e}, max |ref| {scale:.3e}")
            assert err <= TOL * scale, (fmt, c, err, scale)
            for r in ranks[1:]:
                assert torch.equal(r[fmt]["outs"][c], got), (fmt, c)   # ranks agree exactly
        # DSLP against one rank streaming the whole layer: the same per-expert math,
        # the experts' sums in another order
        with CPUDevice() as device:
            one = StreamedExperts.from_reference(ref, device, ring_length=2)
            for c, case in enumerate(CASES):
                want = one.forward(*case)
                got = ranks[0][f"dslp-{fmt}"][c]
                err, scale = (got - want).abs().max().item(), want.abs().max().item()
                print(f"DSLP W={world_size} {fmt} case {c}: max |diff| {err:.3e}")
                assert err <= TOL * scale, (fmt, c, err, scale)
                for r in ranks[1:]:
                    assert torch.equal(r[f"dslp-{fmt}"][c], got), (fmt, c)


@pytest.mark.parametrize("world_size", [1, 2, 3, 5, 8])
def test_shares_balanced_and_cover(world_size):
    shares = [expert_share(r, world_size, E) for r in range(world_size)]
    assert [e for s in shares for e in s] == list(range(E))           # contiguous, in order
    sizes = [len(s) for s in shares]
    assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1


def test_world_larger_than_layer():
    with pytest.raises(ConfigError, match="world size 9 for 8 experts") as exc:
        ShardedExperts.from_reference(expert_layer("bf16", E=E, D=D), rank=0, world_size=9)
    assert exc.value.field == "world_size"
    with pytest.raises(ConfigError) as exc:
        expert_share(3, 3, E)
    assert exc.value.field == "rank"


def test_ids_outside_layer():
    # raised before the all-reduce: no process group needed
    sharded = ShardedExperts.from_reference(expert_layer("bf16", E=E, D=D), rank=1, world_size=2)
    assert sharded.share == range(4, 8) and sharded.local.num_experts == 4
    x, ids, w = routing(5)
    for bad in (E, -1):
        ids_bad = ids.clone()
        ids_bad[2, 1] = bad
        with pytest.raises(InvalidRequestError, match=r"topk_ids\[2, 1\]") as exc:
            sharded.forward(x, ids_bad, w)
        assert exc.value.field == "topk_ids"
    with pytest.raises(InvalidRequestError) as exc:
        sharded.forward(x, ids[:, :2], w)
    assert exc.value.field == "topk_weights"
