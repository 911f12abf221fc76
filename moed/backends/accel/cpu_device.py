"""The device interface on host threads: one thread per stream, memcpy for copies.

Its only purpose is that the accelerator pipelines run, and are tested, where there
is no GPU. It keeps CUDA's semantics (moed.backends.accel.device): work on a stream
runs in order; `wait` captures the event's latest record issued so far; waiting on an
event never recorded is a no-op. A copy can be slowed to a bandwidth cap (bytes per
second) so that copies take the time PCIe transfers would and overlap with compute.

Everything the streams do goes into an event log (`CPUDevice.log`, a list of Entry in
completion order): copies and launches as start/end pairs, records when they
complete, waits when they start and end, each with the issuing pipeline's tag. The
pipeline tests assert the protocol from it.
"""
import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from moed.backends.accel.device import Device, Event, Stream

POLL_S = 0.05         # how often a blocked wait looks for a failure elsewhere


@dataclass(frozen=True)
class Entry:
    """One thing a stream did: kind is copy_start | copy_end | launch_start |
    launch_end | record | wait_start | wait_end."""
    seq: int          # position in the log: a total order over all streams
    time: float       # time.perf_counter() when it happened
    stream: str
    kind: str
    event: str = None   # record / wait: the event's name
    tag: dict = field(default_factory=dict)
    nbytes: int = 0     # copies


class CPUEvent(Event):
    def __init__(self, device, name):
        self.device, self.name = device, name
        self.issued = 0       # records issued by the host
        self.completed = 0    # records completed by their stream

    def synchronize(self):
        target = self.issued
        self.device.block_until(lambda: self.completed >= target)


class CPUStream(Stream):
    """A worker thread running its queue of tasks in order."""

    def __init__(self, device, name):
        self.device, self.name = device, name
        self.tasks = queue.Queue()
        self.thread = threading.Thread(target=self.run, name=f"moed-stream-{name}", daemon=True)
        self.thread.start()

    def run(self):
        while (task := self.tasks.get()) is not None:
            if self.device.error is None:
                try:
                    # as the caller's (forward's) inference mode: its tensors may be
                    # inference tensors, which only that mode updates in place
                    with torch.inference_mode():
                        task()
                except BaseException as e:      # surfaces on the host's next sync
                    self.device.fail(e)

    def close(self):
        self.tasks.put(None)
        self.thread.join()

    def copy(self, dst, src, tag=None):
        self.tasks.put(lambda: self.device.memcpy(self.name, dst, src, tag or {}))

    def launch(self, fn, tag=None):
        def task():
            self.device.note(self.name, "launch_start", tag=tag)
            fn()
            self.device.note(self.name, "launch_end", tag=tag)
        self.tasks.put(task)

    def record(self, event, tag=None):
        event.issued += 1
        generation = event.issued

        def task():
            with self.device.changed:
                event.completed = generation
                self.device.note(self.name, "record", event=event.name, tag=tag)
                self.device.changed.notify_all()
        self.tasks.put(task)

    def wait(self, event):
        target = event.issued          # the latest record issued before this wait

        def task():
            self.device.note(self.name, "wait_start", event=event.name)
            self.device.block_until(lambda: event.completed >= target)
            self.device.note(self.name, "wait_end", event=event.name)
        self.tasks.put(task)

    def synchronize(self):
        done = []

        def task():
            with self.device.changed:
                done.append(True)
                self.device.changed.notify_all()
        self.tasks.put(task)
        self.device.block_until(lambda: bool(done))


class CPUDevice(Device):
    """Streams on threads over host memory; bandwidth: bytes/s per copy, None = memcpy
    speed."""

    kind = "cpu"
    torch_device = torch.device("cpu")

    def __init__(self, bandwidth=None, keep_log=True):
        self.bandwidth = bandwidth
        self.keep_log = keep_log            # False: no log (a long-running engine)
        self.log = []                       # [Entry], completion order
        self.changed = threading.Condition()  # event completions and the log
        self.error = None                   # the first failure of any stream
        self.streams = []
        self._seq = 0

    def stream(self, name):
        s = CPUStream(self, name)
        self.streams.append(s)
        return s

    def event(self, name):
        return CPUEvent(self, name)

    def host_empty(self, shape, dtype):
        return torch.empty(shape, dtype=dtype)

    def empty(self, shape, dtype):
        return torch.empty(shape, dtype=dtype)

    def join(self, stream):
        stream.synchronize()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        for s in self.streams:
            s.close()
        self.streams = []

    # -- what the streams share
    def note(self, stream, kind, event=None, tag=None, nbytes=0):
        if not self.keep_log:
            return
        with self.changed:
            self.log.append(Entry(self._seq, time.perf_counter(), stream, kind, event,
                                  dict(tag or {}), nbytes))
            self._seq += 1

    def memcpy(self, stream, dst, src, tag):
        nbytes = src.numel() * src.element_size()
        self.note(stream, "copy_start", tag=tag, nbytes=nbytes)
        start = time.perf_counter()
        dst.copy_(src)
        if self.bandwidth:
            time.sleep(max(0.0, start + nbytes / self.bandwidth - time.perf_counter()))
        self.note(stream, "copy_end", tag=tag, nbytes=nbytes)

    def fail(self, error):
        with self.changed:
            if self.error is None:
                self.error = error
            self.changed.notify_all()

    def block_until(self, ready):
        """Wait (host or stream thread) until ready(); raise the first stream failure."""
        with self.changed:
            while not ready():
                if self.error is not None:
                    raise RuntimeError("a CPU device stream failed") from self.error
                self.changed.wait(POLL_S)
        if self.error is not None:
            raise RuntimeError("a CPU device stream failed") from self.error

    def entries(self, kind=None, stream=None):
        """The log, optionally only one kind and/or one stream's entries."""
        with self.changed:
            return [e for e in self.log if (kind is None or e.kind == kind)
                    and (stream is None or e.stream == stream)]
