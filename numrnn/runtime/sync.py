"""Cross-thread synchronization inside ``@njit`` code: the per-step barrier of the unit split.

The unit split (:mod:`numrnn.runtime.schedule`) runs one kernel call on
several threads, each owning a slice of every layer's hidden units. Step ``s``
of a layer reads the whole ``h`` of step ``s - 1``, so the workers meet at a
barrier after every step. A thread launch or a lock per step would cost
microseconds; this barrier is one cache line per worker holding a counter
("epoch"), stored with release and read with acquire ordering, spun on with the
``pause`` hint. A worker that has waited :data:`SPIN_LIMIT` rounds yields its
time slice at every further round (``sched_yield``), so a partner that the OS
has descheduled on a busy machine gets the core back instead of being starved
by the spinner.

Numba has no atomics for CPU code, so the loads and stores are LLVM
intrinsics; ``sched_yield`` is declared as an external symbol (resolved from
libc when the machine code is loaded, so numba's disk cache stays valid, which
a ctypes function pointer would not).

Layout of the ``flags`` array (int64, :func:`new_flags`): the abort word at
``ABORT``, set when any worker fails, which releases every waiter so a failed
partner cannot leave the others spinning forever; then worker ``w``'s epoch
at ``(w + 1) * STRIDE``, one 128-byte line each, so no two words share a line.

Split kernels call :func:`barrier`, and numba's disk cache keeps it compiled
into their machine code without tracking this file: any change here must bump
``codegen.spec.CODEGEN_VERSION``.

This module imports numba: the runtime imports it only when a unit-split
call runs, so ``import numrnn`` stays free of numba.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

#: int64 slots between two words of ``flags`` (128 bytes: adjacent-line prefetch pairs 64-byte lines).
STRIDE = 16
#: Index of the abort word.
ABORT = 0
#: Rounds of ``pause`` before a waiting worker starts yielding its time slice (~10-50 us of spinning).
SPIN_LIMIT = 2000


def new_flags(workers: int) -> np.ndarray:
    """A zeroed flags array for one split call of ``workers`` threads."""
    return np.zeros((workers + 1) * STRIDE, dtype=np.int64)


def _element_pointer(context, builder, array_type, array, index):
    ary = context.make_array(array_type)(context, builder, array)
    return cgutils.get_item_pointer(context, builder, array_type, ary, [index], wraparound=False)


@intrinsic
def atomic_load(typingctx, array, index):
    """``array[index]`` (int64 array) read with acquire ordering: never hoisted out of a loop."""
    if not (isinstance(array, types.Array) and array.dtype == types.int64):
        return None

    def codegen(context, builder, signature, args):
        ptr = _element_pointer(context, builder, signature.args[0], args[0], args[1])
        return builder.load_atomic(ptr, "acquire", 8)

    return types.int64(array, types.intp), codegen


@intrinsic
def atomic_store(typingctx, array, index, value):
    """``array[index] = value`` (int64 array) with release ordering: earlier writes are visible first."""
    if not (isinstance(array, types.Array) and array.dtype == types.int64):
        return None

    def codegen(context, builder, signature, args):
        ptr = _element_pointer(context, builder, signature.args[0], args[0], args[1])
        value = context.cast(builder, args[2], signature.args[2], types.int64)
        builder.store_atomic(value, ptr, "release", 8)
        return context.get_dummy_value()

    return types.void(array, types.intp, types.int64), codegen


@intrinsic
def cpu_pause(typingctx):
    """The x86 ``pause`` spin-wait hint (nothing elsewhere)."""

    def codegen(context, builder, signature, args):
        import platform

        if platform.machine().lower() in ("x86_64", "amd64", "i686", "i386"):
            fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), []),
                                                "llvm.x86.sse2.pause")
            builder.call(fn, [])
        return context.get_dummy_value()

    return types.void(), codegen


@intrinsic
def sched_yield(typingctx):
    """libc ``sched_yield()``: give the core to another runnable thread."""

    def codegen(context, builder, signature, args):
        fnty = ir.FunctionType(ir.IntType(32), [])
        fn = cgutils.get_or_insert_function(builder.module, fnty, "sched_yield")
        builder.call(fn, [])
        return context.get_dummy_value()

    return types.void(), codegen


@njit(nogil=True, cache=True)
def barrier(flags, me, workers, epoch):
    """Publish that worker ``me`` reached ``epoch``, then wait until every worker has (or abort is set)."""
    atomic_store(flags, (me + 1) * STRIDE, epoch)
    for other in range(workers):
        if other == me:
            continue
        rounds = 0
        while atomic_load(flags, (other + 1) * STRIDE) < epoch:
            if atomic_load(flags, ABORT) != 0:
                return
            rounds += 1
            if rounds < SPIN_LIMIT:
                cpu_pause()
            else:
                sched_yield()
