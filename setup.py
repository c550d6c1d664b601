"""Builds the optional C kernels (plain C, no torch headers); everything else is in pyproject.toml."""

import platform

from setuptools import Extension, setup

flags = ["-O3", "-ffp-contract=off", "-pthread", "-std=c11"]
if platform.machine() in ("x86_64", "AMD64", "aarch64", "arm64"):
    flags.append("-march=native")  # built on the machine that runs it (pip install from source)

setup(
    ext_modules=[
        Extension(
            "garagelm.quant._kernels",
            sources=["garagelm/quant/_kernels.c"],
            extra_compile_args=flags,
            extra_link_args=["-pthread"],
            optional=True,  # without a C compiler garagelm still works, with the slower torch path
        )
    ]
)
