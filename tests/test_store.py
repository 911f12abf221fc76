"""The packed stores: round trip (experts and dense matrices), stale and truncated
files found at open without reading the data and rebuilt, flipped bytes found by
verify, the free-space check, and two processes sharing the mapped pages."""
import errno
import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from moed.errors import CheckpointError, ConfigError
from moed.backends.cpu import dense_store, packed_file, packed_writer
from moed.backends.cpu.experts import CPUExpertLayer
from moed.backends.cpu.packed_file import PREFIX
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


@pytest.fixture
def crc_bytes(monkeypatch):
    """Bytes checksummed by the store code: headers, and data only when packed or verified."""
    seen = [0]
    crc32 = packed_file.zlib.crc32

    def counted(data, value=0):
        seen[0] += len(data)
        return crc32(data, value)
    monkeypatch.setattr(packed_file.zlib, "crc32", counted)
    return seen


def data_bytes(store):
    return sum(t[1] for s in store.header["sections"] for t in s["tensors"].values())


def test_open_reads_the_header_only(model_dir, crc_bytes):
    path = open_or_build(model_dir, layers(), progress=False).path
    crc_bytes[0] = 0
    store = ExpertStore.open(path, packed_file.source_key(model_dir))
    assert crc_bytes[0] == PREFIX.unpack_from(store._mm, 0)[2] < path.stat().st_size / 100
    crc_bytes[0] = 0
    store.verify()
    assert crc_bytes[0] == data_bytes(store)


def test_flipped_byte_fails_verify_and_is_rebuilt_under_verify(model_dir):
    moe = layers()
    path = open_or_build(model_dir, moe, progress=False).path
    key = packed_file.source_key(model_dir)
    corrupt_byte(path, ExpertStore.open(path).layers[3]["offset"] + 4097)
    ExpertStore.open(path, key)                                   # not read: not seen
    with pytest.raises(CheckpointError, match="layer 3 fails its checksum") as e:
        ExpertStore.open(path, key, verify=True)
    assert e.value.path == str(path)
    mtime = path.stat().st_mtime_ns
    assert open_or_build(model_dir, moe, progress=False).path.stat().st_mtime_ns == mtime
    rebuilt = open_or_build(model_dir, moe, progress=False, verify=True)
    assert rebuilt.path == path and path.stat().st_mtime_ns != mtime
    ExpertStore.open(path, key, verify=True)


def test_truncated_and_stale_stores_are_rebuilt_without_a_full_read(model_dir, crc_bytes):
    moe = layers()
    path = open_or_build(model_dir, moe, progress=False).path
    key = packed_file.source_key(model_dir)
    data = data_bytes(ExpertStore.open(path))

    def rebuilt_with_one_pass(why):
        with pytest.raises(CheckpointError, match=why):
            ExpertStore.open(path, key)
        crc_bytes[0] = 0
        open_or_build(model_dir, moe, progress=False)
        assert 0 <= crc_bytes[0] - data < 65536      # the new file's data checksummed once, headers
        ExpertStore.open(path, key, verify=True)

    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 100)
    rebuilt_with_one_pass("truncated")
    corrupt_byte(path, 40)                                        # inside the header JSON
    rebuilt_with_one_pass("corrupt expert store header")
    write_store(path, "another checkpoint", [(i, m.experts) for i, m in moe])
    rebuilt_with_one_pass(r"stale expert store \(the checkpoint changed\)")
    with open(path, "r+b") as f:
        f.write(PREFIX.pack(b"MOEDXPK\0", 1, 0, 0, 0, 0)[:12])   # an older format version
    rebuilt_with_one_pass(r"stale expert store \(format 1, expected 2\)")
    open_or_build(model_dir, moe[:1], progress=False)                # other layers: rebuilt
    assert set(ExpertStore.open(path, key).layers) == {1}


def rewrite_header(path, edit):
    """Edit the header JSON in place, its checksum kept valid (what only a bug could write)."""
    raw = bytearray(path.read_bytes())
    magic, version, hlen, _, zero, size = PREFIX.unpack_from(raw, 0)
    header = json.loads(raw[PREFIX.size:PREFIX.size + hlen])
    edit(header)
    new = json.dumps(header).encode()
    assert len(new) <= hlen + 64
    raw[:PREFIX.size] = PREFIX.pack(magic, version, len(new), packed_file.zlib.crc32(new), zero, size)
    raw[PREFIX.size:PREFIX.size + len(new)] = new
    path.write_bytes(bytes(raw))


def test_sections_out_of_bounds_fail_at_open(model_dir):
    path = open_or_build(model_dir, layers(), progress=False).path
    size = path.stat().st_size

    def past_the_end(h):
        h["sections"][1]["nbytes"] = size

    def parts_missing(h):
        h["sections"][1]["crc32"].pop()

    def tensor_misplaced(h):
        h["sections"][0]["tensors"]["gate"][0] += 1
    for edit, why in ((past_the_end, "layer 3: bytes .* out of bounds"),
                      (tensor_misplaced, "layer 1.gate: bad place"),
                      (parts_missing, "layer 3.gate: bad place, shape or part count")):
        shutil.copy(path, path.with_suffix(".bak"))
        rewrite_header(path, edit)
        with pytest.raises(CheckpointError, match=why):
            ExpertStore.open(path)
        shutil.copy(path.with_suffix(".bak"), path)


def test_too_little_disk_space_is_refused_before_writing(model_dir, monkeypatch):
    need = {}

    def small_disk(where):
        need["dir"] = where
        return shutil._ntuple_diskusage(100 << 30, 100 << 30, 1 << 20)
    monkeypatch.setattr(packed_writer.shutil, "disk_usage", small_disk)
    with pytest.raises(ConfigError, match=r"packing needs .* GB free there .* MOED_CACHE_DIR") as e:
        open_or_build(model_dir, layers(), progress=False)
    assert e.value.field == "MOED_CACHE_DIR"
    assert need["dir"] == store_path(model_dir).parent
    assert list(store_path(model_dir).parent.iterdir()) == []         # no store, no temporary


def dense_sources(seed):
    g = torch.Generator().manual_seed(seed)
    fp8 = Weight(*quantize_fp8(torch.randn(300, 200, generator=g) * 0.1), (128, 128))
    bf16 = Weight(torch.randn(200, 136, generator=g).to(torch.bfloat16), None, None)
    return [("fp8", fp8), ("bf16", bf16)]


def test_dense_store_round_trip_verify_and_rebuild(model_dir, monkeypatch):
    monkeypatch.setattr(dense_store, "PACK_ROWS", 128)             # several parts a matrix
    sources = dense_sources(0)
    store = dense_store.open_or_build(model_dir, sources)
    assert store.path == dense_store.store_path(model_dir)
    for name, w in sources:
        fresh, mapped = dense_store.pack_weight(w, name), store.matrix(name)
        assert (mapped.fmt, mapped.rows, mapped.cols) == (fresh.fmt, fresh.rows, fresh.cols)
        assert np.array_equal(mapped.units, fresh.units) and not mapped.units.flags.writeable
        assert np.array_equal(mapped.scales, fresh.scales)
    corrupt_byte(store.path, store.entries["bf16"]["offset"] + 10)
    with pytest.raises(CheckpointError, match="bf16 fails its checksum"):
        dense_store.DenseStore.open(store.path, verify=True)
    again = dense_store.open_or_build(model_dir, sources, verify=True)
    again.verify()
    other = dense_store.open_or_build(model_dir, dense_sources(0)[:1])   # matrices differ
    assert list(other.entries) == ["fp8"]


def test_checkpoint_change_gives_a_new_store(model_dir):
    first = store_path(model_dir)
    (model_dir / "config.json").write_text('{"architectures": ["Qwen3MoeForCausalLM"], "x": 1}')
    assert store_path(model_dir) != first


READER = textwrap.dedent("""
    import sys
    from moed.backends.cpu.store import ExpertStore
    store = ExpertStore.open(sys.argv[1])
    store.verify()                                 # reads every page
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


def test_a_file_system_without_fallocate_still_packs(model_dir, monkeypatch):
    def unsupported(fd, offset, length):
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")
    monkeypatch.setattr(packed_writer.os, "posix_fallocate", unsupported)
    store = open_or_build(model_dir, layers(), progress=False)
    store.verify()

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(packed_writer.os, "posix_fallocate", full)
    store.path.unlink()
    with pytest.raises(ConfigError, match="no space left for a .* GB store"):
        open_or_build(model_dir, layers(), progress=False)
    assert list(store.path.parent.iterdir()) == []


def test_engine_verifies_its_stores_at_start_only_when_told(tmp_path, monkeypatch):
    """engine.verify_store: a flipped byte in either store is found at start and the store
    rebuilt (the logits are the clean ones); without it the start maps what is there."""
    from moed import LLM
    from moed.backends.cpu import dense_store, store
    from moed.testing.tiny import build_tiny_model
    monkeypatch.setenv("MOED_CACHE_DIR", str(tmp_path / "cache"))
    d = build_tiny_model(tmp_path / "m", "qwen3_moe", "fp8")
    prompt = [5, 9, 17, 33, 2]
    clean = LLM(d, device="cpu").logits(prompt)
    paths = (store.store_path(d), dense_store.store_path(d))
    offsets = (ExpertStore.open(paths[0]).layers[1]["offset"] + 4097,
               next(iter(dense_store.DenseStore.open(paths[1]).entries.values()))["offset"] + 11)
    for path, offset in zip(paths, offsets):
        corrupt_byte(path, offset)
    mtimes = [p.stat().st_mtime_ns for p in paths]
    LLM(d, device="cpu")
    assert [p.stat().st_mtime_ns for p in paths] == mtimes        # mapped as found
    np.testing.assert_array_equal(LLM(d, device="cpu", verify_store=True).logits(prompt), clean)
    assert all(p.stat().st_mtime_ns != m for p, m in zip(paths, mtimes))   # both rebuilt


def test_a_store_packed_from_another_format_is_not_reused(tmp_path, monkeypatch):
    """The same directory rewritten INT4 (config.json and shards change): the checkpoint's
    identity changes, so the FP8 stores are not mapped for it; the new ones carry the
    INT4 format tag, and the logits are the INT4 model's."""
    import shutil

    from moed import LLM
    from moed.backends.cpu import dense_store, store
    from moed.backends.cpu.packed_file import source_key
    from moed.testing.tiny import build_tiny_model
    monkeypatch.setenv("MOED_CACHE_DIR", str(tmp_path / "cache"))
    d = build_tiny_model(tmp_path / "m", "qwen3_moe", "fp8")
    prompt = [5, 9, 17, 33, 2]
    LLM(d, device="cpu").logits(prompt)
    key = source_key(d)
    shutil.rmtree(d)
    build_tiny_model(d, "qwen3_moe", "int4-ct")
    assert source_key(d) != key
    got = LLM(d, device="cpu").logits(prompt)
    assert ExpertStore.open(store.store_path(d), source_key(d)).layers[1]["fmt"] == "int4g32"
    entries = dense_store.DenseStore.open(dense_store.store_path(d), source_key(d)).entries
    assert {e["fmt"] for e in entries.values()} >= {"int4g32", "bf16"}      # q/k/v; lm_head
    ref = LLM(d, device="cpu", experts="torch").logits(prompt)
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()
