"""Partner threads of split calls: they wait for the next job in compiled code, not in Python.

A split call (unit or direction split) runs worker 0's job on the calling
thread, the lead, and the others' on partners. Handed over through a thread
pool, each call paid for waking a sleeping thread and for passing the GIL
back and forth: measured on latency256 (LSTM(256), B1 T100, 1.42 ms a call),
the partner started 38 us after the lead, which waited for it at the first
barrier, and the lead learnt that the partner had finished 70 us after it had.

Here a partner that has run a job stays in the kernel's job loop
(:func:`codegen.targets.cpu_split.job_loop`): it spins on its state word
(:mod:`numrnn.runtime.sync`), and the next call of the same kernel stores
the job (its own arguments with the partner's ``me``) in the partner's box
and flips that word, all in compiled code without the GIL.
A partner that waits :data:`~numrnn.runtime.sync.PARTNER_WAIT_ROUNDS` rounds
without a job (the last of them yielding its core) goes back to Python and
sleeps on its queue, as does one evicted by a call of another kernel. A call
that finds its partners asleep, or in another kernel, hands the jobs over
through the queues (the cold path) and leaves the partners ready for the
next call. A call that may run without them (a guarded schedule's whose
static option is serial, in ``numrnn.runtime.kernels``) does not wait for
sleeping partners: it wakes them into the kernel's loop with no job
(:meth:`Partners.stand_by`) and runs on one thread, and the calls after it
find them ready.

Only one split call runs at a time (``numrnn.runtime.kernels``), so one set
of partners serves every split kernel of the process. A child process made by
``fork`` starts without them and makes its own.
"""

from __future__ import annotations

import atexit
import itertools
import logging
import os
import queue
import threading
import time

import numpy as np

from numrnn.runtime import sync
from numrnn.runtime.schedule import cores

log = logging.getLogger("numrnn")

#: A call that may decline partners hands them its jobs instead where a call declined them this recently, putting
#: them on stand-by, and they are asleep again (:meth:`Partners.run`).
SLEPT_AGAIN_SECONDS = 1.0


class Partners:
    """Threads ``1 .. workers - 1`` of split calls, with their state words, job boxes and barrier flags."""

    def __init__(self, workers: int):
        self.workers = workers
        self.ctl = np.zeros(workers * sync.STRIDE, dtype=np.int64)
        self.boxes = np.zeros((workers, sync.BOX_BYTES), dtype=np.uint8)
        self.flags = sync.new_flags(workers)
        self._queues = [queue.SimpleQueue() for _ in range(workers)]
        self._errors: list[BaseException | None] = [None] * workers
        #: Calls whose jobs went to ready partners, calls that handed them over through the queues, and calls
        #: declined because the partners were asleep or still waking (:meth:`run`'s ``decline``).
        self.hot_calls = self.cold_calls = self.declined_calls = 0
        #: When the last call declined the partners (:meth:`run`), if no call has run with them since.
        self._declined_at = -np.inf
        for w in range(1, workers):
            threading.Thread(target=self._serve, args=(w,), name=f"numrnn-partner-{w}", daemon=True).start()

    def run(self, kernel, lead: tuple, workers: int, decline: bool = False) -> bool:
        """``kernel(*lead)`` on this thread as worker 0, and the same job with ``me = w`` on partner ``w < workers``.

        ``lead`` is worker 0's job (ending with ``me = 0``, :attr:`flags` and
        the shared buffers), then ``ctl``, ``box`` and the role: the job
        followed by :meth:`lead_tail`. Partners ready in ``kernel`` get their
        jobs from the lead's own call, which stores them in compiled code;
        others get theirs through their queues. A worker that fails sets the
        abort word, which releases the others' waits, and its error is raised
        here once every worker has stopped.

        Each call starts its epochs (the barrier's, the ``h`` exchange's
        stamps) at ``flags[GENERATION]``, above every epoch of an earlier
        call, so only the abort word is cleared between calls.

        With ``decline``, a call whose partners are not all ready runs
        nothing and returns False where any of them is asleep or still
        waking (:data:`~numrnn.runtime.sync.WAKING`), having put the sleeping
        ones on stand-by (:meth:`stand_by`): the caller runs the call
        without them. Partners ready in another kernel's loop are awake, so
        the call hands its jobs over as usual. So does a call that finds
        asleep partners which a declined call put on stand-by less than
        :data:`SLEPT_AGAIN_SECONDS` ago: they waited their few milliseconds
        for it and slept again (behind a call longer than their wait), and
        declining them again would repeat that at every call (LSTM(1024) B1
        T50: every call after a pause ran serial, 19 ms, against 8.5-9.6 ms
        split). True when the call ran.
        """
        if workers > self.workers:
            raise ValueError(f"a split call of {workers} workers needs more than the {self.workers} there are")
        if self.flags[sync.ABORT]:
            self.flags[sync.ABORT] = 0
        self.flags[sync.GENERATION] = next(_GENERATIONS) << 32
        try:
            if kernel(*lead):
                self.hot_calls += 1
            elif decline and self._wakes(workers) and not self._slept_again(workers):
                self.declined_calls += 1
                self._declined_at = time.perf_counter()
                self.stand_by(kernel, lead, workers)
                return False
            else:
                self.cold_calls += 1
                self._hand_over(kernel, self._partner_jobs(lead, workers))
                kernel(*lead[:-1], sync.LEAD_COLD)
            self._declined_at = -np.inf
        except BaseException:
            self.flags[sync.ABORT] = 1
            sync.await_partners(self.ctl, workers)
            self._errors[1:workers] = [None] * (workers - 1)  # the call raises the lead's; none is left for the next
            raise
        for w in range(1, workers):
            error, self._errors[w] = self._errors[w], None
            if error is not None:
                raise error
        return True

    def _wakes(self, workers: int) -> bool:
        """Whether any of partners ``1 .. workers - 1`` is asleep in Python or on its way to a kernel's loop."""
        return any(self.ready(w) in (sync.IDLE, sync.WAKING) for w in range(1, workers))

    def _slept_again(self, workers: int) -> bool:
        """Whether any of partners ``1 .. workers - 1`` is asleep though the last call, declining them, put them on
        stand-by for this one (:data:`SLEPT_AGAIN_SECONDS`)."""
        return (time.perf_counter() - self._declined_at < SLEPT_AGAIN_SECONDS
                and any(self.ready(w) == sync.IDLE for w in range(1, workers)))

    def _partner_jobs(self, lead: tuple, workers: int) -> list[tuple]:
        """Partners ``1 .. workers - 1``'s jobs: ``lead`` without ``ctl``, ``box`` and the role, ``me`` set to each
        (the argument before :attr:`flags`)."""
        me = next(i for i, argument in enumerate(lead) if argument is self.flags) - 1
        return [(*lead[:me], w, *lead[me + 1:-3]) for w in range(1, workers)]

    def lead_tail(self, shared: tuple) -> tuple:
        """The end of worker 0's arguments after ``small``: ``me = 0``, :attr:`flags`, the ``shared`` buffers,
        ``ctl``, ``box`` and the lead's role."""
        return (0, self.flags, *shared, self.ctl, self.boxes, sync.LEAD)

    def ready(self, w: int) -> int:
        """Partner ``w``'s state word: the tag of the kernel it waits in, or a ``numrnn.runtime.sync`` state."""
        return int(self.ctl[w * sync.STRIDE])

    def _hand_over(self, kernel, jobs: list[tuple]) -> None:
        """The cold path: partners back to Python, then each its job through its queue (``jobs[w - 1]``: worker w's)."""
        sync.evict_partners(self.ctl, len(jobs) + 1)
        for w, job in enumerate(jobs, start=1):
            self._wake(w, kernel, job, sync.RUNNING, sync.SERVE)

    def stand_by(self, kernel, lead: tuple, workers: int) -> None:
        """Partners ``1 .. workers - 1`` asleep in Python: into ``kernel``'s job loop, to wait there for its next
        call's jobs (``lead`` as in :meth:`run`; their jobs are not run, only their arguments' types matter).

        A call that found its partners asleep used to hand them its jobs
        through their queues and wait while the host woke their CPUs: the
        second call of a burst (the first runs without them) took 2.8 ms
        instead of 0.07 (tiny64, bursts of five calls 20 ms apart). Woken
        here, they reach the loop while the caller runs without them.
        Partners that are awake are left as they are. The caller holds the
        split lock (``numrnn.runtime.kernels``), as for :meth:`run`.
        """
        for w, job in enumerate(self._partner_jobs(lead, workers), start=1):
            if self.ready(w) == sync.IDLE:
                self._wake(w, kernel, job, sync.WAKING, sync.STANDBY)

    def _wake(self, w: int, kernel, job: tuple, state: int, role: int) -> None:
        """Partner ``w``, idle in Python (nothing else writes its word), to ``state``, then ``kernel(*job)`` as
        ``role`` through its queue."""
        self.ctl[w * sync.STRIDE] = state
        try:
            self._queues[w].put((kernel, job, role))
        except BaseException:  # an interrupt: a partner left RUNNING or WAKING would be waited for forever
            sync.set_idle(self.ctl, w)
            raise

    def _serve(self, w: int) -> None:
        """Partner ``w``'s thread: each job it is handed, and the kernel's job loop after it."""
        while True:
            self._work(w, *self._queues[w].get())

    def _work(self, w: int, kernel, job: tuple, role: int) -> None:
        """Run ``job`` (as ``role``) and the job loop until it returns; a method of its own, so that no reference
        to the job's arrays outlives it while the thread sleeps."""
        try:
            kernel(*job, self.ctl, self.boxes, role)
        except BaseException as error:  # reported by the lead's run(); the thread lives on
            if role == sync.STANDBY and self.ready(w) == sync.WAKING:  # before any job: no call to fail
                log.warning("numrnn: a partner could not wait in %s's loop: %r", getattr(kernel, "__name__", kernel),
                            error)
                sync.set_idle(self.ctl, w)
                return
            self._errors[w] = error
            self.flags[sync.ABORT] = 1
            sync.set_idle(self.ctl, w)


_PARTNERS: Partners | None = None
_LOCK = threading.Lock()
#: Split calls' generations (``numrnn.runtime.sync.GENERATION``): one count for the process, which a child
#: made by ``fork`` continues, as its kernels keep their parent's exchange buffers.
_GENERATIONS = itertools.count(1)


def partners() -> Partners:
    """The process's partners, made on first use: enough for any split call (``max(cores(), 2)`` workers)."""
    global _PARTNERS
    if _PARTNERS is None:
        with _LOCK:
            if _PARTNERS is None:
                _PARTNERS = Partners(max(cores(), 2))
    return _PARTNERS


def _forget_in_child() -> None:
    global _PARTNERS, _LOCK
    _PARTNERS, _LOCK = None, threading.Lock()


def _send_home() -> None:
    """At exit: partners out of compiled code before the interpreter frees the arrays they spin on."""
    if _PARTNERS is not None:
        sync.evict_partners(_PARTNERS.ctl, _PARTNERS.workers)


if hasattr(os, "register_at_fork"):  # no fork on Windows
    os.register_at_fork(after_in_child=_forget_in_child)
atexit.register(_send_home)
