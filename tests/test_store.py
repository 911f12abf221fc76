"""The packed expert store: round trip, stale/truncated/corrupt files rebuilt,
and two processes sharing the mapped pages."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from moed.errors import CheckpointError
from moed.backends.cpu.experts import CPUExpertLayer
from moed.backends.cpu.store import ExpertStore, open_or_build, store_path, write_store
from moed.model.formats import Weight, quantize_fp8
from moed.model.moe import TorchExperts

E, H, I = 3, 200, 136


def fp8_experts(seed):
    g = torch.Generator().manual_seed(seed)

    def w(out, inp):
        return Weight(*quantize_fp8(torch.randn(out, inp, generator=g) * 0.1), (128, 128))
    return TorchExperts([w(I, H) for _ in range(E)], [w(I, H) for _ in range(E)],
                        [w(H, I) for _ in range(E)])


class FakeMoE:
    def __init__(self, experts):
        self.experts = experts


@pytest.fixture
def model_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MOED_CACHE_DIR", str(tmp_path / "cache"))
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text('{"architectures": ["Qwen3MoeForCausalLM"]}')
    (d / "model.safetensors").write_bytes(b"\0" * 16)
    return d


def layers(seed=0):
    return [(1, FakeMoE(fp8_experts(seed))), (3, FakeMoE(fp8_experts(seed + 1)))]


def test_round_trip_matches_reference(model_dir):
    moe = layers()
    store = open_or_build(model_dir, moe, progress=False)
    assert store.path == store_path(model_dir) and store.path.exists()
    x, ids, wts = torch.randn(4, H), torch.randint(0, E, (4, 2)), torch.rand(4, 2)
    for i, m in moe:
        layer = CPUExpertLayer(store.layer(i))
        fresh = CPUExpertLayer.from_weights(m.experts.gate, m.experts.up, m.experts.down)
        assert torch.equal(layer.forward(x, ids, wts), fresh.forward(x, ids, wts))
        ref = m.experts.forward(x, ids, wts)
        assert ((layer.forward(x, ids, wts) - ref).abs().mean() / ref.abs().mean()) < 1e-2
    again = open_or_build(model_dir, moe, progress=False)       # second load: mapped, not rebuilt
    assert again.path.stat().st_mtime_ns == store.path.stat().st_mtime_ns


def corrupt_byte(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x5A]))


def test_corrupt_truncated_and_stale_files_are_detected_and_rebuilt(model_dir):
    moe = layers()
    path = open_or_build(model_dir, moe, progress=False).path
    key = ExpertStore.open(path).header["source_key"]
    data_at = ExpertStore.open(path).layers[3]["offset"] + 4097

    corrupt_byte(path, data_at)
    with pytest.raises(CheckpointError, match="layer 3 fails its checksum") as e:
        ExpertStore.open(path, key)
    assert e.value.path == str(path)
    ExpertStore.open(open_or_build(model_dir, moe, progress=False).path, key)   # rebuilt, valid

    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 100)
    with pytest.raises(CheckpointError, match="truncated"):
        ExpertStore.open(path, key)
    ExpertStore.open(open_or_build(model_dir, moe, progress=False).path, key)

    corrupt_byte(path, 40)                                             # inside the header JSON
    with pytest.raises(CheckpointError, match="corrupt expert store header"):
        ExpertStore.open(path, key)
    with pytest.raises(CheckpointError, match="stale"):
        write_store(path, "another checkpoint", [(i, m.experts) for i, m in moe])
        ExpertStore.open(path, key)


def test_checkpoint_change_gives_a_new_store(model_dir):
    first = store_path(model_dir)
    (model_dir / "config.json").write_text('{"architectures": ["Qwen3MoeForCausalLM"], "x": 1}')
    assert store_path(model_dir) != first


READER = textwrap.dedent("""
    import sys
    from moed.backends.cpu.store import ExpertStore
    store = ExpertStore.open(sys.argv[1])          # verify reads every page
    print("ready", flush=True)
    sys.stdin.readline()
""")


def store_mapping(pid, path):
    """smaps fields of the mapping of `path` in process pid."""
    fields, inside = {}, False
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and len(head) >= 5:
                inside = line.rstrip().endswith(str(path))
            elif inside and head[0].endswith(":") and len(head) >= 2 and head[1].isdigit():
                fields[head[0][:-1]] = fields.get(head[0][:-1], 0) + int(head[1])
    return fields


def test_two_processes_share_the_mapped_pages(model_dir):
    path = open_or_build(model_dir, layers(), progress=False).path
    size_kb = path.stat().st_size // 1024
    procs = [subprocess.Popen([sys.executable, "-c", READER, str(path)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True) for _ in range(2)]
    try:
        for p in procs:
            assert p.stdout.readline().strip() == "ready"
        for p in procs:
            m = store_mapping(p.pid, path)
            print(p.pid, m.get("Rss"), m.get("Shared_Clean"), m.get("Private_Clean"),
                  m.get("Private_Dirty"), "kB of", size_kb)
            assert m["Rss"] >= size_kb * 0.9                     # every page resident
            assert m["Shared_Clean"] >= size_kb * 0.9            # ... and shared, not copied
            assert m["Private_Dirty"] == 0
    finally:
        for p in procs:
            p.stdin.write("\n")
            p.stdin.close()
            p.wait(timeout=30)
