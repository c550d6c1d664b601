"""Which build of the C kernels runs: the best variant this CPU executes, or the one GARAGE_CPU names.

setup.py compiles `_kernels.c` once per instruction-set variant (see `kernels/core.h`); each is a
module `_kernels_<variant>` with the same functions and the same packed layouts, so any of them
serves any model. At import the best variant the CPU (and its OS) can run is chosen;
`GARAGE_CPU=avx512|avxvnni|avx2|neon|generic` forces one, which is how the tests run every
variant a machine can execute. `kernels` is the chosen module (None without a C compiler).
"""

from __future__ import annotations

import importlib
import os
from functools import lru_cache
from types import ModuleType

from garagelm.errors import GarageError


class KernelVariantError(GarageError, ValueError):
    """GARAGE_CPU names a variant that is unknown, not built here, or beyond this CPU."""


# best first; the CPU features each needs (names as _kernels_generic.cpu_features() gives them)
VARIANTS: dict[str, frozenset[str]] = {
    "avx512": frozenset(
        {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512vnni", "avx512bitalg", "fma", "f16c"}
    ),
    "avxvnni": frozenset({"avx2", "fma", "f16c", "avxvnni"}),
    "avx2": frozenset({"avx2", "fma", "f16c"}),
    "neon": frozenset({"neon", "dotprod"}),
    "generic": frozenset(),
}


# the variants setup.py builds on each architecture
BUILT_ON = {"x86_64": ("avx512", "avxvnni", "avx2", "generic"), "aarch64": ("neon", "generic")}


def _module(name: str) -> ModuleType | None:
    try:
        return importlib.import_module(f"garagelm.quant._kernels_{name}")
    except ImportError:
        return None


def features() -> frozenset[str]:
    """The instruction sets this CPU runs (cpuid and the OS's saved registers, or HWCAP on ARM)."""
    probe = _module("generic")
    return frozenset(probe.cpu_features()) if probe is not None else frozenset()


def runnable() -> list[str]:
    """The variants built here that this CPU can execute, best first."""
    have = features()
    return [v for v, needs in VARIANTS.items() if needs <= have and _module(v) is not None]


def unbuilt() -> list[str]:
    """Variants this CPU could run that setup.py should have built here but did not (a compiler
    without those instruction sets): tests/run.sh refuses to test a build that lost one."""
    import platform

    machine = {"AMD64": "x86_64", "arm64": "aarch64"}.get(platform.machine(), platform.machine())
    have = features()
    return [v for v in BUILT_ON.get(machine, ("generic",)) if VARIANTS[v] <= have and _module(v) is None]


def load(name: str) -> ModuleType:
    """The kernels module of one variant; a clear error if it was not built or this CPU lacks it."""
    if name not in VARIANTS:
        raise KernelVariantError(
            f"GARAGE_CPU={name!r} is not a kernel variant; use one of {', '.join(VARIANTS)}"
        )
    module = _module(name)
    if module is None:
        raise KernelVariantError(
            f"the {name} kernels were not built on this machine (built here: {', '.join(runnable())})"
        )
    missing = VARIANTS[name] - features()
    if missing:
        raise KernelVariantError(
            f"this CPU cannot run the {name} kernels (it lacks {', '.join(sorted(missing))}); "
            f"it runs: {', '.join(runnable())}; unset GARAGE_CPU or name one of those"
        )
    return module


@lru_cache(maxsize=1)
def _bf16_dot() -> bool:
    """Whether this CPU multiplies bf16 natively (AMX tiles or AVX512-BF16 dot products)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def bf16_prefill_cpu() -> bool:
    """Whether prefill runs in bf16 here: the AVX-512 kernels on a CPU with AMX or AVX512-BF16
    (GARAGE_CPU=avx2 on such a CPU measures what an AVX2 laptop does: int8 prefill, its fastest
    there, as it has no bf16 dot). ggml_linear.use_bf16 also honours exact mode."""
    return VARIANT == "avx512" and _bf16_dot()


def variant_name() -> str:
    """The variant that runs, as `garage bench` and `--verbose` print it."""
    return VARIANT or "none (torch only)"


def _choose() -> tuple[ModuleType | None, str | None]:
    forced = os.environ.get("GARAGE_CPU", "").strip().lower()
    if forced:
        return load(forced), forced
    best = next(iter(runnable()), None)
    return (load(best), best) if best else (None, None)


kernels, VARIANT = _choose()


_threads = 1  # what set_threads asked for, carried over to a variant set_variant switches to


def set_threads(n: int) -> int:
    """Threads the kernels split their work over (the pool is per variant); returns those used."""
    global _threads
    _threads = n
    return kernels.set_threads(n) if kernels is not None else 1


def set_variant(name: str) -> str | None:
    """Run the kernels of variant `name` from now on (tests and benchmarks compare variants this
    way); returns the previous one. A model keeps what its load bound (a decode plan holds the
    previous module's layers), so load models after switching."""
    global kernels, VARIANT
    module = load(name)
    module.set_threads(_threads)
    previous, kernels, VARIANT = VARIANT, module, name
    return previous
