"""DenseStore: every dense linear of a model in the kernel's tile layout, in
one cache file beside the expert store (`<model>-<key>.moed-dense`): a packed
store file (packed_file.py, built by packed_writer.py) with one section per
matrix, mapped read-only and shared like it.
"""
from dataclasses import dataclass
from functools import partial

import numpy as np

from moed.backends.cpu import packed_writer
from moed.backends.cpu.layout import UNIT_ROWS, MatrixShape, format_code, pack_weight_into, packed_format
from moed.backends.cpu.layout import pack_weight as layout_pack_weight
from moed.model import formats
from moed.backends.cpu.packed_file import MappedStore, cache_path, source_key
from moed.backends.cpu.packed_writer import Section

PACK_ROWS = 16384          # rows packed by one part: bounds the padding temporaries (LM head)


@dataclass
class PackedMatrix:
    """One dense matrix [rows, cols] in the tile layout."""
    fmt: str                # "fp8" | "bf16" | "int4g<G>[a]" (layout.py)
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
                s.tiles, s.kblocks, format_code(self.fmt))

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
    units, scales = layout_pack_weight(weight, name)
    return PackedMatrix(packed_format(weight, name), weight.shape[0], weight.shape[1], units,
                        scales)


def store_path(model_dir):
    return cache_path(model_dir, ".moed-dense")


class DenseStore(MappedStore):
    """A mapped store: `matrix(name)` -> PackedMatrix whose arrays view the file."""
    MAGIC, KIND = b"MOEDDNS\0", "dense store"

    def __init__(self, path, mm, header):
        super().__init__(path, mm, header)
        self.entries = self.sections

    def matrix(self, name):
        e, t = self.entries[name], self.tensors(name)
        return PackedMatrix(e["fmt"], e["rows"], e["cols"], t["units"].reshape(-1),
                            t["scales"].reshape(-1))


def dense_sections(sources):
    """[(name, Weight)] -> one Section a matrix, by row tiles; one part per PACK_ROWS rows."""
    sections, tiles = [], PACK_ROWS // UNIT_ROWS
    for name, w in sources:
        s = MatrixShape(w.shape[0], w.shape[1], packed_format(w, name))
        parts = [partial(_pack_rows, w, s, r0, name) for r0 in range(0, s.rows, PACK_ROWS)]
        sections.append(Section(name, {"fmt": s.fmt, "rows": s.rows, "cols": s.cols},
                                {"units": ("uint8", [s.tiles, s.kblocks * s.unit_bytes]),
                                 "scales": ("float32", [s.tiles, s.kblocks])}, parts, tiles))
    return sections


def _pack_rows(w, s, r0, name, tiles):
    """Rows [r0, r0 + PACK_ROWS) of Weight w into `tiles`, their row tiles."""
    r1 = min(r0 + PACK_ROWS, s.rows)
    pack_weight_into(tiles["units"].reshape(-1), tiles["scales"].reshape(-1), w.row_slice(r0, r1),
                     name)


def open_or_build(model_dir, sources, verify=False):
    """The dense store of this checkpoint for [(name, Weight)]: mapped if valid, else (re)built.
    verify: check every byte's checksum first (reads the whole file)."""
    return packed_writer.open_or_build(DenseStore, store_path(model_dir), source_key(model_dir),
                                     dense_sections(sources), verify)


def concat_rows(weights, name):
    """Weights with the same columns stacked by rows (fused q/k/v, gate/up), their scales
    too. Each part but the last is padded with zero rows to a multiple of 128, so every
    part starts on a scale block and a row tile: part i's rows start at `starts[i]`."""
    return formats.concat_rows(weights, 128)


def part_starts(weights):
    """First row of each part inside concat_rows(weights)."""
    starts, r = [], 0
    for w in weights:
        starts.append(r)
        r += w.shape[0] + (-w.shape[0] % 128)
    return starts
