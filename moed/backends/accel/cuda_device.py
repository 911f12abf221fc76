"""The device interface on CUDA: torch.cuda streams and events, pinned host memory,
non_blocking copies. The product; imports everywhere, constructs only where a CUDA
device is present (else ConfigError, field="device").

Tensors a launch allocates come from its stream's pool of the caching allocator;
buffers the pipeline allocates on the caller's stream are used on the others only
between the caller's wait_stream and `join`, so no record_stream is needed.
"""
import torch

from moed.backends.accel.device import Device, Event, Stream
from moed.errors import ConfigError


class CUDAEvent(Event):
    def __init__(self, name):
        self.name = name
        self.event = torch.cuda.Event()

    def synchronize(self):
        self.event.synchronize()


class CUDAStream(Stream):
    def __init__(self, device, name):
        self.name = name
        self.stream = torch.cuda.Stream(device=device)

    def copy(self, dst, src, tag=None):
        with torch.cuda.stream(self.stream):
            dst.copy_(src, non_blocking=True)

    def launch(self, fn, tag=None):
        with torch.cuda.stream(self.stream):
            fn()

    def record(self, event, tag=None):
        event.event.record(self.stream)

    def wait(self, event):
        self.stream.wait_event(event.event)

    def synchronize(self):
        self.stream.synchronize()


class CUDADevice(Device):
    """One CUDA device (index)."""

    kind = "cuda"

    def __init__(self, index=0):
        if not torch.cuda.is_available():
            raise ConfigError("no CUDA device is available", field="device")
        self.torch_device = torch.device("cuda", index)

    def stream(self, name):
        return CUDAStream(self.torch_device, name)

    def event(self, name):
        return CUDAEvent(name)

    def host_empty(self, shape, dtype):
        return torch.empty(shape, dtype=dtype, pin_memory=True)

    def empty(self, shape, dtype):
        return torch.empty(shape, dtype=dtype, device=self.torch_device)

    def join(self, stream):
        torch.cuda.current_stream(self.torch_device).wait_stream(stream.stream)

    def after_caller(self, stream):
        """stream's later work waits for what the caller has issued so far (its inputs)."""
        stream.stream.wait_stream(torch.cuda.current_stream(self.torch_device))
