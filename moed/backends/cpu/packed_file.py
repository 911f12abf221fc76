"""A packed store file: named sections of 4096-aligned tensors behind a checked
header, mapped read-only and shared (MAP_SHARED), so processes serving the same
model hold it once in host memory. The expert store (store.py) and the dense
store (dense_store.py) are two plans over this one file format.

File layout (little endian):
    [0, 8)    magic: b"MOEDXPK\\0" experts, b"MOEDDNS\\0" dense linears
    [8, 12)   format version
    [12, 16)  header JSON length
    [16, 20)  crc32 of the header JSON
    [20, 24)  zero
    [24, 32)  total file size
    [32, ..)  header JSON {"version", "source_key", "sections": [...]}; a section is
              the store's own fields plus "name", "offset", "nbytes", "tensors"
              {name: [offset, nbytes, dtype, shape]}, "part_rows" and "crc32"
    data      from a 4096-byte boundary; every tensor 4096-aligned

A section is packed in parts (an expert, a block of rows): part i fills rows
[i * part_rows, (i + 1) * part_rows) of each of its tensors, and crc32[i] is the
checksum of those rows, tensor after tensor. So parts pack, checksum and write on
separate threads, each from its own buffer with pwrite (no page faults on the
file, no second pass over it), and verify() checks them in parallel the same way.

Opening checks what costs no reading: size, magic, version, header checksum,
source key and every section's and tensor's bounds; a stale or truncated store
fails there and is rebuilt. The data checksums are computed while packing and
checked by `verify()` (`moectl pack --verify`, or opening with verify=True:
engine.verify_store): reading every byte of DeepSeek-V3's 650 GB store takes
minutes even at disk speed, too long for every start. Building: packed_writer.py.
"""
import hashlib
import json
import mmap
import os
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from moed.errors import CheckpointError

VERSION = 2
PREFIX = struct.Struct("<8sIIII Q")
ALIGN = 4096
DTYPES = ("uint8", "float32")
THREADS = 8                 # packing's copies and zlib release the GIL; beyond ~8 the disk is the limit


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


def cache_path(model_dir, suffix):
    """Where a checkpoint's store of this kind lives: named by the checkpoint and its key."""
    d = Path(model_dir).resolve()
    return cache_dir() / f"{d.name}-{source_key(d)[:16]}{suffix}"


class MappedStore:
    """A store file mapped read-only and shared, its header and bounds checked."""
    MAGIC, KIND = None, "store"

    def __init__(self, path, mm, header):
        self.path, self._mm, self.header = Path(path), mm, header
        self.sections = {s["name"]: s for s in header["sections"]}

    @classmethod
    def open(cls, path, key=None, verify=False):
        """Map an existing store; CheckpointError says why it is unusable."""
        store = cls(path, *map_store(path, key, cls.MAGIC, cls.KIND))
        if verify:
            store.verify()
        return store

    def verify(self, threads=THREADS):
        """Check every part's crc32 (reads the whole file)."""
        def crc(job):
            c = 0
            with memoryview(self._mm) as view:
                for _, run in part_runs(*job):
                    c = zlib.crc32(view[run], c)
            return c
        jobs = [(s, i) for s in self.header["sections"] for i in range(len(s["crc32"]))]
        with ThreadPoolExecutor(threads) as pool:
            for (s, i), c in zip(jobs, pool.map(crc, jobs)):
                if c != s["crc32"][i]:
                    raise CheckpointError(f"{self.path}: {s['name']} fails its checksum (part "
                                          f"{i}; corrupt {self.KIND})", path=str(self.path))

    def tensors(self, name):
        """{tensor name: read-only array viewing the file} of one section."""
        return {t: np.frombuffer(self._mm, dtype, nbytes // np.dtype(dtype).itemsize, off)
                .reshape(shape) for t, (off, nbytes, dtype, shape) in
                self.sections[name]["tensors"].items()}


def part_runs(section, i):
    """[(tensor name, file slice)] of part i's rows, tensor after tensor."""
    runs, k = [], section["part_rows"]
    for name, (off, nbytes, _, shape) in section["tensors"].items():
        row = nbytes // shape[0]
        r0, r1 = i * k, min((i + 1) * k, shape[0])
        runs.append((name, slice(off + r0 * row, off + r1 * row)))
    return runs


# -- opening: the cheap checks
def map_store(path, key, magic, kind):
    """Map a store file read-only and shared -> (mmap, checked header)."""
    try:
        with open(path, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot map {kind} ({e})", path=str(path)) from e
    header = read_header(path, mm, key, magic, kind)
    check_bounds(path, header, len(mm), kind)
    return mm, header


def read_header(path, mm, key, magic, kind):
    """The JSON header of a store file, its prefix, checksum and key checked."""
    def bad(why):
        return CheckpointError(f"{path}: {why}", path=str(path))
    if len(mm) < PREFIX.size:
        raise bad(f"truncated {kind} (no header)")
    got_magic, got_version, hlen, hcrc, _, size = PREFIX.unpack_from(mm, 0)
    if got_magic != magic:
        raise bad(f"not {'an' if kind[0] in 'aeiou' else 'a'} {kind} (bad magic)")
    if got_version != VERSION:
        raise bad(f"stale {kind} (format {got_version}, expected {VERSION})")
    if len(mm) != size or PREFIX.size + hlen > len(mm):
        raise bad(f"truncated {kind} ({len(mm)} bytes, header says {size})")
    raw = bytes(mm[PREFIX.size:PREFIX.size + hlen])
    if zlib.crc32(raw) != hcrc:
        raise bad(f"corrupt {kind} header")
    header = json.loads(raw)
    if key is not None and header.get("source_key") != key:
        raise bad(f"stale {kind} (the checkpoint changed)")
    return header


def check_bounds(path, header, size, kind):
    """Every section inside the file after the header, in order; every tensor inside
    its section, aligned, its byte count its shape's, its rows those of the parts."""
    end = PREFIX.size
    for s in sorted(header["sections"], key=lambda s: s["offset"]):
        where = f"{path}: {s['name']}"
        if s["offset"] < end or s["offset"] % ALIGN or s["offset"] + s["nbytes"] > size:
            raise CheckpointError(f"{where}: bytes [{s['offset']}, +{s['nbytes']}) out of "
                                  f"bounds (corrupt {kind})", path=str(path))
        end = s["offset"] + s["nbytes"]
        for name, (off, nbytes, dtype, shape) in s["tensors"].items():
            if (off % ALIGN or off < s["offset"] or off + nbytes > end or dtype not in DTYPES
                    or nbytes != int(np.prod(shape)) * np.dtype(dtype).itemsize
                    or len(s["crc32"]) != -(-shape[0] // s["part_rows"])):
                raise CheckpointError(f"{where}.{name}: bad place, shape or part count (corrupt {kind})",
                                      path=str(path))
