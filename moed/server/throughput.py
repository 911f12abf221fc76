"""Generated tokens per second over a sliding window (the last minute by default)."""
import collections
import threading
import time


class TokenRate:
    def __init__(self, window_s=60.0, clock=time.monotonic):
        self.window_s = window_s
        self.clock = clock
        self._events = collections.deque()      # (time, tokens), oldest first
        self._total = 0
        self._started = clock()
        self._lock = threading.Lock()           # the engine thread adds, handlers read

    def add(self, tokens):
        with self._lock:
            self._events.append((self.clock(), tokens))
            self._total += tokens
            self._expire()

    def per_second(self):
        with self._lock:
            self._expire()
            # A server up for 5 s has not idled for 55 s: divide by the time observed.
            span = min(self.window_s, max(self.clock() - self._started, 1e-9))
            return self._total / span

    def _expire(self):
        horizon = self.clock() - self.window_s
        while self._events and self._events[0][0] < horizon:
            self._total -= self._events.popleft()[1]
