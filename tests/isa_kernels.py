"""The tests' access to one instruction set's compiled kernels."""
import pytest

import moed.backends.cpu.isa as cpu
from moed.errors import ConfigError


def assert_refused_then_skip(isa):
    """For an ISA this CPU lacks: assert that asking for it is refused with a clear
    error (never a crash later), then skip, so the summary shows what did not run."""
    with pytest.raises(ConfigError) as e:
        cpu.load_kernels(isa)
    assert e.value.field == "MOED_ISA" and isa in str(e.value), e.value
    pytest.skip(f"{isa}: this CPU lacks it (refusal checked)")


def kernels_or_skip(isa):
    """The kernels built for `isa`; for an ISA this CPU lacks, the refusal is
    asserted and the test skipped."""
    if isa not in cpu.supported_isas():
        assert_refused_then_skip(isa)
    return cpu.load_kernels(isa)
