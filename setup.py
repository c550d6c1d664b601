"""Builds the optional C kernels (plain C, no torch headers); everything else is in pyproject.toml.

`garagelm/quant/_kernels.c` is compiled once per CPU variant, each into its own module with its
own instruction-set flags, and garagelm.quant.cpu picks the best one the CPU runs at import. No
-march=native: a wheel built here runs on any CPU of the architecture (see kernels/core.h).
"""

import platform
from pathlib import Path

from setuptools import Extension, setup

COMMON = ["-O3", "-ffp-contract=off", "-pthread", "-std=c11"]
VARIANTS = {
    "x86_64": {
        # AVX-512 F/BW/VL/DQ/CD (x86-64-v4) with VNNI and BITALG: Ice Lake, Sapphire Rapids, Zen 4 and later
        "avx512": ["-march=x86-64-v4", "-mavx512vnni", "-mavx512bitalg", "-mtune=icelake-server"],
        # AVX2 + FMA + F16C (x86-64-v3) with AVX-VNNI: Intel Core 12th gen and later
        "avxvnni": ["-march=x86-64-v3", "-mavxvnni", "-mtune=alderlake"],
        "avx2": ["-march=x86-64-v3", "-mtune=znver2"],  # Haswell and later, AMD Zen 1-3
        "generic": [],
    },
    "aarch64": {"neon": ["-march=armv8.2-a+dotprod+fp16"], "generic": []},
}
machine = {"AMD64": "x86_64", "arm64": "aarch64"}.get(platform.machine(), platform.machine())
headers = [str(p) for p in Path("garagelm/quant/kernels").glob("*.h")]

setup(
    ext_modules=[
        Extension(
            f"garagelm.quant._kernels_{name}",
            sources=["garagelm/quant/_kernels.c"],
            depends=headers,
            extra_compile_args=[*COMMON, *flags, f"-DGARAGE_MODULE=_kernels_{name}"],
            extra_link_args=["-pthread"],
            optional=True,  # without a C compiler garagelm still works, with the slower torch path
        )
        for name, flags in VARIANTS.get(machine, {"generic": []}).items()
    ]
)
