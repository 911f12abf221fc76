# cython: language_level=3
"""Expert kernels built for the avx512emu path: the AVX-512 kernels with BF16 dot products emulated (see kernels_ext.pxi)."""
include "kernels_ext.pxi"
