"""The compiled CPU backend: kernels per instruction set (isa.py picks one at import
from CPUID), the packed weight stores, and the modules and operations objects that
replace the reference ones (install.py applies them to a built model in one pass).
"""
