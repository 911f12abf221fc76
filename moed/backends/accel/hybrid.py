"""The hybrid engine's routed experts: the model's dense part runs on the device, each
MoE layer's routed experts on the host's CPU kernels (decodes, short prefills) or
streamed to the device (stream-loading prefill, for the rows the planner sends there).

Per MoE layer and step (HostBridge.submit, then the getter it returns):

    caller stream:  ... router                      shared expert          wait back  ...
    d2h stream:          wait caller  x, ids, w -> host staging  record sent
    host:                             sent.synchronize()  CPU experts -> staging
    h2d stream:                                                   staging -> y  (joined)

so the CPU experts run while the device computes the shared expert (MoE.__call__
issues it between submit and the getter). With dual-batch overlap two host threads
run two micro-batches: each has its own staging (a bridge per thread) and the CPU
experts of one run while the device serves the other's attention; `cpu_lock` keeps
one micro-batch at a time in the CPU kernels, which use every core.

On the CPU device (the tests' twin) the same copies run on its stream threads, with
its optional bandwidth cap standing in for PCIe.

Shape legend: T tokens of the step, k experts per token, D hidden.
"""
import inspect
import threading
import time

import torch


class StepRoute(threading.local):
    """Which rows of the current step take stream-loading prefill: set by the model
    runner before each forward, read by every layer's HybridExperts; per thread (the
    prefill thread forwards beside the decode steps)."""

    def __init__(self):
        self.slp_rows = []       # [slice] of step rows (whole prefill chunks)

    def rest(self, num_rows, device):
        """[R] int64 rows outside slp_rows (on device), or None when every row is in."""
        keep = torch.ones(num_rows, dtype=torch.bool)
        for rows in self.slp_rows:
            keep[rows] = False
        if not keep.any():
            return None
        return keep.nonzero()[:, 0].to(device)


class Staging:
    """One thread's host staging buffers, grown on demand (pinned on CUDA)."""

    def __init__(self, device):
        self.device = device
        self.rows = 0
        self.x = self.ids = self.w = self.y = None

    def take(self, T, D, k, x_dtype):
        if T > self.rows or self.x.shape[1] != D or self.ids.shape[1] != k or \
                self.x.dtype != x_dtype:
            rows = max(T, 2 * self.rows)
            self.x = self.device.host_empty((rows, D), x_dtype)
            self.ids = self.device.host_empty((rows, k), torch.int64)
            self.w = self.device.host_empty((rows, k), torch.float32)
            self.y = self.device.host_empty((rows, D), torch.float32)
            self.rows = rows
        return self.x[:T], self.ids[:T], self.w[:T], self.y[:T]


class HostBridge:
    """Moves a step's expert inputs to the host and the results back; one per model,
    with streams and staging per calling thread (dual-batch overlap runs two)."""

    def __init__(self, device):
        self.device = device
        self.cpu_lock = threading.Lock()
        self.local = threading.local()
        self.cpu_seconds = 0.0         # time in the CPU experts since the last take_times
        self.calls = 0                 # expert calls served (all threads)
        self._times_lock = threading.Lock()

    def _mine(self):
        mine = getattr(self.local, "parts", None)
        if mine is None:
            name = threading.current_thread().name
            d = self.device
            mine = self.local.parts = (d.stream(f"d2h-{name}"), d.stream(f"h2d-{name}"),
                                       d.event(f"sent-{name}"), Staging(d))
        return mine

    def submit(self, experts, x, ids, w):
        """Start experts.forward(x, ids, w) on the host -> a getter of its [T, D]
        float32 result on the device. x [T, D], ids and w [T, k] on the device."""
        d2h, h2d, sent, staging = self._mine()
        T, D = x.shape
        xs, ids_s, ws, ys = staging.take(T, D, ids.shape[1], x.dtype)
        # dtype conversions on the caller's stream, before d2h is told to wait for it;
        # `srcs` keeps them alive until the copies out of them are done (sent)
        srcs = [src if src.dtype == dst.dtype else src.to(dst.dtype)
                for dst, src in ((xs, x), (ids_s, ids), (ws, w))]
        self.device.after_caller(d2h)
        for dst, src in zip((xs, ids_s, ws), srcs):
            d2h.copy(dst, src, {"what": "experts-in"})
        d2h.record(sent)

        def finish():
            sent.synchronize()
            srcs.clear()
            start = time.perf_counter()
            with self.cpu_lock:
                if takes_out(experts):
                    experts.forward(xs, ids_s, ws, out=ys)
                else:
                    ys.copy_(experts.forward(xs, ids_s, ws))
            with self._times_lock:
                self.cpu_seconds += time.perf_counter() - start
                self.calls += 1
            y = self.device.empty((T, D), torch.float32)
            self.device.after_caller(h2d)
            h2d.copy(y, ys, {"what": "experts-out"})
            # the caller's later work waits for y; the next submit of this thread
            # overwrites the staging only after its own sent event, which follows
            # the caller's use of y, so the copy from ys is done by then
            self.device.join(h2d)
            return y
        return finish

    def take_times(self):
        """Seconds the CPU experts took since the last call (for the planner)."""
        with self._times_lock:
            s, self.cpu_seconds = self.cpu_seconds, 0.0
        return s


def takes_out(experts):
    cached = getattr(experts, "_moed_takes_out", None)
    if cached is None:
        cached = "out" in inspect.signature(experts.forward).parameters
        try:
            experts._moed_takes_out = cached
        except AttributeError:
            pass
    return cached


class HybridExperts:
    """One MoE layer's routed experts for the hybrid engine: rows in route.slp_rows
    through `streamed` (StreamedExperts on the device), the others through `host`
    (the CPU backend's layer) over the bridge."""

    def __init__(self, host, bridge, route, streamed=None):
        self.host = host            # CPUExpertLayer (or the torch reference on the host)
        self.bridge = bridge
        self.route = route
        self.streamed = streamed    # StreamedExperts, or None (no SLP for this model)

    @property
    def name(self):
        return f"hybrid({self.host.name}" + (f", {self.streamed.name})" if self.streamed else ")")

    @property
    def num_experts(self):
        return self.host.num_experts

    def submit(self, x, ids, w):
        """-> getter of the [T, D] float32 result (see MoE.__call__)."""
        if not self.route.slp_rows or self.streamed is None:
            return self.bridge.submit(self.host, x, ids, w)
        out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
        for rows in self.route.slp_rows:
            out[rows] = self.streamed.forward(x[rows], ids[rows], w[rows])
        rest = self.route.rest(x.shape[0], x.device)
        if rest is None:
            return lambda: out
        finish = self.bridge.submit(self.host, x[rest], ids[rest], w[rest])

        def done():
            out[rest] = finish()
            return out
        return done

    def forward(self, x, ids, w):
        return self.submit(x, ids, w)()

    __call__ = forward
