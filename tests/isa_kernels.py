"""The tests' access to one instruction set's compiled kernels."""
import pytest

import moed.cpu as cpu
from moed.errors import ConfigError


def kernels_or_refused(isa):
    """The kernels built for `isa`, or None after asserting that this CPU, lacking
    it, refuses it with a clear error (never a crash later)."""
    if isa not in cpu.supported_isas():
        with pytest.raises(ConfigError):
            cpu.expert_kernels(isa)
        return None
    return cpu.expert_kernels(isa)
