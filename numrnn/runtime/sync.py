"""Cross-thread synchronization inside ``@njit`` code: the per-step exchange of ``h``, the barrier, the job hand-off.

The unit split (:mod:`numrnn.runtime.schedule`) runs one kernel call on
several threads, each owning a slice of every layer's hidden units. Step ``s``
of a layer reads the whole ``h`` of step ``s - 1``, so the workers meet after
every step (the ``h`` exchange, below), and at a barrier where a block's
merged output is read across slices. A thread launch or a lock per step would
cost microseconds; the barrier is one cache line per worker holding a counter
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
partner cannot leave the others spinning forever, and the call's first epoch
at ``GENERATION``; then worker ``w``'s epoch at ``(w + 1) * STRIDE``, one
128-byte line each, so no two words share a line.

Within a layer the unit split's workers meet through ``h`` itself
(``codegen.targets.cpu_split``): each publishes its new ``h`` in cache lines
of an exchange buffer, each line's last 8 bytes a stamp (the step's epoch)
stored after the line's values, and reads the others' lines once their
stamps reach the step (:func:`await_stamp`). The stamp travels with its
line's values, so a step waits for one transfer between cores where a
barrier word and then the values took two (tiny64 split, hand-edited
kernels in turns: 28.6-29.7 us a call against 33.4-34.8 with the barrier).
Every call starts its epochs at ``flags[GENERATION]``, which the runtime
raises on every call, so no stamp a buffer kept from an earlier call can
pass for one of this call, and no epoch word needs clearing.

The same words, spun on the same way, hand a split call's jobs to its
partners (:mod:`numrnn.runtime.partners`): threads that stay in compiled code
between calls, waiting for the next job, so a call reaches them without a
thread wake-up or the GIL. ``ctl`` holds one state word per partner, at
``w * STRIDE`` for worker ``w >= 1``:

- :data:`IDLE` (0): the partner is in Python (blocked on its queue, or about to be);
- a kernel module's tag (> 0): it spins in that kernel's job loop, ready;
- :data:`RESERVED`, :data:`POSTED`, :data:`RUNNING`: a lead claimed it, its job
  is in its box, it runs the job;
- :data:`EVICT`: a lead of another kernel asked it to return to Python;
- :data:`WAKING`: a call that ran without it woke it from Python, to wait
  in a kernel's loop with no job (``STANDBY``), and it is not there yet.

A lead reserves every partner it needs or none (:func:`post_jobs`), so a
call runs either wholly on ready partners or on the queue path (or, where
the runtime lets it decline partners still asleep, not at all). A partner
leaves the ready state itself only with a compare-and-swap, so a lead that
reserved it can never be left waiting for a partner that went to sleep.
:func:`publish` stores a job (a tuple of the kernel's arguments) in the
partner's box and :func:`receive` loads it, as borrowed views.

Split kernels call these functions, and numba's disk cache keeps them
compiled into their machine code without tracking this file: any change here
must bump ``codegen.spec.CODEGEN_VERSION``.

This module imports numba: the runtime imports it only when a split call
runs, so ``import numrnn`` stays free of numba.
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
#: Index of the call's first epoch (the ``h`` exchange, below), in the abort word's line: read once per worker.
GENERATION = 1
#: Rounds of ``pause`` before a waiting worker starts yielding its time slice (55-70 us of spinning here).
SPIN_LIMIT = 2000
#: Rounds a ready partner waits for its next job before it goes back to Python and sleeps: the pause
#: rounds, then ``sched_yield`` rounds, which return at once on an idle core (3.6-3.7 ms in all here).
PARTNER_WAIT_ROUNDS = 8000

#: Partner states (the ready state is a kernel module's tag, > 0).
IDLE, RESERVED, POSTED, RUNNING, EVICT, WAKING = 0, -1, -2, -3, -4, -5
#: Roles of a split kernel's call: the lead posting its partners' jobs, the lead of a call whose
#: partners got their jobs from Python, a partner, and a partner that only waits in the kernel's loop
#: for a first job (its call's own job gives the loop its arguments' types, and is not run).
LEAD, LEAD_COLD, SERVE, STANDBY = 0, 1, 2, 3
#: Bytes of one partner's job box (a job is one tuple of kernel arguments, ~100 bytes per array).
BOX_BYTES = 8192


def new_flags(workers: int) -> np.ndarray:
    """A zeroed flags array for the split calls of ``workers`` threads."""
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
def compare_exchange(typingctx, array, index, expected, value):
    """``array[index] = value`` if it holds ``expected``, atomically (int64 array); whether it did."""
    if not (isinstance(array, types.Array) and array.dtype == types.int64):
        return None

    def codegen(context, builder, signature, args):
        ptr = _element_pointer(context, builder, signature.args[0], args[0], args[1])
        expected = context.cast(builder, args[2], signature.args[2], types.int64)
        value = context.cast(builder, args[3], signature.args[3], types.int64)
        outcome = builder.cmpxchg(ptr, expected, value, "seq_cst", "seq_cst")
        return builder.extract_value(outcome, 1)

    return types.boolean(array, types.intp, types.int64, types.int64), codegen


def _box_pointer(context, builder, box_type, box, job_type):
    model = context.data_model_manager[job_type]
    size = context.get_abi_sizeof(model.get_data_type())
    if size > BOX_BYTES:
        raise ValueError(f"a job of {size} bytes does not fit a partner's box of {BOX_BYTES} (sync.BOX_BYTES)")
    data = context.make_array(box_type)(context, builder, box).data
    return model, builder.bitcast(data, model.get_data_type().as_pointer())


def _is_box(box) -> bool:
    return isinstance(box, types.Array) and box.dtype == types.uint8 and box.ndim == 1


@intrinsic
def publish(typingctx, box, job):
    """Store the tuple ``job`` in ``box`` (``uint8``, :data:`BOX_BYTES`) for a partner's :func:`receive`."""
    if not (_is_box(box) and isinstance(job, types.BaseTuple)):
        return None

    def codegen(context, builder, signature, args):
        model, ptr = _box_pointer(context, builder, signature.args[0], args[0], signature.args[1])
        builder.store(model.as_data(builder, args[1]), ptr)
        return context.get_dummy_value()

    return types.void(box, job), codegen


@intrinsic
def receive(typingctx, box, like):
    """The job :func:`publish` stored in ``box``, typed as ``like``; its arrays are borrowed views.

    The arrays lose their memory owner (``meminfo``) and Python parent: the
    lead that published them keeps them alive until the partner reports the
    job done, and the partner must not release what it never held.
    """
    if not (_is_box(box) and isinstance(like, types.BaseTuple)):
        return None

    def codegen(context, builder, signature, args):
        job_type = signature.args[1]
        model, ptr = _box_pointer(context, builder, signature.args[0], args[0], job_type)
        return _borrowed(context, builder, job_type, model.from_data(builder, builder.load(ptr)))

    return like(box, like), codegen


def _borrowed(context, builder, value_type, value):
    """``value`` with the memory owner and parent of every array in it (tuples nested) set to null."""
    if isinstance(value_type, types.Array):
        array = context.make_array(value_type)(context, builder, value)
        array.meminfo = cgutils.get_null_value(array.meminfo.type)
        array.parent = cgutils.get_null_value(array.parent.type)
        return array._getvalue()
    if isinstance(value_type, types.BaseTuple):
        for i, member in enumerate(value_type):
            value = builder.insert_value(value, _borrowed(context, builder, member, builder.extract_value(value, i)), i)
    return value


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
def _wait_round(rounds):
    """One round of waiting: ``pause`` for the first :data:`SPIN_LIMIT` rounds, then yield the core."""
    if rounds < SPIN_LIMIT:
        cpu_pause()
    else:
        sched_yield()


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
            _wait_round(rounds)
            rounds += 1


@njit(nogil=True, cache=True, inline="always")
def await_stamp(slots, index, stamp, flags):
    """Wait until ``slots[index]`` (int64) reaches ``stamp``, read with acquire ordering, or abort is set.

    The wait of the unit split's ``h`` exchange, on one stamped line
    (``codegen.targets.cpu_split``): a reader that sees the stamp sees the
    values its writer stored in the line before it. Inlined, so that the
    exchange makes no call, which would take references to its arrays (in
    a tiny64 split call, exchanges made by a function over views of the
    buffer cost 5-7 us of 29).
    """
    rounds = 0
    while atomic_load(slots, index) < stamp:
        if atomic_load(flags, ABORT) != 0:
            return
        _wait_round(rounds)
        rounds += 1


@njit(nogil=True, cache=True)
def post_jobs(ctl, workers, tag):
    """Reserve partners ``1 .. workers - 1``, ready in kernel ``tag``, then post their jobs; or none of them.

    False when some partner was not ready in this kernel (asleep, or in
    another kernel's loop): the ones already reserved are put back, and the
    lead hands the jobs over from Python instead, or declines them.
    """
    for w in range(1, workers):
        if not compare_exchange(ctl, w * STRIDE, tag, RESERVED):
            for v in range(1, w):
                atomic_store(ctl, v * STRIDE, tag)
            return False
    for w in range(1, workers):
        atomic_store(ctl, w * STRIDE, POSTED)
    return True


@njit(nogil=True, cache=True)
def next_job(ctl, me, tag, wait_rounds):
    """Partner ``me``, its job done: ready in kernel ``tag`` until a job is posted (True), or it leaves (False).

    It leaves when evicted, or after ``wait_rounds`` rounds without a job
    (:data:`PARTNER_WAIT_ROUNDS` in the kernels), by a compare-and-swap from
    ready to :data:`IDLE` that fails if a lead reserved it meanwhile.
    """
    word = me * STRIDE
    atomic_store(ctl, word, tag)
    rounds = 0
    while True:
        state = atomic_load(ctl, word)
        if state == POSTED:
            atomic_store(ctl, word, RUNNING)
            return True
        if state == EVICT:
            atomic_store(ctl, word, IDLE)
            return False
        if rounds >= wait_rounds and state == tag and compare_exchange(ctl, word, tag, IDLE):
            return False
        _wait_round(rounds)
        rounds += 1


@njit(nogil=True, cache=True)
def await_partners(ctl, workers):
    """Wait until no partner of ``1 .. workers - 1`` has a job posted or running."""
    for w in range(1, workers):
        rounds = 0
        while True:
            state = atomic_load(ctl, w * STRIDE)
            if state != POSTED and state != RUNNING:
                break
            _wait_round(rounds)
            rounds += 1


@njit(nogil=True, cache=True)
def evict_partners(ctl, workers):
    """Send partners ``1 .. workers - 1`` back to Python and wait until each is :data:`IDLE`."""
    for w in range(1, workers):
        rounds = 0
        while True:
            state = atomic_load(ctl, w * STRIDE)
            if state == IDLE:
                break
            if state > 0:
                compare_exchange(ctl, w * STRIDE, state, EVICT)
            _wait_round(rounds)
            rounds += 1


@njit(nogil=True, cache=True)
def set_idle(ctl, w):
    """Partner ``w`` is back in Python after a failed job (its lead waits for that)."""
    atomic_store(ctl, w * STRIDE, IDLE)
