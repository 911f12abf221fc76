# cython: language_level=3
"""Expert kernels built for the avx512 instruction set (see kernels_ext.pxi)."""
include "kernels_ext.pxi"
