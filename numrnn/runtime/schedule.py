"""How one kernel call uses the cores: the batch split, chosen from the spec and the input shape.

Batch rows are independent for the whole sequence and every layer, so a call
with ``B`` rows can run as ``n`` calls of the same compiled kernel on ``B / n``
rows each, one per core, with no synchronization inside the time loop (no
per-step thread launch, no barrier). Each worker runs single-threaded BLAS.

Measured on the 2-core benchmark machine, seed000 (3xGRU(120), B128, T196):
letting OpenBLAS thread each per-step GEMM (128x120x360) costs a fork/join per
step; when the other core is busy that turned 0.4 s into 2.9 s. Two batch
halves with single-threaded BLAS keep both cores busy for the whole call.
Unsplit calls also run single-threaded BLAS (see ``Kernel.__call__``).

Policy (``plan``):

- ``n = min(cores, B)`` workers, rows split as evenly as possible;
- no split (one call in the calling thread) when ``B == 1`` or when the work
  per worker is below :data:`MIN_FLOPS_PER_WORKER` (a thread hand-off costs
  tens of microseconds);
- ``NUMRNN_NUM_THREADS`` caps ``cores`` (``1`` disables the split).

Inside each worker the generated code picks the per-step recurrent product by
rows (the kernel's ``small`` argument): one row, OpenBLAS gemv; up to
:func:`hand_loop_rows` rows, a hand loop over the cache-resident packed
weights; more rows, one BLAS GEMM per step.

Not done (measured or judged): splitting hidden units across the cores needs a
barrier every step; with the other engineers' jobs on the same two cores a
spinning barrier stalls for whole time slices, so only the barrier-free batch
split is used. B=1 shapes therefore run on one core.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

from codegen import StackSpec

#: Below this many FLOPs per worker the split costs more than it saves (hand-off ~30 us; 2 MFLOP is
#: ~50 us of work here).
MIN_FLOPS_PER_WORKER = 2e6

_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


@functools.cache
def cores() -> int:
    """Workers a call may use: ``NUMRNN_NUM_THREADS``, else the CPUs this process may run on (read once)."""
    configured = os.environ.get("NUMRNN_NUM_THREADS")
    if configured:
        return max(1, int(configured))
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def stack_flops(spec: StackSpec, steps: int, batch: int) -> float:
    """Approximate FLOPs of one call: 2 x gates x T x B x units x (inputs + outputs) per cell."""
    return sum(
        2.0 * cell.gates * steps * batch * cell.units * (size + cell.output_size)
        for cell, size in zip(spec.cells, spec.input_sizes())
    )


def plan(spec: StackSpec, steps: int, batch: int) -> list[tuple[int, int]]:
    """Row ranges ``[(b0, b1), ...]`` of the workers of one call; a single range means no split."""
    n = min(cores(), batch)
    if n > 1 and stack_flops(spec, steps, batch) / n < MIN_FLOPS_PER_WORKER:
        n = 1
    bounds = [batch * k // n for k in range(n + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def _blas_setters() -> list:
    """``openblas_set_num_threads_local`` of each OpenBLAS that ``np.dot`` in ``@njit`` may call."""
    global _SETTERS
    if _SETTERS is None:
        setters = []
        for path in _openblas_paths():
            try:
                setter = ctypes.CDLL(path).openblas_set_num_threads_local
            except (OSError, AttributeError):
                continue
            setter.argtypes, setter.restype = [ctypes.c_int], ctypes.c_int
            setters.append(setter)
        _SETTERS = setters
    return _SETTERS


_SETTERS: list | None = None


def _single_threaded_blas() -> None:
    """Make this thread's OpenBLAS calls single-threaded (the workers already use every core)."""
    for setter in _blas_setters():
        setter(1)


@contextmanager
def single_threaded_blas():
    """This thread's OpenBLAS single-threaded for the block (per-step GEMMs are too small to fork)."""
    previous = [setter(1) for setter in _blas_setters()]
    try:
        yield
    finally:
        for setter, n in zip(_blas_setters(), previous):
            setter(n)


def _openblas_paths() -> list[str]:
    """SciPy's OpenBLAS (the one ``np.dot`` calls inside ``@njit``), when it is a bundled wheel library."""
    import scipy

    base = os.path.dirname(os.path.dirname(scipy.__file__))
    return sorted(glob.glob(os.path.join(base, "scipy.libs", "libscipy_openblas*.so*")))


#: OpenBLAS cores with AVX-512 small-matrix GEMM kernels.
_AVX512_CORES = ("skylakex", "cooperlake", "sapphirerapids")


@functools.cache
def hand_loop_rows() -> int:
    """Batch rows up to which the per-step recurrent product is a hand loop rather than BLAS.

    Measured, one thread, per step (rows x inputs x outputs), hand loop vs BLAS:
    with OpenBLAS's SkylakeX kernels 1x64x256 0.92 vs 0.57 us, 1x256x1024
    10.1 vs 10.5, 4x128x512 9.0 vs 2.7, 8x128x512 17.5 vs 4.4: BLAS (0 rows).
    With its Haswell kernels 4x128x512 8.9 vs 23.7 and 8x128x512 17.7 vs 29.6
    (no small-matrix kernels): the hand loop up to 4 rows.
    ``NUMRNN_HAND_LOOP_ROWS`` overrides the choice.
    """
    if os.environ.get("NUMRNN_HAND_LOOP_ROWS"):
        return int(os.environ["NUMRNN_HAND_LOOP_ROWS"])
    for path in _openblas_paths():
        try:
            corename = ctypes.CDLL(path).scipy_openblas_get_corename
        except (OSError, AttributeError):
            continue
        corename.restype = ctypes.c_char_p
        if corename().decode().lower() in _AVX512_CORES:
            return 0
    return 4


def pool() -> ThreadPoolExecutor:
    """The process-wide worker pool (threads created once, BLAS single-threaded in each)."""
    global _POOL
    if _POOL is None:
        with _POOL_LOCK:
            if _POOL is None:
                _POOL = ThreadPoolExecutor(max_workers=max(2, cores()), thread_name_prefix="numrnn",
                                           initializer=_single_threaded_blas)
    return _POOL
