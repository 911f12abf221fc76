"""Progress of long work (packing experts, a benchmark): a bar on a terminal, and in a
log (stderr not a terminal) one line at the start, about every 10% and at the end,
with the rate and the time left, instead of a bar's thousand redraws."""
import logging
import sys
import time

log = logging.getLogger("moed.progress")
STEP = 0.10                 # a log line every tenth of the work


def progress(total, label, unit="B", stream=None, **tqdm_kwargs):
    """An object with update(n) and close(): tqdm on a terminal, LogProgress elsewhere."""
    stream = stream or sys.stderr
    if _is_terminal(stream):
        from tqdm import tqdm
        return tqdm(total=total, desc=label, unit=unit, unit_scale=unit == "B", file=stream,
                    **tqdm_kwargs)
    return LogProgress(total, label, unit)


def _is_terminal(stream):
    try:
        return stream.isatty()
    except (AttributeError, ValueError):        # closed, or not a file
        return False


class LogProgress:
    def __init__(self, total, label, unit="B", clock=time.monotonic, emit=None):
        self.total, self.label, self.unit = total, label, unit
        self.clock, self.emit = clock, emit or log.info
        self.done = 0
        self.t0 = clock()
        self.next_mark = STEP
        self.closed = False
        self.emit("%s: started (%s)", label, self._amount(total) if total else "size unknown")

    def update(self, n=1):
        self.done += n
        if self.total and self.done < self.total and self.done >= self.next_mark * self.total:
            while self.next_mark * self.total <= self.done:
                self.next_mark += STEP
            elapsed = self.clock() - self.t0
            rate = self.done / elapsed if elapsed > 0 else 0.0
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            self.emit("%s: %d%% (%s of %s, %s/s, %.0f s left)", self.label,
                      100 * self.done // self.total, self._amount(self.done),
                      self._amount(self.total), self._amount(rate), eta)

    def close(self):
        if self.closed:
            return
        self.closed = True
        elapsed = self.clock() - self.t0
        rate = self.done / elapsed if elapsed > 0 else 0.0
        self.emit("%s: done, %s in %.1f s (%s/s)", self.label, self._amount(self.done),
                  elapsed, self._amount(rate))

    def _amount(self, n):
        if self.unit != "B":
            return f"{n:,.0f} {self.unit}"
        for size, name in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
            if n >= size:
                return f"{n / size:.1f} {name}"
        return f"{n:.0f} B"
