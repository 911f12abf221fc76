"""Instruction-set dispatch: which compiled kernel path this process uses.

`MOED_ISA=avx512|avx2|generic|avx512emu` forces a path; forcing one the CPU
lacks is an error, never a crash (SIGILL) later. `avx512emu` is the AVX-512
build with its BF16 dot products emulated by FP32 FMAs (cython_src/bf16_emu.h):
it runs the AVX-512 code on AVX-512 CPUs without AVX512_BF16 so that its
precision and reduction orders are tested there; it is never the default.
"""
import functools
import os

from moed.errors import ConfigError

ISAS = ("avx512", "avx2", "generic", "avx512emu")
TEST_ONLY = ("avx512emu",)


@functools.cache
def supported_isas():
    """Best first; `generic` is always there. Probed once (CPUID and the OS's saved
    register state do not change while the process runs; the probe costs ~50 us,
    which per kernel call would show in a decode step)."""
    from moed.backends.cpu import _isa_guard
    return tuple(_isa_guard.supported_isas())


def selected_isa():
    forced = os.environ.get("MOED_ISA", "").strip().lower()
    supported = supported_isas()
    if not forced:
        return next(isa for isa in supported if isa not in TEST_ONLY)
    if forced not in ISAS:
        raise ConfigError(f"MOED_ISA={forced!r} is not one of {', '.join(ISAS)}", field="MOED_ISA")
    if forced not in supported:
        raise ConfigError(f"MOED_ISA={forced}: this CPU/OS supports only {', '.join(supported)}",
                          field="MOED_ISA")
    return forced


def load_kernels(isa=None):
    """The compiled expert-kernel extension for `isa` (default: selected_isa()).

    Imported only after the guard says this CPU and OS run it, so a CPU without
    AVX-512 never loads AVX-512 code.
    """
    import importlib
    if isa is None:
        isa = selected_isa()
    elif isa not in supported_isas():
        raise ConfigError(f"ISA {isa!r}: this CPU/OS supports only {', '.join(supported_isas())}",
                          field="MOED_ISA")
    return importlib.import_module(f"moed.backends.cpu._kernels_{isa}")
