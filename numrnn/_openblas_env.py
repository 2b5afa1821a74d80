"""Let OpenBLAS use its AVX-512 kernels on AVX-512 CPUs that its DYNAMIC_ARCH build does not recognize.

``np.dot`` inside ``@njit`` calls SciPy's bundled OpenBLAS (0.3.30 here),
which picks its kernels by CPU model at load time. On the Zen 5 benchmark
machine it falls back to ``Haswell`` (AVX2) kernels although the CPU has
AVX-512. Measured, single thread, ``OPENBLAS_CORETYPE=SkylakeX`` against the
default: 3200x512 @ 512x2048 99 vs 53 GFLOP/s; 32x512 @ 512x2048 59 vs 38;
64x120 @ 120x360 69 vs 39 (the per-step products of the standard shapes).

OpenBLAS reads ``OPENBLAS_CORETYPE`` once, when the library loads, so this
must run before NumPy/SciPy load theirs (``import numrnn`` does it first
thing; SciPy's library loads lazily, at the first ``np.dot`` numba compiles).
It only sets the variable when it is unset, the CPU reports every AVX-512
subset the SkylakeX kernels use, and ``NUMRNN_KEEP_OPENBLAS_CORETYPE`` is not
set.
"""

from __future__ import annotations

import os

_SKYLAKEX_FLAGS = {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}


def prefer_avx512_openblas() -> bool:
    """Set ``OPENBLAS_CORETYPE=SkylakeX`` where that is safe and not decided already; True if set."""
    if "OPENBLAS_CORETYPE" in os.environ or os.environ.get("NUMRNN_KEEP_OPENBLAS_CORETYPE"):
        return False
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return False
    if not _SKYLAKEX_FLAGS <= set(flags):
        return False
    os.environ["OPENBLAS_CORETYPE"] = "SkylakeX"
    return True
