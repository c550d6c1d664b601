"""The kernels without Python: tests/c/kernel_driver.c checks a variant's int8 products (the same
bits as the plain C loop) and attention (against float64) on the same inputs. The NEON variant is
cross-compiled for aarch64 and run under qemu-user (no ARM machine here); the x86 variants run
natively. And the whole extension must compile for aarch64, with and without the dot products."""

from __future__ import annotations

import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

from garagelm.quant import cpu

ROOT = Path(__file__).resolve().parents[1]
DRIVER = ROOT / "tests" / "c" / "kernel_driver.c"
FLAGS = ["-O2", "-ffp-contract=off", "-std=c11", "-Wall", "-Wno-unused-function", "-Wno-psabi", "-Werror"]
# (compiler, target flags, runner) per variant; the runner runs the binary (qemu for aarch64)
TARGETS = {
    "neon": ("aarch64-linux-gnu-gcc", ["-march=armv8.2-a+dotprod+fp16", "-static"], ["qemu-aarch64"]),
    "avxvnni": ("gcc", ["-march=x86-64-v3", "-mavxvnni"], []),
    "avx2": ("gcc", ["-march=x86-64-v3"], []),
    "generic": ("gcc", [], []),
}
APT = "apt-get install gcc-aarch64-linux-gnu qemu-user (tests/run.sh does)"


def _tools(variant: str) -> None:
    compiler, _, runner = TARGETS[variant]
    for tool in [compiler, *runner]:
        if shutil.which(tool) is None:
            pytest.skip(f"{variant}: needs {tool}; {APT}")
    if not runner and not cpu.VARIANTS[variant] <= cpu.features():
        pytest.skip(f"{variant}: this CPU lacks {', '.join(sorted(cpu.VARIANTS[variant] - cpu.features()))}")


@pytest.mark.parametrize("variant", list(TARGETS))
def test_driver_checks_the_variant(variant, tmp_path):
    _tools(variant)
    compiler, flags, runner = TARGETS[variant]
    exe = tmp_path / f"driver-{variant}"
    subprocess.run([compiler, *FLAGS, *flags, str(DRIVER), "-lm", "-o", str(exe)], check=True)
    run = subprocess.run([*runner, str(exe)], capture_output=True, text=True, timeout=120)
    lines = run.stdout.splitlines()
    print(run.stdout)
    assert run.returncode == 0, run.stdout + run.stderr
    assert all(line.startswith(variant + " ") for line in lines)  # the variant it was built as
    assert (
        sum("same bits" in line for line in lines) == 24 and sum(line.endswith(": ok") for line in lines) == 2
    )


@pytest.mark.parametrize("march", ["armv8.2-a+dotprod+fp16", "armv8-a"])
def test_extension_compiles_for_aarch64(march):
    """setup.py's two aarch64 builds (neon, generic) of the whole module compile cleanly."""
    if shutil.which("aarch64-linux-gnu-gcc") is None:
        pytest.skip(f"needs aarch64-linux-gnu-gcc; {APT}")
    cmd = ["aarch64-linux-gnu-gcc", "-fsyntax-only", *FLAGS, f"-march={march}",
           f"-I{sysconfig.get_paths()['include']}", str(ROOT / "garagelm" / "quant" / "_kernels.c")]  # fmt: skip
    subprocess.run(cmd, check=True)
