"""DenseStore: every dense linear of a model in the kernel's tile layout, in
one cache file beside the expert store (`<model>-<key>.moed-dense`), mapped
read-only and shared like it.

File layout: the expert store's (see store.py): the same 32-byte prefix with
magic b"MOEDDNS\\0", the header JSON (source key, and per matrix its name,
format, shape, tensor offsets and the crc32 of its data), data from a
4096-byte boundary, every tensor 4096-aligned. Stale, truncated or corrupt
files are rebuilt; builders write a temporary file and rename it.
"""
import json
import logging
import mmap
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from moed.errors import CheckpointError
from moed.backends.cpu.layout import UNIT_ROWS, MatrixShape, pack_matrix
from moed.backends.cpu.store import PREFIX, MappedStore, _align, _crc, cache_dir, source_key

log = logging.getLogger(__name__)

MAGIC = b"MOEDDNS\0"
VERSION = 1
PACK_ROWS = 16384          # rows packed at a time: bounds the packing temporaries (LM head)


@dataclass
class PackedMatrix:
    """One dense matrix [rows, cols] in the tile layout."""
    fmt: str                # "fp8" | "bf16"
    rows: int
    cols: int
    units: np.ndarray       # uint8 [tiles * kblocks * unit bytes]
    scales: np.ndarray      # float32 [tiles * kblocks]

    @property
    def shape(self):
        return MatrixShape(self.rows, self.cols, self.fmt)

    @property
    def nbytes(self):
        return self.units.nbytes + self.scales.nbytes

    def kernel_args(self):
        """(weights ptr, scales ptr, rows, cols, row tiles, k blocks, fp8) for `dense`."""
        s = self.shape
        return (self.units.ctypes.data, self.scales.ctypes.data, self.rows, self.cols,
                s.tiles, s.kblocks, self.fmt == "fp8")

    def row_slice(self, start, stop):
        """Rows [start, stop) as a view (start a multiple of 64): one fused matrix's parts."""
        s = self.shape
        assert start % UNIT_ROWS == 0 and stop <= self.rows
        t0, per = start // UNIT_ROWS, s.kblocks
        t1 = -(-stop // UNIT_ROWS)
        ub = s.unit_bytes
        return PackedMatrix(self.fmt, stop - start, self.cols,
                            self.units[t0 * per * ub:t1 * per * ub], self.scales[t0 * per:t1 * per])


def pack_weight(weight, name):
    """A formats.Weight -> PackedMatrix in fresh memory."""
    units, scales = pack_matrix(weight.data, weight.scale_inv, weight.block, name)
    fmt = "fp8" if weight.is_fp8 else "bf16"
    return PackedMatrix(fmt, weight.shape[0], weight.shape[1], units, scales)


def store_path(model_dir):
    d = Path(model_dir).resolve()
    return cache_dir() / f"{d.name}-{source_key(d)[:16]}.moed-dense"


class DenseStore(MappedStore):
    """A mapped store: `matrix(name)` -> PackedMatrix whose arrays view the file."""
    MAGIC, VERSION, KIND = MAGIC, VERSION, "dense store"

    def __init__(self, path, mm, header):
        super().__init__(path, mm, header)
        self.entries = {e["name"]: e for e in header["entries"]}

    def sections(self):
        return [(e["name"], e) for e in self.header["entries"]]

    def matrix(self, name):
        e = self.entries[name]
        (uo, un), (so, sn) = e["units"], e["scales"]
        return PackedMatrix(e["fmt"], e["rows"], e["cols"],
                            np.frombuffer(self._mm, np.uint8, un, uo),
                            np.frombuffer(self._mm, np.float32, sn // 4, so))


# -- building
def _plan(sources):
    """[(name, Weight)] -> entries with offsets from 0; returns (entries, end)."""
    entries, off = [], 0
    for name, w in sources:
        s = MatrixShape(w.shape[0], w.shape[1], "fp8" if w.is_fp8 else "bf16")
        e = {"name": name, "fmt": s.fmt, "rows": s.rows, "cols": s.cols, "offset": off,
             "units": [off, s.nbytes]}
        off = _align(off + s.nbytes)
        e["scales"] = [off, 4 * s.nscales]
        off = _align(off + 4 * s.nscales)
        e["nbytes"], e["crc32"] = off - e["offset"], 0
        entries.append(e)
    return entries, off


def _shift(entries, by):
    for e in entries:
        e["offset"] += by
        e["units"][0] += by
        e["scales"][0] += by


def _header_json(key, entries, crc=None):
    if crc is not None:
        entries = [dict(e, crc32=crc) for e in entries]
    return json.dumps({"version": VERSION, "source_key": key, "entries": entries}).encode()


def _pack_into(mm, e, w):
    """Pack Weight w into its entry's place, PACK_ROWS rows at a time."""
    s = MatrixShape(e["rows"], e["cols"], e["fmt"])
    per_row_tile = s.kblocks * s.unit_bytes
    units = np.frombuffer(mm, np.uint8, e["units"][1], e["units"][0])
    scales = np.frombuffer(mm, np.float32, e["scales"][1] // 4, e["scales"][0])
    for r0 in range(0, s.rows, PACK_ROWS):
        r1 = min(r0 + PACK_ROWS, s.rows)
        scale = None if w.scale_inv is None else w.scale_inv[r0 // 128:-(-r1 // 128)]
        u, sc = pack_matrix(w.data[r0:r1], scale, w.block, e["name"])
        t0 = r0 // UNIT_ROWS
        units[t0 * per_row_tile:t0 * per_row_tile + u.size] = u
        scales[t0 * s.kblocks:t0 * s.kblocks + sc.size] = sc
    del units, scales


def write_store(path, key, sources):
    """Pack [(name, Weight)] into a new store file at `path` (atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    entries, end = _plan(sources)
    room = _align(PREFIX.size + len(_header_json(key, entries, 0xFFFFFFFF)) + 64
                  + 24 * 3 * len(entries))
    _shift(entries, room)
    size = room + end
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w+b") as f:
            f.truncate(size)
            mm = mmap.mmap(f.fileno(), size, flags=mmap.MAP_SHARED)
            for e, (_, w) in zip(entries, sources):
                _pack_into(mm, e, w)
                e["crc32"] = _crc(mm, e["offset"], e["nbytes"])
            raw = _header_json(key, entries)
            mm[:PREFIX.size] = PREFIX.pack(MAGIC, VERSION, len(raw), zlib.crc32(raw), 0, size)
            mm[PREFIX.size:PREFIX.size + len(raw)] = raw
            mm.flush()
            mm.close()
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def open_or_build(model_dir, sources):
    """The dense store of this checkpoint for [(name, Weight)]: mapped if valid, else (re)built."""
    path, key = store_path(model_dir), source_key(model_dir)
    want = {n: (w.shape, w.is_fp8) for n, w in sources}
    if path.exists():
        try:
            store = DenseStore.open(path, key)
            have = {e["name"]: ((e["rows"], e["cols"]), e["fmt"] == "fp8")
                    for e in store.header["entries"]}
            if have == want:
                return store
            log.warning("%s: matrices differ from the model; rebuilding", path)
        except CheckpointError as e:
            log.warning("%s; rebuilding", e)
    write_store(path, key, sources)
    return DenseStore.open(path, key, verify=False)


def concat_rows(weights, name):
    """Weights with the same columns stacked by rows (fused q/k/v, gate/up), FP8 scales too.
    Each part but the last is padded with zero rows to a multiple of 128, so every
    part starts on a scale block and a row tile: part i's rows start at `starts[i]`."""
    parts = []
    for w in weights[:-1]:
        pad = -w.shape[0] % 128
        parts.append(torch.cat([w.data, w.data.new_zeros(pad, w.shape[1])]) if pad else w.data)
    parts.append(weights[-1].data)
    first = weights[0]
    scale = torch.cat([w.scale_inv for w in weights]) if first.is_fp8 else None
    return type(first)(torch.cat(parts), scale, first.block)


def part_starts(weights):
    """First row of each part inside concat_rows(weights)."""
    starts, r = [], 0
    for w in weights:
        starts.append(r)
        r += w.shape[0] + (-w.shape[0] % 128)
    return starts
