"""garagelm: powerful AI without a data centre."""

import os as _os
import sys as _sys

__version__ = "0.1.0"


def _quiet_openmp() -> None:
    """torch's OpenMP threads spin after each torch op by default; on a laptop's few cores they
    then take turns with the C kernels' own threads (measured on 2 cores with the AVX2 kernels:
    decode 64 tok/s with spinning threads, 130 with sleeping ones; prompt 480 against 730).
    So they sleep, unless the user chose (OMP_WAIT_POLICY set) or bf16 prefill, which is torch's
    own work, runs (AVX-512 kernels on a CPU with AMX or AVX512-BF16: spinning is 20% faster there).
    libgomp reads this once, when torch loads: it takes effect only if garagelm comes first."""
    if "OMP_WAIT_POLICY" in _os.environ or "torch" in _sys.modules:
        return
    try:
        from garagelm.quant import cpu
    except ValueError:  # a bad GARAGE_CPU: reported where the kernels are first used
        return
    if not cpu.bf16_prefill_cpu():
        _os.environ["OMP_WAIT_POLICY"] = "PASSIVE"


_quiet_openmp()
