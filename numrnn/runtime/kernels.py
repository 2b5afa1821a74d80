"""Compile and run generated kernels: one compile per spec per process, a disk cache across processes."""

from __future__ import annotations

import contextlib
import logging
import operator
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cached_property, partial
from pathlib import Path
from typing import NamedTuple

import numpy as np

from codegen import StackSpec, generate_source
from codegen.cells import aligned_copy, pack, packed_names, split_packed
from codegen.cells.common import panel_width, panels_name, tiles_name, tiles_size
from codegen.spec import CellSpec
from codegen.targets.cpu import (
    SHARED_SUFFIX,
    condition_args,
    generate_shared,
    projections_packed_up_to,
    shared_module_name,
    wrong_panels_message,
)
from codegen.targets.cpu_dirsplit import WORKERS as DIRECTION_WORKERS
from numrnn.runtime import helper
from numrnn.runtime.cache import (
    cache_dir,
    drop_compiled,
    import_module,
    load_own_code_without_refresh,
    module_path,
    raised_by_numba_cache,
    write_if_changed,
)
from numrnn.runtime.schedule import (
    Scheduler,
    cores,
    packed_product_rows,
    pool,
    preload_cython_blas,
    single_threaded_blas,
    worker_rows,
)

log = logging.getLogger("numrnn")
if os.environ.get("NUMRNN_DEBUG") and not log.handlers:
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("numrnn: %(message)s"))
    log.addHandler(_handler)
    log.setLevel(logging.DEBUG)

_KERNELS: dict[StackSpec, Kernel] = {}
_LOCK = threading.Lock()
#: One split call at a time: the process has one set of partner threads (numrnn.runtime.partners).
#: Re-entrant: a call that holds it to choose the split (``_try_split``) runs the split kernel under it.
_SPLIT_LOCK = threading.RLock()
#: Calls of one row and up to this many steps skip the scheduler (streaming, one step per call).
STREAMING_MAX_STEPS = 4
#: Most ``T * B`` rows a call may have: BLAS takes 32-bit sizes (``numrnn.runtime.extern.gemm``).
MAX_BLAS_ROWS = 2**31 - 1
#: Weight slices kept per unit-split kernel (one entry per distinct set of packed weights).
_SLICE_CACHE_SIZE = 8
#: Call shapes whose shared buffers a split kernel keeps.
_SHARED_CACHE_SIZE = 8


class WorkspacePool:
    """Workspaces (``ws``, :class:`codegen.targets.cpu.Workspace`) of one kernel, kept between calls.

    A call borrows the largest free one, or a new one where none is large
    enough, and returns it after. Up to :data:`SMALL_WORKSPACE` elements a
    call takes a new array, which numpy's allocator hands out in well under a
    microsecond without the pool's lock (a batch worker's few rows; a short
    serial call uses its thread's workspace instead).
    """

    def __init__(self):
        self._free: list[np.ndarray] = []
        self._lock = threading.Lock()

    def borrow(self, size: int, dtype: np.dtype) -> Borrowed:
        """A context manager holding a workspace of at least ``size`` elements."""
        if size <= SMALL_WORKSPACE:
            return Borrowed(np.empty(size, dtype), None)
        with self._lock:
            best = max(range(len(self._free)), key=lambda i: self._free[i].size, default=None)
            if best is not None and self._free[best].size >= size:
                return Borrowed(self._free.pop(best), self)
        return Borrowed(np.empty(size, dtype), self)

    def give_back(self, ws: np.ndarray) -> None:
        """Keep ``ws`` for a later call, dropping the smallest beyond one per worker thread and the caller."""
        with self._lock:
            self._free.append(ws)
            if len(self._free) > cores() + 1:
                del self._free[min(range(len(self._free)), key=lambda i: self._free[i].size)]


#: Workspaces up to this many elements are allocated per call (128 KiB of float32: glibc's default
#: threshold for serving an allocation from its own mapping, which it returns to the OS on free).
SMALL_WORKSPACE = 32 * 1024


class Borrowed:
    """``with`` block of one workspace: yields the array, returns it to its pool (if any) on exit."""

    def __init__(self, ws: np.ndarray, owner: WorkspacePool | None):
        self.ws, self.owner = ws, owner

    def __enter__(self) -> np.ndarray:
        return self.ws

    def __exit__(self, *exc) -> None:
        if self.owner is not None:
            self.owner.give_back(self.ws)


@dataclass
class Kernel:
    """A generated, importable kernel for one spec.

    ``codegen_seconds``: time to generate and write the source;
    ``compile_seconds``: what the first call spent compiling the kernel (or
    loading it from numba's disk cache), ``None`` until then: not the call's
    own run (an unsplit kernel's includes a run on one row).
    """

    spec: StackSpec
    source: str
    path: str
    function: object
    codegen_seconds: float
    compile_seconds: float | None = None
    #: Unit-split kernels: the generated ``shared_buffers(T, T_out, B)`` (``None`` otherwise).
    shared_buffers: object = None
    #: Unsplit kernels: the generated ``workspace_size(T, T_out, B)`` (``None`` otherwise).
    workspace_size: object = None
    _first_call_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __call__(self, x: np.ndarray, condition, states: list[np.ndarray], weights: list[np.ndarray],
                 out: np.ndarray | None = None) -> np.ndarray:
        """Run on time-major ``x``; ``states`` are updated in place; returns ``(T, B, W)`` or ``(B, W)``.

        ``condition`` is the ``(T, B)`` bool mask, the ``(B,)`` int64 lengths,
        or ``None``, per the spec's masking. Inputs must already be validated,
        in the spec's dtype (the facades do that); the states C-contiguous.
        Large batches run split over the cores (:mod:`numrnn.runtime.schedule`).
        ``out``: the ``(T or 1, B, W)`` output buffer, allocated when not given.
        ``x`` and ``out`` may have any strides (a facade's batch-major arrays,
        transposed): the batch split copies its rows from and to them anyway,
        other schedules run on contiguous copies.
        """
        T, B, _ = x.shape
        if (B == 1 and T <= STREAMING_MAX_STEPS and self._stream_shapes is not None and x.flags.c_contiguous
                and (out is None or out.flags.c_contiguous)):
            # Fast path (streaming): no split, input projection too small for OpenBLAS to thread, and none
            # of the checks below can fail. LSTM(32), one step per call: the bare numba call takes 1.3 us
            # (0.8 of it numba's dispatch of the 11 arguments), and this path added 1.2 us to it before
            # it came first, with nothing but what it needs (1.0 us since; 0.8 with the shape unpacked at
            # once and the workspace read inline). Its product is BLAS's gemv (small = 0): the
            # packed product took 3.9-6.4 us per call against 3.6-6.0 (AVX2 Zen 3, minimums, four fresh
            # processes each); on an AVX-512 Zen 4, 1.28 against 1.33 us (bare calls, best of 7 x 100000).
            y = np.empty(self._stream_shapes[T], self._dtype) if out is None else out
            ws = getattr(self._thread_local, "ws", None)  # _thread_workspace, inlined
            if ws is None or ws.size < self._streaming_size:
                ws = self._thread_workspace(self._streaming_size)
            if self._has_condition:
                self.function(x, condition, *states, *weights, y, ws, 0)
            else:
                self.function(x, *states, *weights, y, ws, 0)
            return y if self._sequences else y[0]
        if T * B > MAX_BLAS_ROWS:
            raise ValueError(f"x: {T} steps of {B} rows are {T * B} rows of input projection; BLAS takes at most "
                             f"{MAX_BLAS_ROWS} (split the batch or the sequence)")
        if self.spec.unroll is not None and T != self.spec.unroll:
            raise ValueError(f"{self.spec.kernel_name()}: this kernel is statically unrolled for "
                             f"{self.spec.unroll} time steps; got {T}")
        y = np.empty((T if self._sequences else 1, B, self._width), dtype=self._dtype) if out is None else out
        if not (x.flags.c_contiguous and y.flags.c_contiguous) and not self._runs_batch_split(T, B):
            return self._call_contiguous(x, condition, states, weights, y)
        cond = [condition] if self._has_condition else []
        if self.spec.unit_split > 1 or self.spec.direction_split:
            with _SPLIT_LOCK:
                self._run_split(x, cond, states, weights, y)
        elif B == 1 and T <= STREAMING_MAX_STEPS and self.compile_seconds is not None:
            # A statically unrolled kernel's streaming call (the fast path above is for the dynamic loop).
            self.function(x, *cond, *states, *weights, y, self._thread_workspace(self._streaming_size), 0)
        else:
            schedule, workers, measured = self._scheduler.plan(T, B)
            if measured is None:
                self._run_scheduled(schedule, workers, x, cond, states, weights, y)
            else:
                start, first = time.perf_counter(), self.compile_seconds is None
                option, timed = measured.pick(start)
                if measured.wake is not None:
                    self._wake_partners(measured.wake, x, cond, states, weights, y)
                as_picked = self._run_scheduled(*option, x, cond, states, weights, y, decline=measured.declines)
                # A first call ran itself again through __call__ once compiled, and that call recorded its end:
                # this one's, compile included, would set the shape's last end after the actual one.
                if timed and not first:
                    measured.record(option, time.perf_counter() - start, counted=as_picked)
                elif not timed and not as_picked:  # a MeasuredChoice's untimed call that warmed nothing
                    measured.ran_otherwise(option)
        return y if self._sequences else y[0]

    def _runs_batch_split(self, T: int, B: int) -> bool:
        """Whether a call of ``T`` steps of ``B`` rows runs as the batch split and only so (its workers copy
        their rows of ``x`` and of the output to and from their own buffers, which take any strides)."""
        if self.compile_seconds is None or self.spec.unit_split > 1 or self.spec.direction_split:
            return False
        schedule, workers, measured = self._scheduler.plan(T, B)
        return schedule == "batch" and workers > 1 and measured is None

    def _call_contiguous(self, x, condition, states, weights, y) -> np.ndarray:
        """The call on C-contiguous copies of ``x`` and (unless it is) ``y``, the output copied into ``y``: for
        schedules whose numba functions take contiguous arrays only."""
        if y.flags.c_contiguous:
            return self(np.ascontiguousarray(x), condition, states, weights, out=y)
        contiguous = np.empty(y.shape, self._dtype)
        self(np.ascontiguousarray(x), condition, states, weights, out=contiguous)
        y[...] = contiguous
        return y if self._sequences else y[0]

    def call_batch_major(self, x, condition, states, weights) -> np.ndarray:
        """A sequence kernel's call whose output comes back ``(B, T, W)``: the batch split writes its rows
        there directly, other schedules copy it there (a facade's batch-major output, without a transposed
        copy of a whole output after the call)."""
        out = np.empty((x.shape[1], x.shape[0], self._width), self._dtype)
        self(x, condition, states, weights, out=out.transpose(1, 0, 2))
        return out

    @cached_property
    def state_sizes(self) -> tuple[int, ...]:
        """The width of each state array the kernel takes, cell after cell."""
        return tuple(size for cell in self.spec.cells for size in cell.state_sizes)

    def compiled_kernels(self) -> list[Kernel]:
        """This kernel and the split kernels its calls made, those that have compiled (or loaded from the cache):
        a call that runs split compiles the split kernel only."""
        return [kernel for kernel in (self, *self._split_kernels.values()) if kernel.compile_seconds is not None]

    def _run_scheduled(self, schedule: str, workers: int, x, cond, states, weights, y, decline: bool = False) -> bool:
        """Run the call as ``schedule`` on ``workers``; False if it ran otherwise or compiled (a busy split).

        ``decline``: a split call whose partners are asleep or still waking
        runs otherwise (a guarded schedule's, whose static option is serial
        and runs the calls after a pause anyway;
        :meth:`numrnn.runtime.partners.Partners.run`).
        """
        as_scheduled = True
        if schedule in ("units", "directions"):
            split = self._split_kernels.get((schedule, workers))
            if split is not None and split.compile_seconds is not None:
                if split._try_run_split(x, cond, states, weights, y, decline):
                    return True
            elif not _FORKED_MID_COMPILE and self._try_split(schedule, workers, x, cond, states, weights, y):
                return False  # it compiled (a child forked mid-compile cannot)
            # The split cannot compile here, another split call holds the partners, or they are asleep and the
            # call declined them: the batch rule instead.
            workers, as_scheduled = self._scheduler.batch_choice(x.shape[0], x.shape[1])[1], False
        if self.compile_seconds is None:
            self._first_call(x, cond, states, weights, y)
            return False
        if workers == 1:
            self._run_serial(x, cond, states, weights, y)
        else:
            self._run_batch_split(workers, x, cond, states, weights, y)
        return as_scheduled

    def __post_init__(self):
        self._sequences = self.spec.return_sequences
        self._width = self.spec.output_size
        self._dtype = np.dtype(self.spec.dtype)
        self._has_condition = bool(condition_args(self.spec))
        self._small = packed_product_rows()
        self._projection_rows = projections_packed_up_to(self.spec)
        self._scheduler = Scheduler(self.spec)
        self._split_kernels: dict[tuple[str, int], Kernel] = {}
        self._slices: dict[tuple[int, ...], tuple[list, list[list[np.ndarray]]]] = {}
        self._last_slices: tuple[list, list[list[np.ndarray]]] | None = None  # the entry of _slices used last
        self._workspaces = WorkspacePool()
        self._thread_local = threading.local()  # short calls' workspaces
        #: Split kernels, by call shape ``(T, T_out, B)``: what its calls pass the same (:meth:`_lead_tail`).
        self._shared: dict[tuple[int, int, int], _ShapeArguments] = {}
        self._streaming_size = (self.workspace_size(STREAMING_MAX_STEPS, STREAMING_MAX_STEPS, 1)
                                if self.workspace_size is not None else 0)
        names = [f"cell {k} {name}" for k, cell in enumerate(self.spec.cells) for name in packed_names(cell)]
        self._panel_weights = [(i, name) for i, name in enumerate(names) if name.endswith(panels_name(""))]
        self._tile_weights = [(i, names.index(name[:-len(tiles_name("wx"))] + "wx"), name)
                              for i, name in enumerate(names) if name.endswith(tiles_name("wx"))]
        self._panel_width = panel_width(self.spec.dtype)
        #: The output's shape of a one-row call of ``T`` (up to STREAMING_MAX_STEPS) steps, by ``T``: set once
        #: compiled, for unsplit kernels of the dynamic loop (a static one checks its T first), which then take
        #: the fast path.
        self._stream_shapes: tuple | None = None

    def _wake_partners(self, option: tuple[str, int], x, cond, states, weights, y) -> None:
        """Have sleeping partners wait in the loop of ``option``'s split kernel for its next call
        (:meth:`numrnn.runtime.partners.Partners.stand_by`; this call's arguments give them their types), if it
        is compiled, this call's shape has run split before, and no split call is running."""
        split = self._split_kernels.get(option)
        if split is None or split.compile_seconds is None or not _SPLIT_LOCK.acquire(False):
            return
        try:
            kept = split._shared.get((x.shape[0], y.shape[0], x.shape[1]))
            team = _partners()
            if kept is not None and kept.team is team:
                lead = (x, *cond, *states, *split._worker_weights(weights), y, split._small, *kept.tail)
                team.stand_by(split.function, lead, split.spec.unit_split)
        finally:
            _SPLIT_LOCK.release()

    def _try_split(self, schedule: str, workers: int, x, cond, states, weights, y) -> bool:
        """Run the call on the unit- or direction-split kernel, made and compiled on first use; False if another
        split call is running."""
        if not _SPLIT_LOCK.acquire(blocking=False):
            return False
        try:
            key = (schedule, workers)
            split = self._split_kernels.get(key)
            if split is None:  # building the split spec and hashing it cost 13-19 us a call
                changes = {"unit_split": workers} if schedule == "units" else {"direction_split": True}
                split = self._split_kernels[key] = get_kernel(replace(self.spec, **changes))
            split._run_split(x, cond, states, weights, y)  # not split(...): its checks were made here (3-4 us)
        finally:
            _SPLIT_LOCK.release()
        return True

    def _try_run_split(self, x, cond, states, weights, y, decline: bool = False) -> bool:
        """Run the call on this compiled split kernel; False if another split call is running, or if, with
        ``decline``, its partners were asleep or still waking (:meth:`numrnn.runtime.partners.Partners.run`).

        A split call's own path, for calls of a few tens of microseconds
        (tiny64 split: 32 us, of which Python took about 5): one lock, one
        lookup of the shape's arguments, no function between here and the
        partners but the weights' slices. Through ``_try_split`` and
        ``_run_split`` the same call took 0.5 us more (tiny64, calls of the
        two paths in turns, medians of 10,000 each).
        """
        if not _SPLIT_LOCK.acquire(False):  # positional: 0.1 us less than blocking=False
            return False
        try:
            T, B = x.shape[0], x.shape[1]
            kept = self._shared.get((T, y.shape[0], B))
            team = _partners()
            if kept is None or kept.team is not team or self.spec.unit_split < 2:
                self._run_split(x, cond, states, weights, y)
                return True
            lead = (x, *cond, *states, *self._worker_weights(weights), y, self._small, *kept.tail)
            return self._run_lead(team, lead, self.spec.unit_split, kept.calls_blas, decline)
        finally:
            _SPLIT_LOCK.release()

    def _run_split(self, x, cond, states, weights, y) -> None:
        """Worker 0 here, the others on the partner threads, meeting at each step's exchange or at barriers.

        The caller holds ``_SPLIT_LOCK``.

        Unit split (:mod:`codegen.targets.cpu_split`): every worker its slice
        of the weights, an exchange of ``h`` per step. Direction split
        (:mod:`codegen.targets.cpu_dirsplit`): two workers, all the weights,
        a barrier per block. The partners (:mod:`numrnn.runtime.partners`)
        wait for the next call in the kernel's job loop; a worker that fails
        sets the abort word, which releases every other worker's wait, so
        the call raises instead of hanging.
        """
        start = time.perf_counter() if self.compile_seconds is None else None
        T, B = x.shape[0], x.shape[1]
        if self.spec.unit_split > 1:
            n, weights = self.spec.unit_split, self._worker_weights(weights)
        else:
            self._check_panels(weights)
            n = DIRECTION_WORKERS
        team = _partners()
        lead = (x, *cond, *states, *weights, y, self._small, *self._lead_tail(T, y.shape[0], B, team))
        if start is not None:
            _check_can_compile()
            self._compile_for(lead)
            self.compile_seconds = time.perf_counter() - start
            log.debug("first call of %s: %.2f s to compile or load from the cache", self.spec.kernel_name(),
                      self.compile_seconds)
        self._run_lead(team, lead, n, self._calls_blas(T, B))

    def _run_lead(self, team, lead: tuple, workers: int, calls_blas: bool, decline: bool = False) -> bool:
        """``team.run`` of the call whose lead's arguments are ``lead`` (True if it ran); with single-threaded
        BLAS, entered before any worker starts, if the call calls BLAS: a partner's input projection on two
        OpenBLAS threads would spin against the workers' waits (latency256 took 8-10 ms instead of 1.9 in about
        one process of three when a pool worker could start before the block was entered)."""
        if calls_blas:
            with single_threaded_blas():
                return team.run(self.function, lead, workers, decline)
        return team.run(self.function, lead, workers, decline)

    def _check_panels(self, weights: list[np.ndarray]) -> None:
        """Raise unless every panel weight is as wide as this process packs them, and every tile copy is its
        kernel's size or empty (``emit_panel_checks``).

        The unsplit kernels check it themselves; a split kernel's workers get
        column slices of the panels, cut in Python, so the check is made here.
        """
        for index, name in self._panel_weights:
            if weights[index].shape[-1] != self._panel_width:
                raise ValueError(f"{wrong_panels_message(f'weights[{index}] ({name})', self._panel_width)}; "
                                 f"got {weights[index].shape[-1]} columns")
        for index, kernel, name in self._tile_weights:
            if weights[index].size not in (0, tiles_size(*weights[kernel].shape)):
                raise ValueError(f"weights[{index}] ({name}): not the tiles of weights[{kernel}] (pack the weights "
                                 "again with numrnn.runtime.pack_weights)")

    def _lead_tail(self, T: int, T_out: int, B: int, team) -> tuple:
        """The end of the lead's arguments (``team.lead_tail``) with the generated ``shared_buffers`` of a call's
        shape, both kept for later calls of that shape.

        Only one split call runs at a time (``_SPLIT_LOCK``) and every worker
        writes its part of a buffer before any reads it, so one set per shape
        serves every call. Up to :data:`_SHARED_CACHE_SIZE` shapes are kept
        (the buffers start on a cache line, which costs 2 us each to allocate),
        but of sets over :data:`SMALL_WORKSPACE` elements (a direction
        split's block outputs and workspaces on long inputs) only the last
        shape's, as a workspace pool keeps the largest: malloc maps such a
        set afresh and faults its pages in on every call (bidir_masked's
        direction split, 5.5 MiB: about 1 ms of 5.4 a call). A shape not kept
        drops the large set before its own set is made, so that two large
        sets are never held at once.
        """
        key = (T, T_out, B)
        kept = self._shared.get(key)
        if kept is not None and kept.team is team:  # a forked child's team is another
            return kept.tail
        if kept is None:
            for large in [k for k, entry in self._shared.items() if _elements(entry.buffers) > SMALL_WORKSPACE]:
                del self._shared[large]
        buffers = self.shared_buffers(T, T_out, B) if kept is None else kept.buffers
        tail = team.lead_tail(buffers)
        _keep(self._shared, key, _ShapeArguments(team, buffers, tail, self._calls_blas(T, B)), _SHARED_CACHE_SIZE)
        return tail

    def _worker_weights(self, weights: list[np.ndarray]) -> list[np.ndarray]:
        """Each packed weight with every worker's column slice stacked on a first axis, cut once per set of weights.

        The unit-split kernel takes ``[me]`` of each, so every worker's job
        has the same arrays and the lead can post the others' jobs itself.
        Each slice starts on an :data:`~codegen.cells.ALIGNMENT` boundary
        where its size is a multiple of it (the panels always are). The
        panels' width is checked once, when they are cut.
        """
        last = self._last_slices
        if last is not None and len(weights) == len(last[0]) and all(map(operator.is_, weights, last[0])):
            return last[1]  # 0.2 us, against 0.4 for the lookup below
        key = tuple(map(id, weights))
        hit = self._slices.get(key)
        if hit is not None:
            self._last_slices = hit
            return hit[1]
        self._check_panels(weights)
        n, parts, pos = self.spec.unit_split, [[] for _ in range(self.spec.unit_split)], 0
        for cell in self.spec.cells:
            count = len(packed_names(cell))
            for me in range(n):
                parts[me].extend(split_packed(cell, weights[pos:pos + count], me, n, _tiles_for))
            pos += count
        stacked = [aligned_copy(np.stack(slices)) for slices in zip(*parts)]
        self._last_slices = (list(weights), stacked)
        _keep(self._slices, key, self._last_slices, _SLICE_CACHE_SIZE)  # holding the arrays keeps ids unique
        return stacked

    def _first_call(self, x, cond, states, weights, y) -> None:
        """Compile (or load from the disk cache) on a one-row copy, timed; then run the call as usual.

        Compiling on one row rather than the whole batch keeps the first call's
        work on the normal schedule (split over the cores): measured on
        seed000 (B=128), the first result in a process with a warm disk cache
        took 0.61 s when the compiling call also ran all 128 rows unsplit.
        One thread compiles; concurrent first calls wait for it.
        """
        _check_can_compile()
        with self._first_call_lock:
            if self.compile_seconds is None:
                start = time.perf_counter()
                row = [np.ascontiguousarray(c[:, :1] if c.ndim == 2 else c[:1]) for c in cond]
                with single_threaded_blas(), self._workspace(x.shape[0], y.shape[0], 1) as ws:
                    args = (np.ascontiguousarray(x[:, :1]), *row, *[s[:1].copy() for s in states], *weights,
                            np.empty((y.shape[0], 1, y.shape[2]), dtype=y.dtype), ws, 0)
                    self._compile_for(args)
                    self.function(*args)
                self.compile_seconds = time.perf_counter() - start
                if self.spec.unroll is None:
                    self._stream_shapes = tuple((T if self._sequences else 1, 1, self._width)
                                                for T in range(STREAMING_MAX_STEPS + 1))
                log.debug("first call of %s took %.2f s (compile or cache load)", self.spec.kernel_name(),
                          self.compile_seconds)
        # Through __call__ again: a measured shape (MeasuredChoice) counts this run as its next call.
        self(x, cond[0] if cond else None, states, weights, out=y)

    def _compile_for(self, args: tuple) -> None:
        """Compile (or load) the kernel for ``args``' types, then link the shared entries that a helper process
        compiled meanwhile (``numrnn.runtime.extern.finish_links``), so that a failure raises here, not in a run.
        A cache that fails to load is removed (the kernel's or the shared module's) and compiled again."""
        from numba import typeof

        from numrnn.runtime.extern import finish_links

        signature = tuple(typeof(a) for a in args)
        _recovering_cache(self.path, lambda: (_load_cached_callees(self.function), self.function.compile(signature)))
        _recovering_cache(_shared_path(), lambda: finish_links(self.spec.dtype))

    def _run_batch_split(self, workers: int, x, cond, states, weights, y) -> None:
        """Each worker's rows on the pool; rows the pool refuses (the interpreter is exiting) on this thread.

        A refusal can come after the pool queued the rows: from Python 3.12, a
        thread that cannot start at interpreter exit raises out of ``submit``
        while an existing pool thread may still take the queued job. Each
        job's rows therefore run once, on whichever thread claims them first,
        since running them twice would advance their states twice.
        """
        futures, refused = [], []
        for rows in worker_rows(x.shape[1], workers, _steps_per_row(cond, x.shape[0])):
            job = _RunOnce(partial(self._run_rows, rows, x, cond, states, weights, y))
            try:
                futures.append(pool().submit(job))
            except RuntimeError:  # "cannot schedule new futures after (interpreter) shutdown": atexit, daemon threads
                job()
                refused.append(job)
        for future in futures:
            future.result()
        for job in refused:
            job.wait()

    def _run_rows(self, rows: slice | np.ndarray, x, cond, states, weights, y) -> None:
        """One worker of the batch split: ``rows`` (a range, or row indices) as their own contiguous call.

        The rows' input and output are carved from the worker's workspace,
        after the kernel's part of it: as new arrays, malloc mapped them
        afresh and faulted their pages in on every call (seed000: 6 MiB of
        output a worker).
        """
        T, T_out, inputs, width = x.shape[0], y.shape[0], x.shape[2], y.shape[2]
        n = rows.stop - rows.start if isinstance(rows, slice) else len(rows)
        cs = [np.ascontiguousarray(c[:, rows] if c.ndim == 2 else c[rows]) for c in cond]
        ss = [s[rows] for s in states]  # a range's are views of C-contiguous states, updated in place
        size = self.workspace_size(T, T_out, n)
        ys_at = size + T * n * inputs
        with single_threaded_blas(), self._workspaces.borrow(ys_at + T_out * n * width, self._dtype) as ws:
            xs, ys = ws[size:ys_at].reshape(T, n, inputs), ws[ys_at:ys_at + T_out * n * width].reshape(T_out, n, width)
            if isinstance(rows, slice):
                xs[...] = x[:, rows]
            else:
                np.take(x, rows, axis=1, out=xs, mode="clip")  # "raise" would copy through a buffer
            self.function(xs, *cs, *ss, *weights, ys, ws, self._small)
            y[:, rows] = ys
        if not isinstance(rows, slice):  # indexed rows' states are copies
            for s, part in zip(states, ss):
                s[rows] = part

    def _thread_workspace(self, size: int) -> np.ndarray:
        """This thread's workspace for short calls, kept and grown to the largest ``size`` asked.

        A call runs on one thread, so a thread's workspace is never in two
        calls at once. A pool's borrow cost 1.9 us and a new array and its
        size 0.3-1 us, of a 3-5 us streaming call.
        """
        ws = getattr(self._thread_local, "ws", None)
        if ws is None or ws.size < size:
            ws = self._thread_local.ws = np.empty(size, self._dtype)
        return ws

    def _run_serial(self, x, cond, states, weights, y) -> None:
        """The whole call on this thread, with single-threaded BLAS when it calls BLAS at all.

        Single-threaded even for the one input projection per layer: when the
        other core is busy, a 2-thread OpenBLAS call waits for a time slice
        (measured: LSTM(64), B=1, T=64 took 15.7 ms instead of 0.1 ms on the
        shared machine). A short call (every product the packed one, the
        workspace small) skips that and the pool: tiny64 spent 3.3 us setting
        and restoring BLAS's threads and 1.9 us borrowing a workspace.
        """
        T, B = x.shape[0], x.shape[1]
        size = self.workspace_size(T, y.shape[0], B)
        if not self._calls_blas(T, B) and size <= SMALL_WORKSPACE:
            self.function(x, *cond, *states, *weights, y, self._thread_workspace(size), self._small)
            return
        with single_threaded_blas(), self._workspaces.borrow(size, self._dtype) as ws:
            self.function(x, *cond, *states, *weights, y, ws, self._small)

    def _calls_blas(self, T: int, rows: int) -> bool:
        """Whether a call (or a worker's share) of ``rows`` rows calls BLAS: not if every product is the packed one.

        Such calls skip :class:`single_threaded_blas` (5 us to enter and leave).
        """
        return not (0 < rows <= self._small and T * rows <= self._projection_rows)

    def _workspace(self, T: int, T_out: int, rows: int) -> Borrowed:
        """A workspace for a call on ``rows`` rows, from this kernel's pool."""
        return self._workspaces.borrow(self.workspace_size(T, T_out, rows), self._dtype)


def _steps_per_row(cond: list[np.ndarray], steps: int) -> np.ndarray | None:
    """How many of ``steps`` each row computes: its length, or its mask's count; ``None`` without either."""
    if not cond:
        return None
    condition = cond[0]
    return condition.sum(axis=0) if condition.ndim == 2 else np.clip(condition, 0, steps)


class _ShapeArguments(NamedTuple):
    """What a split kernel's calls of one shape pass the same: the partners, the generated ``shared_buffers``,
    the lead's arguments' tail (``Partners.lead_tail``), and whether the call calls BLAS (``Kernel._calls_blas``)."""

    team: object
    buffers: tuple[np.ndarray, ...]
    tail: tuple
    calls_blas: bool


def _elements(buffers: tuple[np.ndarray, ...]) -> int:
    """Elements of a set of shared buffers."""
    return sum(b.size for b in buffers)


def _keep(cache: dict, key, value, size: int) -> None:
    """``cache[key] = value``, first dropping the oldest entry when ``cache`` already holds ``size``."""
    if len(cache) >= size:
        cache.pop(next(iter(cache)))
    cache[key] = value


class _RunOnce:
    """A call that runs once, on the first thread that calls it; :meth:`wait` waits for it and re-raises its error."""

    def __init__(self, run):
        self._run = run
        self._claim = threading.Lock()
        self._finished = threading.Event()
        self._error: BaseException | None = None

    def __call__(self) -> None:
        if not self._claim.acquire(blocking=False):
            return
        try:
            self._run()
        except BaseException as error:
            self._error = error
            raise
        finally:
            self._finished.set()

    def wait(self) -> None:
        """Once the call has run (on any thread): its error, if it raised one."""
        self._finished.wait()
        if self._error is not None:
            raise self._error


def _partners():
    """The process's partner threads (:func:`numrnn.runtime.partners.partners`), whose module is imported on
    first use: it imports numba, which ``import numrnn`` does not need."""
    global _partners_of_process
    if _partners_of_process is None:
        from numrnn.runtime.partners import partners
        _partners_of_process = partners
    return _partners_of_process()


_partners_of_process = None


def kernel_for(key: tuple, make_spec: Callable[[], StackSpec]) -> Kernel:
    """``get_kernel(make_spec())``, looked up by ``key`` first: a facade's call that runs the kernel it ran before.

    ``key`` is a plain tuple of everything the spec is made from, and a
    facade tag, so that no two facades' keys for different specs compare
    equal. Making a spec (its checks) and hashing it had taken a quarter to
    a half of a one-step call through the facades (LSTM(32), one row: 18-34
    us a step; the kernel's own call 2.1). ``make_spec`` runs on a miss only:
    the facade's checks that the key covers can go there. Past
    ``MAX_KERNEL_KEYS`` keys all are dropped (the kernels stay in
    :func:`get_kernel`'s memo).
    """
    kernel = _KERNEL_OF_KEY.get(key)
    if kernel is None:
        kernel = get_kernel(make_spec())
        if len(_KERNEL_OF_KEY) >= MAX_KERNEL_KEYS:
            _KERNEL_OF_KEY.clear()
        _KERNEL_OF_KEY[key] = kernel
    return kernel


_KERNEL_OF_KEY: dict[tuple, Kernel] = {}
MAX_KERNEL_KEYS = 1024


def get_kernel(spec: StackSpec) -> Kernel:
    """The kernel for ``spec``, generated and imported once per process (memoized)."""
    kernel = _KERNELS.get(spec)
    if kernel is not None:
        return kernel
    _check_can_compile()
    with _LOCK:
        kernel = _KERNELS.get(spec)
        if kernel is None:
            kernel = _build(spec)
            _KERNELS[spec] = kernel
    return kernel


def _shared_path() -> Path:
    """Where the shared module's source lives (its compiled code is in ``__pycache__`` beside it)."""
    return cache_dir() / f"{shared_module_name()}.py"


def _import_shared() -> None:
    """Import the module of functions every kernel shares (``codegen.targets.cpu.generate_shared``), once."""
    name = shared_module_name()
    if name not in sys.modules:
        preload_cython_blas()
        load_own_code_without_refresh()
        path = _shared_path()
        write_if_changed(path, generate_shared())
        _recovering_cache(path, lambda: import_module(path, name))  # it loads its C functions when imported


def _start_helper_early(dtype: str) -> None:
    """Start the helper that compiles the shared entries of ``dtype`` (``numrnn.runtime.helper``) before this
    process imports numba, where the disk cache shows none of them: 0.3 s sooner than the kernel module's
    link call, which would start it otherwise (and stops it if the entries turn out to be cached)."""
    name = shared_module_name()
    # With NUMBA_CACHE_DIR set, numba's index files are not where this looks for them.
    if name in sys.modules or not helper.allowed() or os.environ.get("NUMBA_CACHE_DIR"):
        return
    path, suffix = _shared_path(), SHARED_SUFFIX[dtype]
    if any((path.parent / "__pycache__").glob(f"{name}.*{suffix}_c-*.nbi")):
        return
    write_if_changed(path, generate_shared())  # before the helper reads it: a later write would change its stamp
    with contextlib.suppress(OSError):  # the link call tries again, and compiles here if it cannot
        helper.start(f"{name}.link{suffix}")


def compile_shared(link_function: str) -> None:
    """Run the shared module's ``link_function`` (qualified name) compiling every entry here: what the helper
    process of ``numrnn.runtime.extern.link_group`` does, filling numba's disk cache for its parent."""
    module_name, function = link_function.rsplit(".", 1)
    if module_name != shared_module_name():
        sys.exit(f"numrnn helper: asked for {module_name}, but this numrnn generates {shared_module_name()}")
    from numrnn.runtime.extern import compile_here

    compile_here()
    _import_shared()
    getattr(sys.modules[module_name], function)()


def _load_cached_callees(kernel) -> None:
    """Load the disk-cached code of the functions ``kernel``'s module compiled beside it, before ``kernel``'s own.

    A kernel's cached machine code holds its own copy of each function of
    its module that it calls (a layer's loop, a static unroll's step),
    optimized inside the kernel; numba compiles each callee on its own
    first, and the kernel's copy is a weak symbol, so the process that
    compiled them runs the callee's own copy. Under fast math the two
    copies may round differently: a process that loaded the kernel alone ran
    its inner copy, and a split float32 LSTM(132) (lengths-masked, one row)
    differed there from the process that compiled it in 53 of 924 outputs,
    by 6e-8. With the callees loaded first, it computes the same bits. Only
    signatures that numba would load (this code, this machine) are loaded.
    """
    from numba.core.registry import CPUDispatcher

    for function in list(kernel.py_func.__globals__.values()):  # the kernel module's namespace
        if (not isinstance(function, CPUDispatcher) or function is kernel
                or function.py_func.__module__ != kernel.__module__):
            continue
        cache_file = getattr(function._cache, "_cache_file", None)  # a NullCache has none
        if cache_file is None:
            continue
        codegen = function.targetctx.codegen()
        for key in cache_file._load_index():
            signature = key[0]
            if signature not in function.overloads and key == function._cache._index_key(signature, codegen):
                function.compile(signature)


def _recovering_cache(path, load):
    """``load()``, which may load machine code from numba's disk cache; if that cache fails to load, once
    more after removing the cached code of the module at ``path``, so that numba compiles it again."""
    try:
        return load()
    except Exception as error:
        if not raised_by_numba_cache(error) or not drop_compiled(path):
            raise
        log.warning("numba could not load the compiled code of %s from its cache (%s: %s); removed it, "
                    "compiling again", path, type(error).__name__, error)
    return load()


def _build(spec: StackSpec) -> Kernel:
    start = time.perf_counter()
    _start_helper_early(spec.dtype)
    _import_shared()
    source = generate_source(spec)
    path = module_path(spec)
    written = write_if_changed(path, source)
    # A float64 kernel module links the shared module's float64 C functions when imported.
    module = _recovering_cache(_shared_path(), lambda: import_module(path, f"numrnn_generated_{spec.cache_key()}"))
    elapsed = time.perf_counter() - start
    log.debug("kernel cache miss for %s: source %s %s (%.3f s)", spec.kernel_name(),
              "written to" if written else "reused from", path, elapsed)
    return Kernel(spec, source, str(path), getattr(module, spec.kernel_name()), elapsed,
                  shared_buffers=getattr(module, "shared_buffers", None),
                  workspace_size=getattr(module, "workspace_size", None))


def pack_weights(spec: StackSpec, logical: list[dict]) -> list[np.ndarray]:
    """Logical weights of every cell (``spec.cells`` order) -> the kernel's weight arguments."""
    return [array for cell, weights in zip(spec.cells, logical) for array in pack_cell(cell, weights, spec.dtype)]


def pack_cell(cell: CellSpec, logical: dict, dtype: str) -> list[np.ndarray]:
    """One cell's logical weights -> its kernel arguments (``codegen.cells.pack``), with this process's tiles
    of the input kernel where it projects on AMX (``numrnn.runtime.amx.tiles_for``)."""
    return pack(cell, logical, dtype, _tiles_for)


def _tiles_for(matrix: np.ndarray, wanted: bool | None = None) -> np.ndarray:
    # numrnn.runtime.amx imports numba, which `import numrnn` leaves to the first kernel (150-180 ms).
    from numrnn.runtime.amx import tiles_for

    return tiles_for(matrix, wanted)


#: Set in a child forked while a thread of its parent compiled: numba's compiler lock (or ours) stays held there.
_FORKED_MID_COMPILE = False


def _check_can_compile() -> None:
    """A clear error instead of a wait on a lock no thread of this process will release."""
    if _FORKED_MID_COMPILE:
        raise RuntimeError("numrnn: this process was forked while another thread of its parent was compiling a "
                           "kernel, so it cannot compile one (numba's compiler lock stays held in the child). "
                           "Kernels the parent had compiled still run; fork before other threads compile, or start "
                           "processes with multiprocessing's 'spawn' or 'forkserver' method.")


def _forget_in_child() -> None:
    """After ``fork``: a split lock of no live thread is replaced; a compile cut short by the fork is noted."""
    global _SPLIT_LOCK, _FORKED_MID_COMPILE
    _SPLIT_LOCK = threading.RLock()
    # numba's global compiler lock is an RLock (its ``_lock``, not public): held here only if another thread held it.
    numba_lock = getattr(getattr(sys.modules.get("numba.core.compiler_lock"), "global_compiler_lock", None),
                         "_lock", None)
    compiling = numba_lock is not None and not numba_lock.acquire(blocking=False)
    if numba_lock is not None and not compiling:
        numba_lock.release()
    extern = sys.modules.get("numrnn.runtime.extern")  # links the shared entries under its lock
    linking = (extern is not None and extern._LOCK.locked()) or helper._LOCK.locked()
    if compiling or linking or _LOCK.locked() or any(k._first_call_lock.locked() for k in list(_KERNELS.values())):
        _FORKED_MID_COMPILE = True


if hasattr(os, "register_at_fork"):  # no fork on Windows
    os.register_at_fork(after_in_child=_forget_in_child)


def clear_memory_cache() -> None:
    """Forget the in-process kernels and the workspaces they keep (the disk cache stays)."""
    with _LOCK:
        _KERNELS.clear()
        _KERNEL_OF_KEY.clear()
