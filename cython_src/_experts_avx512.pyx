# cython: language_level=3
"""Expert kernels built for the avx512 instruction set (see experts_ext.pxi)."""
include "experts_ext.pxi"
