# cython: language_level=3
"""Which instruction sets this CPU and OS support (imported before any kernel)."""

cdef extern from "cpu_features.h":
    int moed_cpu_avx2_fma() nogil
    int moed_cpu_avx512_bf16() nogil
    int moed_cpu_avx512_vbmi() nogil


def supported_isas():
    """Best first: the instruction-set paths this machine can run."""
    isas = []
    if moed_cpu_avx512_bf16():
        isas.append("avx512")
    if moed_cpu_avx2_fma():
        isas.append("avx2")
    isas.append("generic")
    if moed_cpu_avx512_vbmi():
        isas.append("avx512emu")      # for tests: never the default (see moed/cpu.py)
    return isas
