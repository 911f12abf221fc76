"""moed: local inference daemon for large Mixture-of-Experts models."""
import os

from Cython.Build import cythonize
from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext


class ParallelBuildExt(build_ext):
    """Compile extensions two at a time (CI and dev machines have 2 cores)."""

    def finalize_options(self):
        super().finalize_options()
        if not self.parallel:
            self.parallel = int(os.environ.get("MOED_BUILD_JOBS", "2"))


def extensions():
    # One expert extension per instruction set, each compiled with its own -m
    # flags; moed.backends.cpu.isa imports only the one the CPU and OS support.
    isa_flags = {
        "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vbmi",
                   "-mavx512bf16", "-mavx2", "-mfma"],
        "avx2": ["-mavx2", "-mfma", "-mf16c"],
        "generic": [],
        # the AVX-512 kernels with vdpbf16ps emulated (cython_src/bf16_emu.h): tests
        # the AVX-512 code on AVX-512 CPUs without AVX512_BF16; never auto-selected
        "avx512emu": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512vbmi",
                      "-mavx2", "-mfma", "-DMOED_BF16_EMULATED"],
    }
    kernels = ["cython_src/" + f for f in ("expert_kernels.c", "expert_units.h",
                                           "thread_pool.h", "probe_kernels.c",
                                           "dense_kernels.c", "attention_kernels.c",
                                           "glue_kernels.c", "decode_kernels.c",
                                           "mla_kernels.c", "decode_stack.c", "bf16_emu.h", "vec.h",
                                           "kernels_ext.pxi")]
    exts = [
        Extension("moed.backends.cpu._isa_guard", ["cython_src/_isa_guard.pyx"],
                  include_dirs=["cython_src"], extra_compile_args=["-O2"]),
    ] + [
        Extension(f"moed.backends.cpu._kernels_{isa}", [f"cython_src/_kernels_{isa}.pyx"],
                  include_dirs=["cython_src"], depends=kernels,
                  # -fno-wrapv: Python's CFLAGS carry -fwrapv, under which gcc cannot
                  # bound `i + n <= D` loops and leaves the plain-C kernels scalar
                  # (the [128, 2048] router dot: 100 us -> 10 us)
                  extra_compile_args=["-O3", "-fno-wrapv", "-pthread", "-fno-math-errno"]
                  + flags,
                  extra_link_args=["-pthread"])
        for isa, flags in isa_flags.items()
    ]
    return cythonize(exts, compiler_directives={"language_level": 3})


setup(
    name="moed",
    version="0.1.0",
    description="Local inference daemon for large Mixture-of-Experts models",
    python_requires=">=3.10",
    packages=find_packages(include=["moed", "moed.*"]),
    include_package_data=True,
    package_data={"moed": ["py.typed", "testing/tiny_corpus.txt", "demo_model/*"]},
    ext_modules=extensions(),
    cmdclass={"build_ext": ParallelBuildExt},
    install_requires=[
        "torch>=2.4",  # the Makefile installs the pinned CPU build first
        "numpy>=1.24",
        "safetensors>=0.4",
        "tokenizers>=0.19",
        "tiktoken>=0.7",  # checkpoints that ship tiktoken.model (Kimi-K2)
        "jinja2>=3.1",
        "pyyaml>=6",
        "tqdm>=4.60",
        # the daemon: the generated code in moed/server/gen needs these or newer
        "grpcio>=1.85.1,<2",
        "grpcio-health-checking>=1.85.1,<2",
        "grpcio-reflection>=1.85.1,<2",
        "grpcio-status>=1.85.1,<2",
        "protobuf>=7.35.1,<8",
        "opentelemetry-api>=1.45,<2",
        "opentelemetry-sdk>=1.45,<2",
        "opentelemetry-exporter-otlp-proto-grpc>=1.45,<2",
        "opentelemetry-exporter-prometheus>=0.66b0",   # /metrics
        # the OpenAI-compatible HTTP API
        "fastapi>=0.110",
        "uvicorn>=0.29",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "transformers==4.57.6",
            # pinned: tests/test_protos.py asserts regenerating gives byte-identical code
            "grpcio-tools==1.85.1",
            "openai>=1.40",     # the HTTP API's tests drive it with the official client
            "httpx>=0.27",
        ],
    },
    entry_points={
        "console_scripts": [
            "moed=moed.cli.daemon:main",
            "moectl=moed.cli.moectl:main",
        ],
    },
)
