"""ExpertStore: one cache file per model holding every MoE layer's experts in
the kernel's tile layout, mapped read-only and shared (MAP_SHARED), so two
processes serving the same model hold its experts once in host memory.

File layout (little endian):
    [0, 8)    magic b"MOEDXPK\\0"
    [8, 12)   format version
    [12, 16)  header JSON length
    [16, 20)  crc32 of the header JSON
    [20, 24)  zero
    [24, 32)  total file size
    [32, ..)  header JSON: source key, and per layer its shapes, format, tensor
              offsets and the crc32 of its data
    data      from a 4096-byte boundary; every tensor 4096-aligned

A file whose version or source key differs (stale), which is shorter than
it says (truncated) or whose checksums fail (corrupt) is rebuilt. Builders
write a temporary file and rename it, so readers never see half a store.
"""
import hashlib
import json
import logging
import mmap
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from moed.errors import CheckpointError
from moed.backends.cpu.packed import MATRICES, PackedExperts, layer_format, pack_expert_into

log = logging.getLogger(__name__)

MAGIC = b"MOEDXPK\0"
VERSION = 1
PREFIX = struct.Struct("<8sIIII Q")
ALIGN = 4096
CRC_BLOCK = 64 << 20


def cache_dir():
    env = os.environ.get("MOED_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "moed" / "experts"


def source_key(model_dir):
    """Identity of a checkpoint: its path, config.json bytes, shard names, sizes, mtimes."""
    d = Path(model_dir).resolve()
    h = hashlib.sha256(f"v{VERSION}\0{d}\0".encode())
    config = d / "config.json"
    h.update(config.read_bytes() if config.is_file() else b"")
    for p in sorted(d.glob("*.safetensors*")):
        st = p.stat()
        h.update(f"{p.name}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()


def store_path(model_dir):
    d = Path(model_dir).resolve()
    return cache_dir() / f"{d.name}-{source_key(d)[:16]}.moex"


def _align(n):
    return -(-n // ALIGN) * ALIGN


def _crc(mm, start, nbytes):
    c = 0
    view = memoryview(mm)
    for off in range(start, start + nbytes, CRC_BLOCK):
        c = zlib.crc32(view[off:min(off + CRC_BLOCK, start + nbytes)], c)
    view.release()
    return c


class MappedStore:
    """A store file mapped read-only and shared, its header checked; each section
    (`sections()`: (label, header entry with offset, nbytes, crc32)) checksummed."""
    MAGIC, VERSION, KIND = MAGIC, VERSION, "expert store"

    def __init__(self, path, mm, header):
        self.path, self._mm, self.header = Path(path), mm, header

    @classmethod
    def open(cls, path, key=None, verify=True):
        """Map an existing store; CheckpointError says why it is unusable."""
        path = Path(path)
        store = cls(path, *map_store(path, key, cls.MAGIC, cls.VERSION, cls.KIND))
        if verify:
            store.verify()
        return store

    def verify(self):
        for label, e in self.sections():
            if _crc(self._mm, e["offset"], e["nbytes"]) != e["crc32"]:
                raise CheckpointError(f"{self.path}: {label} fails its checksum "
                                      f"(corrupt {self.KIND})", path=str(self.path))

    def sections(self):
        raise NotImplementedError


class ExpertStore(MappedStore):
    """A mapped store: `layer(i)` -> PackedExperts whose buffers view the file."""

    def __init__(self, path, mm, header):
        super().__init__(path, mm, header)
        self.layers = {int(L["index"]): L for L in header["layers"]}

    def sections(self):
        return [(f"layer {L['index']}", L) for L in self.header["layers"]]

    def layer(self, index):
        L = self.layers[index]
        buffers = {}
        for name, (off, nbytes, dtype, shape) in L["tensors"].items():
            buffers[name] = np.frombuffer(self._mm, dtype=dtype, count=nbytes // np.dtype(dtype).itemsize,
                                          offset=off).reshape(shape)
        return PackedExperts(L["fmt"], L["E"], L["H"], L["I"], buffers)


def map_store(path, key, magic=MAGIC, version=VERSION, kind="expert store"):
    """Map a store file read-only and shared -> (mmap, checked header)."""
    try:
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot map {kind} ({e})", path=str(path)) from e
    return mm, read_header(path, mm, key, magic, version, kind)


def read_header(path, mm, key, magic=MAGIC, version=VERSION, kind="expert store"):
    """The checked JSON header of a store file (shared by the expert and dense stores)."""
    def bad(why):
        return CheckpointError(f"{path}: {why}", path=str(path))
    if len(mm) < PREFIX.size:
        raise bad(f"truncated {kind} (no header)")
    got_magic, got_version, hlen, hcrc, _, size = PREFIX.unpack_from(mm, 0)
    if got_magic != magic:
        raise bad(f"not {'an' if kind[0] in 'aeiou' else 'a'} {kind} (bad magic)")
    if got_version != version:
        raise bad(f"stale {kind} (format {got_version}, expected {version})")
    if len(mm) != size or PREFIX.size + hlen > len(mm):
        raise bad(f"truncated {kind} ({len(mm)} bytes, header says {size})")
    raw = bytes(mm[PREFIX.size:PREFIX.size + hlen])
    if zlib.crc32(raw) != hcrc:
        raise bad(f"corrupt {kind} header")
    header = json.loads(raw)
    if key is not None and header.get("source_key") != key:
        raise bad(f"stale {kind} (the checkpoint changed)")
    return header


# -- building
def _layer_plan(index, fmt, E, H, I, offset):
    """Offsets of one layer's tensors from `offset`; returns (layer dict, end)."""
    probe = PackedExperts(fmt, E, H, I, {})
    tensors, off = {}, offset
    for m in MATRICES:
        s = probe.shape(m)
        for name, dtype, width in ((m, "uint8", s.nbytes), (m + "_scale", "float32", s.nscales)):
            nbytes = E * width * np.dtype(dtype).itemsize
            tensors[name] = [off, nbytes, dtype, [E, width]]
            off = _align(off + nbytes)
    return {"index": index, "fmt": fmt, "E": E, "H": H, "I": I, "tensors": tensors,
            "offset": offset, "nbytes": off - offset, "crc32": 0}, off


def write_store(path, key, moe_layers, progress=False):
    """Pack [(layer index, TorchExperts)] into a new store file at `path` (atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    plans, sources = [], []
    for index, experts in moe_layers:
        I, H = experts.gate[0].shape
        fmt = layer_format([(w, f"layers.{index}.experts.{e}") for ws in
                            (experts.gate, experts.up, experts.down) for e, w in enumerate(ws)],
                           f"layer {index}")
        plans.append((index, fmt, experts.num_experts, H, I))
        sources.append(experts)
    # room for the header: sized with the widest crc, plus slack for the digits the
    # offsets gain once they are shifted past the header itself
    layers, off = [], 0
    for p in plans:
        L, off = _layer_plan(*p, off)
        layers.append(L)
    hdr_room = _align(PREFIX.size + len(_header_json(key, layers, 0xFFFFFFFF)) + 64
                      + 24 * 6 * len(layers))
    for L in layers:
        L["offset"] += hdr_room
        for t in L["tensors"].values():
            t[0] += hdr_room
    size = hdr_room + off
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w+b") as f:
            f.truncate(size)
            mm = mmap.mmap(f.fileno(), size, flags=mmap.MAP_SHARED)
            bar = _progress(sum(L["E"] for L in layers), progress, path.name)
            for L, experts in zip(layers, sources):
                _pack_layer_into(mm, L, experts, bar)
                L["crc32"] = _crc(mm, L["offset"], L["nbytes"])
            if bar is not None:
                bar.close()
            raw = _header_json(key, layers)
            mm[:PREFIX.size] = PREFIX.pack(MAGIC, VERSION, len(raw), zlib.crc32(raw), 0, size)
            mm[PREFIX.size:PREFIX.size + len(raw)] = raw
            mm.flush()
            mm.close()
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _header_json(key, layers, crc=None):
    if crc is not None:
        layers = [dict(L, crc32=crc) for L in layers]
    return json.dumps({"version": VERSION, "source_key": key, "layers": layers}).encode()


def _pack_layer_into(mm, L, experts, bar):
    buffers = {name: np.frombuffer(mm, dtype=dtype, count=nbytes // np.dtype(dtype).itemsize,
                                   offset=off).reshape(shape)
               for name, (off, nbytes, dtype, shape) in L["tensors"].items()}
    prefix = f"model.layers.{L['index']}.mlp.experts"
    for e in range(L["E"]):
        pack_expert_into(buffers, e, experts.gate[e], experts.up[e], experts.down[e],
                         tuple(f"{prefix}.{e}.{m}_proj.weight" for m in MATRICES))
        if bar is not None:
            bar.update(1)
    del buffers


def _progress(total, enabled, name):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc=f"packing experts -> {name}", unit="expert")


def open_or_build(model_dir, moe_layers, progress=True):
    """The store for this checkpoint: mapped if valid, (re)built otherwise."""
    path, key = store_path(model_dir), source_key(model_dir)
    if path.exists():
        try:
            store = ExpertStore.open(path, key)
            if set(store.layers) == {i for i, _ in moe_layers}:
                return store
            log.warning("%s: layers differ from the model; rebuilding", path)
        except CheckpointError as e:
            log.warning("%s; rebuilding", e)
    write_store(path, key, [(i, m.experts) for i, m in moe_layers], progress)
    return ExpertStore.open(path, key, verify=False)


def pack_model(model_dir, progress=True):
    """Build (or validate) the expert store of a checkpoint ahead of time -> its path."""
    import torch

    from moed.model.checkpoint import Checkpoint
    from moed.model.registry import load_model
    model = load_model(Checkpoint(model_dir), torch.device("cpu"))
    layers = _torch_layers(model)
    return open_or_build(model_dir, layers, progress).path


def _torch_layers(model):
    from moed.model.moe import TorchExperts
    layers = model.moe_layers()
    for i, moe in layers:
        if not isinstance(moe.experts, TorchExperts):
            raise CheckpointError(f"layer {i}: experts are {type(moe.experts).__name__}, "
                                  "expected the checkpoint's TorchExperts")
    return layers
