"""The device interface's semantics on the CPU implementation (threads and events), and
on CUDA where a device is present: in-order streams, cross-stream waits that see the
record issued before them, a bandwidth cap, stream failures surfacing on the host."""
import time

import pytest
import torch

from moed.backends.accel.cpu_device import CPUDevice
from moed.backends.accel.cuda_device import CUDADevice
from moed.errors import ConfigError


@pytest.fixture
def device():
    d = CPUDevice()
    yield d
    d.close()


def test_stream_runs_in_order_asynchronously(device):
    s = device.stream("s")
    seen = []
    s.launch(lambda: (time.sleep(0.02), seen.append(1)))
    s.launch(lambda: seen.append(2))
    assert seen == []                        # the host did not wait
    s.synchronize()
    assert seen == [1, 2]


def test_wait_holds_a_stream_until_the_record_completes(device):
    a, b = device.stream("a"), device.stream("b")
    ev = device.event("ev")
    seen = []
    a.launch(lambda: (time.sleep(0.03), seen.append("a")))
    a.record(ev)
    b.wait(ev)
    b.launch(lambda: seen.append("b"))
    b.synchronize()
    assert seen == ["a", "b"]
    kinds = [(e.stream, e.kind) for e in device.log]
    assert kinds.index(("a", "record")) < kinds.index(("b", "wait_end"))


def test_wait_sees_only_records_issued_before_it(device):
    # CUDA semantics: a wait on a never-recorded event is a no-op, and a wait does not
    # wait for a record issued after it
    a, b = device.stream("a"), device.stream("b")
    ev = device.event("ev")
    b.wait(ev)
    b.synchronize()                          # returns at once: nothing to wait for
    a.record(ev)
    a.synchronize()
    gate = []
    a.launch(lambda: device.block_until(lambda: bool(gate)))   # a blocked until released
    b.wait(ev)                               # the first record: completed already
    a.record(ev)                             # the second, issued after the wait
    b.launch(lambda: None)
    b.synchronize()                          # does not deadlock on a
    assert ev.completed == 1 and ev.issued == 2
    gate.append(True)
    ev.synchronize()
    assert ev.completed == 2


def test_copy_honours_the_bandwidth_cap():
    with CPUDevice(bandwidth=10e6) as device:       # 10 MB/s: 100 KB take 10 ms
        s = device.stream("loader")
        src, dst = device.host_empty((100_000,), torch.uint8), device.empty((100_000,), torch.uint8)
        src.copy_(torch.arange(100_000) % 251)
        t = time.perf_counter()
        s.copy(dst, src, {"what": "block"})
        s.synchronize()
        took = time.perf_counter() - t
        assert torch.equal(dst, src)
        start, end = device.entries("copy_start"), device.entries("copy_end")
        assert start[0].nbytes == 100_000 and start[0].tag == {"what": "block"}
        assert end[0].time - start[0].time >= 0.01 and took >= 0.01


def test_a_failing_task_surfaces_on_synchronize_without_deadlock(device):
    a, b = device.stream("a"), device.stream("b")
    ev = device.event("ev")
    a.launch(lambda: 1 / 0)
    a.record(ev)                             # never completes: a has failed
    b.wait(ev)
    with pytest.raises(RuntimeError, match="stream failed") as info:
        b.synchronize()
    assert isinstance(info.value.__cause__, ZeroDivisionError)


def test_cuda_device_refuses_clearly_without_cuda():
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    with pytest.raises(ConfigError) as info:
        CUDADevice()
    assert info.value.field == "device"


def test_cuda_streams_copy_and_order():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device here")
    dev = CUDADevice()
    loader, compute = dev.stream("loader"), dev.stream("compute")
    ready = dev.event("ready")
    src = dev.host_empty((1 << 20,), torch.float32)
    assert src.is_pinned()
    src.copy_(torch.arange(1 << 20, dtype=torch.float32))
    dst = dev.empty((1 << 20,), torch.float32)
    out = dev.empty((1 << 20,), torch.float32)
    dev.after_caller(loader)
    loader.copy(dst, src)
    loader.record(ready)
    compute.wait(ready)
    compute.launch(lambda: torch.mul(dst, 2, out=out))
    dev.join(compute)
    assert torch.equal(out.cpu(), src * 2)
