"""The device interface the accelerator pipelines are written against.

Five things, with CUDA's semantics (moed.backends.accel.cuda_device is the product;
moed.backends.accel.cpu_device runs the same pipeline code on threads, for CI):

- a Stream runs the work enqueued on it in order, asynchronously to the host:
  `copy` (host -> device, asynchronous), `launch` (compute), `record` / `wait`;
- an Event marks a point in a stream. `stream.wait(event)` holds back the stream's
  later work until the event's most recent `record` *issued before the wait*
  has completed; waiting on an event never recorded is a no-op (as in CUDA);
- host staging buffers (`host_empty`: pinned on CUDA) and device buffers (`empty`),
  allocated by the caller once and reused;
- `after_caller(stream)`: the stream's later work waits for the caller's so far;
- `join(stream)`: the caller's later work (its own stream on CUDA, the host on the
  CPU device) waits for everything enqueued on `stream` so far.

A pipeline issues its work from one host thread, so "issued before" is program
order: record an event before issuing the wait that must see it.

`tag` arguments describe the work for the CPU device's event log (which slot, which
expert); CUDA ignores them.
"""


class Stream:
    """An in-order queue of asynchronous work on a device."""

    name: str

    def copy(self, dst, src, tag=None):
        """Enqueue dst.copy_(src): host (pinned) -> device, asynchronous to the host."""
        raise NotImplementedError

    def launch(self, fn, tag=None):
        """Enqueue fn() (device compute: it only issues device work on CUDA)."""
        raise NotImplementedError

    def record(self, event, tag=None):
        """Mark this point of the stream with event."""
        raise NotImplementedError

    def wait(self, event):
        """Hold this stream's later work until event's latest record completes."""
        raise NotImplementedError

    def synchronize(self):
        """Block the host until this stream's work so far is done."""
        raise NotImplementedError


class Event:
    """A point in a stream that other streams wait on."""

    name: str

    def synchronize(self):
        """Block the host until the event's latest record completes."""
        raise NotImplementedError


class Device:
    """Streams, events, host staging and device buffers of one accelerator."""

    kind: str            # "cuda" | "cpu"
    torch_device: object  # torch.device the buffers live on

    def stream(self, name):
        raise NotImplementedError

    def event(self, name):
        raise NotImplementedError

    def host_empty(self, shape, dtype):
        """A host staging buffer that asynchronous copies can read (pinned on CUDA)."""
        raise NotImplementedError

    def empty(self, shape, dtype):
        """A device buffer."""
        raise NotImplementedError

    def to_device(self, t):
        """t on this device (issued on the caller's stream)."""
        return t.to(self.torch_device)

    def after_caller(self, stream):
        """stream's later work waits for what the caller has issued so far (its inputs
        moved to the device). A no-op where the caller is the host."""

    def join(self, stream):
        """The caller's later work waits for everything enqueued on stream so far."""
        raise NotImplementedError
