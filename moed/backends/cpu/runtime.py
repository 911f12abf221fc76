"""What every compiled call shares: the thread count and the per-thread workspace."""
import os
import threading

import numpy as np

_workspace = threading.local()     # per Python thread: grow-only kernel workspace


def default_threads():
    """MOED_THREADS, or every CPU this process may run on."""
    env = os.environ.get("MOED_THREADS", "").strip()
    return int(env) if env else len(os.sched_getaffinity(0))


def workspace(nbytes):
    """This Python thread's scratch buffer of at least `nbytes` (numpy uint8; grown,
    never shrunk: a kernel allocates nothing, and a step reuses the last one)."""
    buf = getattr(_workspace, "buf", None)
    if buf is None or buf.nbytes < nbytes:
        buf = np.empty(max(nbytes, 1 << 20), dtype=np.uint8)
        _workspace.buf = buf
    return buf
