"""Building a packed store file (the format: packed_file.py) from a plan of sections,
and `open_or_build`, the one way both stores reach theirs. Builders check the free
space first, write a temporary file and rename it, so readers never see half a store.
"""
import errno
import json
import logging
import os
import shutil
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moed.errors import CheckpointError, ConfigError
from moed.backends.cpu.packed_file import ALIGN, PREFIX, THREADS, VERSION, part_runs

log = logging.getLogger(__name__)


@dataclass
class Section:
    """One planned section: what the store records about it, its tensors, and the parts
    that fill them: part i(views) fills views {tensor name: rows [i * part_rows, ...)}."""
    name: str
    fields: dict            # the store's description (format, shapes), kept in the header
    tensors: dict           # tensor name -> (dtype, shape); shape[0] rows split among parts
    parts: list             # callables over {tensor name: writable array of the part's rows}
    part_rows: int = 1


def _align(n):
    return -(-n // ALIGN) * ALIGN


def plan(key, sections):
    """Header records of the sections laid out after the header -> (records, file size)."""
    room = ALIGN
    while True:
        records, off = [], room
        for s in sections:
            tensors, start = {}, off
            for name, (dtype, shape) in s.tensors.items():
                nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
                tensors[name] = [off, nbytes, dtype, list(shape)]
                off = _align(off + nbytes)
            assert all(-(-shape[0] // s.part_rows) == len(s.parts) for _, shape in s.tensors.values())
            records.append(dict(s.fields, name=s.name, offset=start, nbytes=off - start,
                                tensors=tensors, part_rows=s.part_rows, crc32=[0] * len(s.parts)))
        # the widest crc32s must fit; offsets gain digits as the room grows
        need = _align(PREFIX.size + len(_header_json(key, records, 0xFFFFFFFF)))
        if need <= room:
            return records, off
        room = need


def _header_json(key, records, crc=None):
    if crc is not None:
        records = [dict(r, crc32=[crc] * len(r["crc32"])) for r in records]
    return json.dumps({"version": VERSION, "source_key": key, "sections": records}).encode()


def check_free_space(directory, nbytes):
    """ConfigError unless the disk under `directory` holds nbytes more, plus a margin."""
    free = shutil.disk_usage(directory).free
    need = nbytes + (256 << 20) + nbytes // 100
    if free < need:
        raise ConfigError(f"{directory}: packing needs {need / 1e9:.1f} GB free there (the "
                          f"store is a second copy of the weights), {free / 1e9:.1f} GB are; "
                          "free space or point MOED_CACHE_DIR at a larger disk",
                          field="MOED_CACHE_DIR")


def write_store(path, magic, key, sections, progress=None):
    """Pack the sections into a new store file at `path` (atomic) -> path.
    progress: a label for a bar of bytes packed, or None."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    records, size = plan(key, sections)
    check_free_space(path.parent, size)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w+b") as f:
            _reserve(f.fileno(), size, path.parent)
            _pack_sections(f.fileno(), records, sections, progress)
            raw = _header_json(key, records)
            _write_at(f.fileno(), PREFIX.pack(magic, VERSION, len(raw), zlib.crc32(raw), 0, size)
                      + raw, 0)
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _reserve(fd, size, directory):
    """The file's blocks now, so a disk that fills meanwhile fails here, clearly."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise ConfigError(f"{directory}: no space left for a {size / 1e9:.1f} GB store; free "
                              "space or point MOED_CACHE_DIR at a larger disk",
                              field="MOED_CACHE_DIR") from e
        os.ftruncate(fd, size)          # a file system without fallocate (ZFS): sparse


def _pack_sections(fd, records, sections, progress):
    """Every part on a thread pool: packed into a buffer of its thread, checksummed, written."""
    bar = _progress(sum(r["nbytes"] for r in records), progress)
    pool = ThreadPoolExecutor(min(THREADS, os.cpu_count() or 1))
    try:
        jobs = [(r, i, part) for r, s in zip(records, sections) for i, part in enumerate(s.parts)]
        futures = [pool.submit(_pack_part, fd, r, i, part) for r, i, part in jobs]
        for (r, i, _), f in zip(jobs, futures):
            r["crc32"][i] = f.result()
            if bar is not None:
                bar.update(r["nbytes"] // len(r["crc32"]))
    finally:
        pool.shutdown(cancel_futures=True)
        if bar is not None:
            bar.close()


_scratch = threading.local()


def _pack_part(fd, record, i, part):
    runs = part_runs(record, i)
    need = sum(run.stop - run.start for _, run in runs)
    if getattr(_scratch, "buf", np.empty(0, np.uint8)).size < need:
        _scratch.buf = np.empty(need, np.uint8)        # reused: its pages fault once
    views, pos = {}, 0
    for name, run in runs:
        _, _, dtype, shape = record["tensors"][name]
        n = run.stop - run.start
        views[name] = _scratch.buf[pos:pos + n].view(dtype).reshape(-1, *shape[1:])
        pos += n
    part(views)
    crc = 0
    for (name, run) in runs:
        data = views[name].reshape(-1).view(np.uint8)
        crc = zlib.crc32(data, crc)
        _write_at(fd, data, run.start)
    return crc


def _write_at(fd, data, offset):
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _progress(total, label):
    if label is None:
        return None
    from moed.progress import progress
    return progress(total, label)


def open_or_build(cls, path, key, sections, verify=False, progress=None):
    """The `cls` store at `path` holding these sections: mapped if usable, else (re)built.
    verify: check the data checksums too. A store failing them is rebuilt like a stale one,
    with a warning, rather than refused: the checkpoint is the source of truth, and a
    daemon that stopped would only leave the operator to run the same rebuild."""
    path = Path(path)
    if path.exists():
        try:
            store = cls.open(path, key, verify)
            if _layout(store.header["sections"]) == _layout(plan(key, sections)[0]):
                return store
            log.warning("%s: %s differs from the model; rebuilding", path, cls.KIND)
        except CheckpointError as e:
            log.warning("%s; rebuilding", e)
        path.unlink()       # its space counts for the rebuild; mappings of it stay valid
    write_store(path, cls.MAGIC, key, sections, progress)
    return cls.open(path, key)


def _layout(records):
    return json.loads(json.dumps([dict(r, crc32=len(r["crc32"])) for r in records]))
