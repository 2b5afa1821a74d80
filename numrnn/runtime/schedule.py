"""How one kernel call uses the cores, chosen from the spec and the input shape (timed calls at the unit split's edge).

Batch rows are independent for the whole sequence and every layer, so a call
with ``B`` rows can run as ``n`` calls of the same compiled kernel on ``B / n``
rows each, one per core, with no synchronization inside the time loop (no
per-step thread launch, no barrier). Each worker runs single-threaded BLAS.

Measured on the 2-core benchmark machine, seed000 (3xGRU(120), B128, T196):
letting OpenBLAS thread each per-step GEMM (128x120x360) costs a fork/join per
step; when the other core is busy that turned 0.4 s into 2.9 s. Two batch
halves with single-threaded BLAS keep both cores busy for the whole call.
Unsplit calls also run single-threaded BLAS (``Kernel._run_serial``), except
short ones that make no BLAS call at all.

Policy (:class:`Scheduler`):

- ``n = min(cores, B)`` workers, rows split as evenly as possible, in row-steps
  where a mask or lengths end rows early (:func:`worker_rows`);
- as many workers as get :data:`MIN_FLOPS_PER_WORKER` each (the pool's
  hand-off costs 150-200 us a call), and no split (one call in the calling
  thread) when that is one or ``B == 1``; ``NUMRNN_SCHEDULE=batch`` splits
  whatever the work;
- ``NUMRNN_NUM_THREADS`` caps ``cores`` (``1`` disables the split; a unit or direction split forced
  with ``NUMRNN_SCHEDULE`` still runs two workers).

Inside each worker the generated code picks the per-step recurrent product by
rows (the kernel's ``small`` argument): up to :func:`packed_product_rows`
rows, the packed product over the recurrent weights as
:func:`codegen.cells.to_panels` packed them once (one row too, but for the
streaming fast path's gemv); more rows, one BLAS GEMM per step.

Small batches split the hidden units instead (``unit_split``,
:mod:`codegen.targets.cpu_split`): every worker computes its slice of every
layer's units and the workers exchange ``h`` after each step, through stamped
cache lines that each worker spins on (:mod:`numrnn.runtime.sync`; a waiter
yields its time slice after a short spin, so a descheduled partner on a busy
machine is not starved). The calling thread
runs worker 0; the others run on partner threads that wait for the next call
inside the kernel (:mod:`numrnn.runtime.partners`), not on the pool. Policy
(``choose``):

- the unit split when the call has at least :data:`UNIT_SPLIT_MIN_FLOPS`,
  the spec allows it (plain dynamic loop), every layer's units (and LSTM
  projection) divide by the number of cores, and
  the batch is either latency-sized (``B <=`` :data:`UNIT_SPLIT_MAX_ROWS`,
  some layer's recurrent matrix at least :data:`UNIT_SPLIT_MIN_WEIGHT_BYTES`)
  or GEMM-sized: every batch worker would get more rows than the packed
  product takes (so it would run a BLAS GEMM per step anyway), ``B <=``
  :data:`UNIT_SPLIT_MAX_GEMM_ROWS` and a recurrent matrix of at least
  :data:`UNIT_SPLIT_MIN_GEMM_WEIGHT_BYTES` (no GRU that resets before its
  product nor LSTM projection: they exchange twice a step); or a small
  batch (up to 64 rows, a recurrent matrix of at least
  :data:`SMALL_BATCH_MIN_WEIGHT_BYTES`) of a call of up to
  :data:`SMALL_BATCH_MAX_FLOPS` by its rows (any size up to 4 rows, 600
  MFLOP up to 32, 100 MFLOP up to 64; with a GRU that resets before its
  product, :data:`SMALL_BATCH_RESET_BEFORE_MAX_FLOPS`), where the batch
  split's hand-off costs more than the unit split's exchanges (on two
  workers, as measured, and rows the packed product takes); these and the
  latency-sized split
  only while their calls come close together or are long
  (:class:`CloseCallsChoice`);
  one split call runs at a time (a concurrent one falls back, so the
  partners can never wait on each other);
- one- or two-row float32 calls that the unit split could run, short of
  those thresholds but with a recurrent matrix of at least
  :data:`MEASURED_MIN_WEIGHT_BYTES` and :data:`MEASURED_MIN_FLOPS` a call,
  are timed both ways (:class:`MeasuredChoice`): whether the split pays there
  depends on the machine and, on a virtual one, on where the host runs its
  CPUs at the time; a call after a pause runs the static rule's option
  (unless the calls are long), as under :class:`CloseCallsChoice`. Only
  calls whose products are all packed ones (up to
  ``PACKED_PROJECTION_MAX_ROWS`` rows of input projection) with whole
  vectors of units per worker, on which both schedules give the same bits;
- otherwise the batch split above.

Why those limits (measured on the 2-core benchmark machine, 512 KiB L2 per
core, medians of interleaved calls): at one row a step is a matrix-vector
product bound by reading the recurrent matrix; LSTM(256)'s 1 MiB does not
fit one core's L2, and split in two it (almost) does: latency256 (B1 T100)
went from 5.1 to 4.1 ms (best calls 4.8 -> 2.8 ms). LSTM(64) (64 KiB, already
cache-resident) got slower split, 0.25 -> 0.41 ms: the per-step barrier and
the pool hand-off cost more than the halved product; with the partners waiting
in the kernel (no hand-off) still 131-147 against 91-97 us a call (tiny64, B1
T50, separate processes), and 89-92 against 65-84 us interleaved in one
process; only at T=200 did the split win (293 against 323 us). At B=8 (bidir_masked)
the batch split was faster (34 vs 49 ms) since it needs no barrier.
With the partners waiting in the kernel, smaller matrices split too (one row,
T=100, D=H, units / serial, interleaved in one process, three runs each):
LSTM(64) 64 KiB 0.87-1.02, LSTM(96) 144 KiB 0.67-0.76, LSTM(112) 0.68-0.82,
GRU(128) 0.69-0.84, LSTM(128) 0.65-0.79; and short calls lose what the split
adds per call (about 20 us: the jobs' hand-off, a second dispatch): LSTM(96)
T20 (2.9 MFLOP) 1.18-1.19, LSTM(128) T15 (3.9 MFLOP) 0.98-1.07, LSTM(96) T40
(5.9 MFLOP) 0.91-0.93, LSTM(256) T5 (5.2 MFLOP) 0.76-0.97. Once a split call
skipped the second pass through ``Kernel.__call__`` and kept its shared
buffers (about 10 us added per call, LSTM(64) B1 T5: 21-32 against 14-17 us
serial, best of nine 3000-call repeats), shorter calls paid: LSTM(128) T10
(2.6 MFLOP) 0.88-0.94, LSTM(96) T20 (2.9 MFLOP) 0.88-0.92, LSTM(128) T15
(3.9 MFLOP) 0.71-0.76, and LSTM(128) T8 (2.1 MFLOP) 1.06 still lost; the
direction split (2xBiLSTM(H) B1, lengths T/2..T, directions / serial):
H=64 T8 (2.6 MFLOP) 0.85, T12 (3.9 MFLOP) 0.82, H=32 T30 (2.9 MFLOP)
0.66-1.10 over three runs. tiny64 (LSTM(64) B1 T50, 2.5 MFLOP) still
lost (1.00-1.24), which its 64 KiB matrix rules out.

At GEMM-sized batches a batch worker reads the whole recurrent matrix every
step for half the rows; a unit worker reads half the matrix for all of them,
so OpenBLAS packs half as many weight bytes per FLOP. Measured (T=50, D=H,
unit-split time / batch-split time, medians; AVX2 Zen 3, OpenBLAS Haswell
kernels): B=32 0.83-0.85 and B=64 0.83-0.89 for LSTM(256), GRU(256),
LSTM(384), GRU(512) and LSTM(512); B=128 0.83-1.10 (mixed: no split of the
units there); B=16 1.19-1.43 (the unit worker's 16-row GEMM against the batch
workers' 8-row hand loops); B=4 and 8 0.91-1.31; B=18-28 (each batch worker
past the hand loop) 0.51-0.77. throughput512 (2xLSTM(512) B64 T100 D512):
560 -> 432 ms.
Those figures predate the packed product. With it, every batch worker up to
:data:`PACKED_PRODUCT_MAX_ROWS` rows runs the packed product, so the
GEMM-sized unit split only remains where BLAS keeps those rows
(:func:`packed_product_rows`). Alternating both schedules in one process, packed
products on, medians: throughput512 batch 379 / units 411 ms, seed002 26.8 /
34.3 ms, seed000 155 / 162 ms.

Those batch-split figures predate the partners (the unit split then
handed its jobs over as the batch split still does). Measured again with
them, on the AVX-512 Zen 4 guest (LSTM and GRU of 16-256 units on as many
inputs, B 3-32, T 10-300, the three schedules by turns in one process,
medians): the batch split's hand-off cost 150-200 us a call, so that it lost
to one thread up to about 40 MFLOP a call (LSTM(64) B4 T20: serial 62,
batch 223, units 41 us), and the unit split beat both up to a few hundred
MFLOP a call (LSTM(128) B8 T100: serial 2149, batch 1365, units 1218 us;
LSTM(256) B16 T20: 3523 / 2143 / 1837 us); hence
:data:`SMALL_BATCH_MAX_FLOPS` and :data:`MIN_FLOPS_PER_WORKER`.

Bidirectional stacks split the directions instead (``direction_split``,
:mod:`codegen.targets.cpu_dirsplit`; at first up to four rows, and how
many now is said at the end): one worker per direction over all rows, a
barrier per block, not per step. It comes before
the unit split. Measured (2xBiLSTM(H) T100 D64, lengths 50-100, medians,
serial or batch / units / directions): H=64 B1 1.07 / 0.88 / 0.72 ms; H=128
B1 2.87 / 2.03 / 2.12 ms, B2 3.93 / 3.86 / 3.43 ms; H=256 B1 11.8 / 7.4 /
7.1 ms. At B=4 and 8 all three were within 5 % (with the row-pair loop the
packed product replaced, a worker's 8-row product cost what two 4-row ones
do: the rows share weight loads two at a time); at B=16 the batch split won
(22.8 against 28.6 ms), at B=32 the unit split (40.5 against 53.5). With
the packed product's 4-row blocks and the masked projection over live rows
only (CODEGEN_VERSION 26), directions / batch, T100, alternating in one
process, medians: B=3 H=128 0.69; B=4 H=128 0.70-0.93 (lengths), 0.78 (no
mask), H=64 0.86, H=256 0.80; B=5 H=128 1.11; B=6 1.02; B=8 H=128 0.96-1.15
over five runs (bidir_masked among them: no steady winner), H=64 0.86, H=32
0.63, H=256 0.87; B=16 1.12. A batch worker of one or two rows runs the
packed product's slowest shapes; from five rows its two 4-row blocks share
the panels as the direction worker's do.

Those direction-split figures paid a page fault per page of each worker's
projection buffers, new arrays on every call (1.6 MiB a worker at B8; see
``codegen.targets.cpu_dirsplit.shared_buffers``). With them carved from a kept
workspace, and the batch split's rows dealt by length (:func:`worker_rows`),
the direction split won at every size measured on two cores, AVX-512 Zen 4,
directions / batch, T100 D64, lengths 50-100, alternating in one process,
medians: H=64 B4 0.69, B6 0.79, B8 0.80, B16 0.87, B32 0.93; H=128 B3 0.68,
B5 0.74, B6 0.87, B8 0.90-0.92 (bidir_masked: 4.0 against 4.4 ms), B12
0.90, B16 0.94, B24 0.95, B32 0.98, B64 0.98, B128 0.98; H=256 B4 0.83, B8
0.94, B16 0.97, B32 0.98; without masking, H=128 B8 0.95, B32 0.97. Each
direction worker's per-step product covers every row, which shares each
weight it loads among twice the rows of a batch worker's. So with two
workers it runs every batch up to the packed product's rows
(:func:`packed_product_rows`, beyond which the per-step product is a BLAS
GEMM: not measured), where both directions cost about the same
(:func:`direction_imbalance`: TF1's ``bidirectional_dynamic_rnn`` may give
them different cells); otherwise, and with more workers than directions,
only up to :data:`DIRECTION_SPLIT_MAX_ROWS` rows, as the batch split then
takes more cores or balances the work better.

``NUMRNN_SCHEDULE`` forces ``serial`` (one thread), ``batch``, ``units`` or
``directions``; forcing a split on a spec that cannot use it raises a
``ValueError``.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import importlib.abc
import importlib.machinery
import importlib.util
import math
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from codegen import StackSpec
from codegen.cells import emitter_for
from codegen.cells.common import recurrent_bytes, vector_bytes, vector_lanes
from codegen.targets.cpu import PACKED_PROJECTION_MAX_ROWS, layers_of
from codegen.targets.cpu_dirsplit import WORKERS as DIRECTION_WORKERS
from numrnn.runtime import cpus

#: Below this many FLOPs per worker the batch split costs more than it saves: on the AVX-512 Zen 4 guest
#: it took 150-200 us a call more than half the serial time. Its pool wakes a sleeping thread per job and
#: then the caller (LSTM(64) B4 T20, one call of 2-row jobs: the first job started 39 us after the call,
#: the second 58, and the call returned 24 us after they ended; a pool round trip alone: 60 us), and its
#: jobs ran slower than half the serial call (44 and 70 us, against 61 us serial for both). Serial /
#: batch, T20-T100, medians in one process: 26 MFLOP a call (LSTM(64) B8 T50) 324 / 495 us, 20 (GRU(32) B16
#: T100) 280 / 297, 42 (LSTM(128) B4 T20) 213 / 276; 39 (GRU(64) B16 T50) 475 / 402, 52 (LSTM(32) B32 T100)
#: 720 / 558. It was 2 MFLOP, from an estimate of 30 us for the hand-off. Measured on two cores only.
#: ``NUMRNN_SCHEDULE=batch`` splits whatever the work.
MIN_FLOPS_PER_WORKER = 20e6

_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _env_int(name: str, minimum: int) -> int | None:
    """The integer in environment variable ``name`` (``None`` when unset or empty); a ``ValueError`` naming it
    unless it is a whole number of at least ``minimum``."""
    text = os.environ.get(name, "").strip()
    if not text:
        return None
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise ValueError(f"{name} must be a whole number of at least {minimum}; got {text!r}")
    return value


@functools.cache
def cores() -> int:
    """Workers a call may use: ``NUMRNN_NUM_THREADS``, else the cores this process may keep busy, its cgroups'
    CPU quota included (:func:`numrnn.runtime.cpus.available`; read once)."""
    configured = _env_int("NUMRNN_NUM_THREADS", 1)
    if configured is not None:
        return configured
    return cpus.available()


def stack_flops(spec: StackSpec, steps: int, batch: int) -> float:
    """Approximate FLOPs of one call: 2 x gates x T x B x units x (inputs + outputs) per cell."""
    return steps * batch * sum(_cell_flops(cell, size) for cell, size in zip(spec.cells, spec.input_sizes()))


def _cell_flops(cell, inputs: int) -> float:
    """FLOPs of one cell for one row and step."""
    return 2.0 * cell.gates * cell.units * (inputs + cell.output_size)


def direction_imbalance(spec: StackSpec) -> float:
    """The direction split's work over an even share: each block's slower direction, summed, over half the stack's.

    1.0 where both directions of every block cost the same (Keras's
    ``Bidirectional``); TF1's ``bidirectional_dynamic_rnn`` may give them
    different cells.
    """
    per_direction: dict[tuple[int, int], float] = {}
    for layer in layers_of(spec):
        key = (layer.block, layer.direction)
        per_direction[key] = per_direction.get(key, 0.0) + _cell_flops(layer.cell, layer.input_size)
    blocks = range(len(spec.blocks))
    slower = sum(max(flops for (b, _), flops in per_direction.items() if b == block) for block in blocks)
    return slower / (sum(per_direction.values()) / 2)


def split_rows(batch: int, workers: int) -> list[tuple[int, int]]:
    """Row ranges ``[(b0, b1), ...]`` of ``workers`` as even as possible; a single range means no split."""
    bounds = [batch * k // workers for k in range(workers + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def worker_rows(batch: int, workers: int, steps_per_row: np.ndarray | None = None) -> list[slice | np.ndarray]:
    """The rows of each batch worker: even contiguous ranges, or where rows have unequal steps, balanced ones.

    ``steps_per_row`` holds how many steps of each of the ``batch`` rows a
    call computes (its length, or its mask's count), ``None`` when all do
    all. Rows of unequal steps are dealt longest first, back and forth
    (worker 0, 1, ..., 1, 0, 0, 1, ...), so every worker gets as many rows
    (±1) and about as many steps; each worker's rows come in descending
    order of steps, so a step's live rows are the first ones (with lengths;
    a mask's may have gaps), which its product covers. A call costs about
    what its longest worker does, and that is linear in the row-steps:
    bidir_masked's stack on one thread, 4 / 3 / 2 / 1 rows of length 100:
    5.17 / 3.95 / 2.76 / 1.69 ms. Its lengths, sorted as PyTorch packs them
    (100 89 86 86 | 86 78 73 50), gave the first worker 361 row-steps of 648
    (4.79 / 3.91 ms on one thread); dealt, 322 and 326 (4.36 / 4.30 ms), and
    the split call went from 4.79 to 4.45 ms (medians of 300 calls
    alternating in one process).
    """
    if steps_per_row is None or batch == 0 or np.all(steps_per_row == steps_per_row[0]):
        return [slice(b0, b1) for b0, b1 in split_rows(batch, workers)]
    longest_first = np.argsort(-np.asarray(steps_per_row, dtype=np.int64), kind="stable")
    rounds = np.arange(batch) // workers
    seat = np.arange(batch) % workers
    worker = np.where(rounds % 2 == 0, seat, workers - 1 - seat)
    return [longest_first[worker == w] for w in range(workers)]


#: Largest latency-sized batch: from UNIT_SPLIT_MIN_FLOPS a call and a UNIT_SPLIT_MIN_WEIGHT_BYTES matrix it runs
#: the unit split however large the call (more rows: the small-batch rule below).
UNIT_SPLIT_MAX_ROWS = 2
#: Small batches (more than UNIT_SPLIT_MAX_ROWS rows) run the unit split up to a number of FLOPs a call that
#: depends on their rows, ``(most rows, most FLOPs)`` from the fewest rows up; no band, no split. Below it the
#: partners, waiting in compiled code, start at once, where the batch split's hand-off to the pool would cost
#: 150-200 us (MIN_FLOPS_PER_WORKER); only while the calls come close together (CloseCallsChoice).
#: Units / batch, medians in one process:
#: - up to 4 rows it won at every size measured (B4 T300: LSTM(256) 0.91 at 1.3 GFLOP, GRU(256) 0.94,
#:   LSTM(512) 0.95 at 5 GFLOP; at B8 T300, 0.89-1.12);
#: - up to 32 (LSTM and GRU of 64-256 units on as many inputs, B 4-32, T 10-300): 0.25-0.94 up to 200
#:   MFLOP (one 1.02), 0.80-1.04 from 300 to 700, 0.95-1.12 beyond (lengths: LSTM(128) B8 T100 1193 / 1613
#:   us, LSTM(256) B8 T50 1889 / 2775); the batch split needs no exchange a step, and at a few
#:   milliseconds a call that is worth more than its hand-off;
#: - at 48 and 64 rows (LSTM and GRU of 32-256 units, T 20-100) it won up to about 100 MFLOP (LSTM(32)
#:   B64 T20 218 / 466 us, serial 305; LSTM(64) B48 T20 429 / 626; GRU(64) B64 T50 1118 / 1300) and lost
#:   beyond about 150 (LSTM(64) B48 T50, 157 MFLOP: 1511 / 1254; LSTM(128) B64 T50 5125 / 5095; GRU(256)
#:   B64 T20 5813 / 5495).
SMALL_BATCH_MAX_FLOPS = ((4, math.inf), (32, 600e6), (64, 100e6))
#: SMALL_BATCH_MAX_FLOPS of a stack with a GRU that resets before its product, which exchanges ``r * h``
#: within each step as well as ``h`` after it (``codegen.cells.gru.gathered_names``). Units / best other
#: schedule, GRU(H) reset_after=False on H inputs, medians in one process (Emerald Rapids guest):
#: up to 4 rows it won (B4 T20 and T100: GRU(128) 0.87 and 0.86, GRU(256) T100 0.89); at 8 and 16 rows it
#: won up to about 30 MFLOP (GRU(64) B8 T50 0.94, GRU(128) B8 T20 0.78), tied at 16-126 (GRU(64) B16 T20
#: 0.98, GRU(128) B32 T20 0.97) and lost from 157 (GRU(128) B8 T100 and B16 T50 1.09) but for the largest
#: matrix (GRU(256) B16 T20, 252 MFLOP, 0.93; B8 T50, 315 MFLOP, 0.97); at 64 rows it lost (GRU(64) B64
#: T20, 63 MFLOP, 1.11). An LSTM projection exchanges its ``o * tanh(c)`` too, but keeps the usual bands:
#: it won by as much as plain LSTMs do (LSTM(128) projected to 64, B8 T20 0.81, B8 T100 0.91 at 170
#: MFLOP, B32 T20 0.95; LSTM(256) to 128, B4 T100 0.91, B16 T20 0.93 at 272 MFLOP).
SMALL_BATCH_RESET_BEFORE_MAX_FLOPS = ((4, math.inf), (32, 100e6))
#: The smallest recurrent matrix whose small batches split their units: LSTM(32)'s (16 KiB, 16 units a
#: worker) won from UNIT_SPLIT_MIN_FLOPS (B8-B32, T20-T100: 0.67-0.87 of the best other schedule's time);
#: LSTM(16) and GRU(16) lost at every size (8 units a worker), GRU(32) (12 KiB) broke even.
SMALL_BATCH_MIN_WEIGHT_BYTES = 16 * 1024
#: Largest GEMM-sized batch run with the unit split (at 128 rows a per-step GEMM is efficient on
#: its own and the batch split won as often as it lost).
UNIT_SPLIT_MAX_GEMM_ROWS = 64
#: A layer's recurrent matrix at least this large makes the split pay at one or two rows: each core
#: reads half of it per step (LSTM(96), 144 KiB, won; LSTM(64), 64 KiB, broke even).
UNIT_SPLIT_MIN_WEIGHT_BYTES = 128 * 1024
#: At GEMM-sized batches, at least one core's L2 (only measured from LSTM(256) up).
UNIT_SPLIT_MIN_GEMM_WEIGHT_BYTES = 512 * 1024
#: Below this many FLOPs per call what a split adds per call (~10 us with the partners ready, the
#: queues' hand-off when they sleep) outweighs the gain; for the direction split too.
UNIT_SPLIT_MIN_FLOPS = 2.5e6
#: Largest batch run with the direction split (a bidirectional stack) whatever the cores; on two
#: workers, up to the packed product's rows (see the module docstring).
DIRECTION_SPLIT_MAX_ROWS = 4
#: Beyond DIRECTION_SPLIT_MAX_ROWS rows, the most :func:`direction_imbalance` the direction split takes: B8
#: T100, directions / batch, LSTM(128) forward with LSTM(128) / LSTM(96) / LSTM(64) backward (imbalance 1.0
#: / 1.23 / 1.5): 0.81 / 0.95 / 1.10.
DIRECTION_SPLIT_MAX_IMBALANCE = 1.25
#: The smallest recurrent matrix whose one- or two-row calls below the thresholds above are timed
#: both ways (:class:`MeasuredChoice`): LSTM(64)'s 64 KiB split broke even or lost on an AVX2 Zen 3
#: (units / serial 0.87-1.02 at T=100, 1.00-1.24 at T=50) and won from about 30 steps on an AVX-512
#: Zen 4 (0.89 at T=50, 0.84 at T=100); LSTM(48)'s 36 KiB lost at every length there (1.13-1.63, T=10-100).
MEASURED_MIN_WEIGHT_BYTES = 64 * 1024
#: Fewer FLOPs than this per call are never split, timed or not (LSTM(64) B1 T10 D32, 0.49 MFLOP,
#: lost by 1.2x on the Zen 4).
MEASURED_MIN_FLOPS = 0.5e6
SCHEDULES = ("auto", "serial", "batch", "units", "directions")


def unit_split_blocker(spec: StackSpec, workers: int) -> str | None:
    """Why ``spec`` cannot run with its units split over ``workers`` threads, or ``None``."""
    return "only one core is available" if workers < 2 else spec.unit_split_blocker(workers)


def direction_split_blocker(spec: StackSpec, workers: int) -> str | None:
    """Why ``spec`` cannot run its two directions on two of ``workers`` threads, or ``None``."""
    return "only one core is available" if workers < 2 else spec.direction_split_blocker()


def largest_recurrent_bytes(spec: StackSpec) -> int:
    """Bytes of the largest recurrent matrix of the stack (what a one-row step reads)."""
    return max(recurrent_bytes(cell, spec.dtype) for cell in spec.cells)


def same_sums_when_split(spec: StackSpec, workers: int) -> bool:
    """Whether the unit split computes bit for bit what the serial kernel does (on packed products).

    float32, and every worker's units a whole number of vectors: then each
    worker's gate loops run whole vectors as the serial loop does, never a
    unit in the scalar remainder that the serial loop vectorized. No LSTM
    projection: a split worker's dot products run to a bound known only at
    run time, which LLVM may vectorize otherwise than the serial kernel's
    constant one (not compared).
    """
    lanes = vector_lanes("float32")
    return spec.dtype == "float32" and all(cell.units // workers % lanes == 0 and not cell.proj_units
                                           for cell in spec.cells)


def forced_schedule() -> str:
    """``NUMRNN_SCHEDULE`` (``auto`` when unset); an unknown value is a ``ValueError``."""
    value = os.environ.get("NUMRNN_SCHEDULE", "auto").strip().lower() or "auto"
    if value not in SCHEDULES:
        raise ValueError(f"NUMRNN_SCHEDULE must be one of {', '.join(SCHEDULES)}; got {value!r}")
    return value


#: ``os.environ``'s own mapping and its key for ``NUMRNN_SCHEDULE``, where CPython has them (``None`` elsewhere):
#: :meth:`Scheduler.plan` reads the variable on every call, and ``os.environ.get`` takes 0.7 us to do it.
_ENVIRON_DATA = getattr(os.environ, "_data", None)
_SCHEDULE_KEY = os.environ.encodekey("NUMRNN_SCHEDULE") if hasattr(os.environ, "encodekey") else None


def _schedule_variable():
    """``NUMRNN_SCHEDULE`` as ``os.environ`` stores it (encoded on POSIX), or ``None``: a key, not a value to read.

    ``os.environ``'s own mapping, read in 30 ns, changes with every
    assignment to ``os.environ`` (as ``monkeypatch.setenv`` makes them).
    """
    if _ENVIRON_DATA is None or _SCHEDULE_KEY is None:
        return os.environ.get("NUMRNN_SCHEDULE")
    return _ENVIRON_DATA.get(_SCHEDULE_KEY)


#: Shapes whose schedule one :class:`Scheduler` remembers before it starts over.
MAX_REMEMBERED_SHAPES = 4096


class Scheduler:
    """The schedule of one spec's calls (see the module docstring).

    What depends only on the spec (its FLOPs per row and step, whether its
    units can split) is worked out once, here, and each shape's plan once
    (:meth:`plan`); a call then pays for an environment read and a dict
    lookup. Worked out per call, the policy cost 11-14 us (most of it summing
    the FLOPs over the cells), about 8 % of a tiny64 call.
    """

    def __init__(self, spec: StackSpec):
        self.spec = spec
        self.workers = cores()
        self.flops_per_row_step = stack_flops(spec, 1, 1)
        self.recurrent_bytes = largest_recurrent_bytes(spec)
        splittable = unit_split_blocker(spec, self.workers) is None
        self.splits_units = splittable and self.recurrent_bytes >= UNIT_SPLIT_MIN_WEIGHT_BYTES
        self.splits_small_batches = splittable and self.recurrent_bytes >= SMALL_BATCH_MIN_WEIGHT_BYTES
        self.measures_units = (splittable and self.recurrent_bytes >= MEASURED_MIN_WEIGHT_BYTES
                               and same_sums_when_split(spec, self.workers))
        self.gathers = any(emitter_for(cell).gathered_names(cell) for cell in spec.cells)
        self.resets_before = any(cell.kind == "gru" and not cell.reset_after for cell in spec.cells)
        self.splits_directions = direction_split_blocker(spec, self.workers) is None
        self.even_directions = self.splits_directions and direction_imbalance(spec) <= DIRECTION_SPLIT_MAX_IMBALANCE
        self._chosen: dict[tuple, tuple[str, int, MeasuredChoice | None]] = {}

    def choose(self, steps: int, batch: int) -> tuple[str, int]:
        """``("directions", 2)``, ``("units", n)``, ``("batch", n)`` or ``("serial", 1)`` for a call.

        The static rule's choice: where :meth:`plan` measures, the timings
        may run the unit split instead.
        """
        return self.plan(steps, batch)[:2]

    def plan(self, steps: int, batch: int) -> tuple[str, int, MeasuredChoice | None]:
        """:meth:`choose`'s schedule and workers, and the :class:`MeasuredChoice` that overrides them, if any.

        Remembered per shape and ``NUMRNN_SCHEDULE`` (2.7 us a call worked
        out, of an 80-100 us tiny64 call).
        """
        key = (steps, batch, _schedule_variable())
        chosen = self._chosen.get(key)
        if chosen is None:
            if len(self._chosen) >= MAX_REMEMBERED_SHAPES:
                self._chosen.clear()
            chosen = self._chosen[key] = self._plan(steps, batch)
        return chosen

    def _plan(self, steps: int, batch: int) -> tuple[str, int, MeasuredChoice | CloseCallsChoice | None]:
        forced = forced_schedule()
        schedule, workers = self._choose(steps, batch, forced)
        if forced != "auto":
            return schedule, workers, None
        if schedule == "units" and batch <= UNIT_SPLIT_MAX_ROWS:
            return schedule, workers, CloseCallsChoice((schedule, workers), self.batch_choice(steps, batch))
        if schedule not in ("serial", "batch"):
            return schedule, workers, None
        if self._measures(steps, batch):
            return schedule, workers, MeasuredChoice(((schedule, workers), ("units", self.workers)))
        if self._small_batch_splits_units(steps, batch):
            return "units", self.workers, CloseCallsChoice(("units", self.workers), (schedule, workers))
        return schedule, workers, None

    def _measures(self, steps: int, batch: int) -> bool:
        """Whether a call's schedule is timed: a small enough call whose every product is the packed one.

        BLAS would make the options' sums differ: its edge kernels add a
        matrix's last columns in another order than its main kernel, and a
        worker's column slice puts other columns at the edge (GRU(80) and
        SimpleRNN(136) differed in the last bits, float32).
        """
        return (self.measures_units and batch <= min(UNIT_SPLIT_MAX_ROWS, packed_product_rows())
                and steps * batch <= PACKED_PROJECTION_MAX_ROWS
                and self._flops(steps, batch) >= MEASURED_MIN_FLOPS)

    def _flops(self, steps: int, batch: int) -> float:
        return self.flops_per_row_step * steps * batch

    def _choose(self, steps: int, batch: int, forced: str) -> tuple[str, int]:
        if forced == "serial":
            return "serial", 1
        if forced == "batch":
            return self.batch_choice(steps, batch, min_flops_per_worker=0.0)
        if forced == "units":
            workers = max(self.workers, 2)
            blocker = unit_split_blocker(self.spec, workers)
            if blocker is not None:
                raise ValueError(f"NUMRNN_SCHEDULE=units cannot run {self.spec.kernel_name()}: {blocker}")
            return "units", workers
        if forced == "directions":
            blocker = self.spec.direction_split_blocker()
            if blocker is not None:
                raise ValueError(f"NUMRNN_SCHEDULE=directions cannot run {self.spec.kernel_name()}: {blocker}")
            return "directions", DIRECTION_WORKERS
        splits = forced == "auto" and self._flops(steps, batch) >= UNIT_SPLIT_MIN_FLOPS
        if splits and self.splits_directions and self._directions_pay_at(batch):
            return "directions", DIRECTION_WORKERS
        if splits and self.splits_units and self._units_pay_at(batch):
            return "units", self.workers
        return self.batch_choice(steps, batch)

    def _small_batch_splits_units(self, steps: int, batch: int) -> bool:
        """A small batch (past the latency-sized rows) of a call neither too small for a split nor large enough
        to pay for the batch split's hand-off (:data:`SMALL_BATCH_MAX_FLOPS`)."""
        bands = SMALL_BATCH_RESET_BEFORE_MAX_FLOPS if self.resets_before else SMALL_BATCH_MAX_FLOPS
        most = next((flops for rows, flops in bands if batch <= rows), 0.0)
        return (self.splits_small_batches and batch > UNIT_SPLIT_MAX_ROWS
                and self.workers == 2  # as measured: two workers, each worker's product the packed one
                and batch <= packed_product_rows()
                and UNIT_SPLIT_MIN_FLOPS <= self._flops(steps, batch) <= most)

    def _directions_pay_at(self, batch: int) -> bool:
        """Up to four rows; on as many workers as directions, as many rows as the packed product takes, where
        the directions' work is about even."""
        return batch <= DIRECTION_SPLIT_MAX_ROWS or (self.workers <= DIRECTION_WORKERS and self.even_directions
                                                      and batch <= packed_product_rows())

    def _units_pay_at(self, batch: int) -> bool:
        """Latency-sized, or GEMM-sized with each batch worker past the packed product (see the module docstring)."""
        if batch <= UNIT_SPLIT_MAX_ROWS:
            return True
        if self.recurrent_bytes < UNIT_SPLIT_MIN_GEMM_WEIGHT_BYTES or self.gathers:
            return False  # a second exchange a step: not measured with BLAS's products
        # Only where BLAS takes a batch worker's rows (see packed_product_rows); not measured below 9 rows.
        return self.workers * max(packed_product_rows(), 8) < batch <= UNIT_SPLIT_MAX_GEMM_ROWS

    def batch_choice(self, steps: int, batch: int,
                     min_flops_per_worker: float = MIN_FLOPS_PER_WORKER) -> tuple[str, int]:
        """``("batch", workers)``, as many workers as get ``min_flops_per_worker`` each, or ``("serial", 1)``."""
        n = min(self.workers, batch)
        if min_flops_per_worker > 0:
            n = min(n, int(self._flops(steps, batch) // min_flops_per_worker))
        return ("batch", n) if n > 1 else ("serial", 1)


#: Calls of a shape that start less than this after the last one ended find the unit split's partners still
#: waiting for them (``numrnn.runtime.sync.PARTNER_WAIT_ROUNDS``: about 3.6 ms here).
CLOSE_CALL_SECONDS = 0.002


#: The one-thread schedule.
SERIAL = ("serial", 1)

#: A call after a pause splits too, waking the partners, where the serial static option's calls take at least this
#: long: the wake costs 1.5-3 ms, and the split saves more. One row, T50, calls 20 ms apart, serial / split
#: (medians of 30): LSTM(256) T100 2.86 / 3.14 ms, LSTM(512) 4.49 / 5.15, LSTM(640) 6.46 / 4.85, LSTM(512) T100
#: 7.89 / 7.04, LSTM(768) 9.39 / 7.00, LSTM(1024) 18.5 / 10.5.
PAUSE_SPLIT_SECONDS = 0.006
#: The same where the static option is the batch split, which wakes a thread of its own after a pause. Four rows,
#: calls 0.1 s apart, batch / unit split after the pause (the split forced by a threshold of 0, medians of 11-15):
#: LSTM(64) T60 0.58-0.60 / 0.63-0.71 ms, LSTM(128) T20 0.68-0.74 / 0.70-0.82, LSTM(256) T50 2.04-2.54 /
#: 1.70-1.80, LSTM(192) T100 2.26-2.40 / 1.97-2.18, LSTM(256) T100 2.59-3.05 / 2.14-2.24, LSTM(512) T25 3.70-4.76 /
#: 3.08-3.24; at this threshold LSTM(512) T50 7.77 / 5.72, LSTM(1024) T50 31.0-33.0 / 25.2-28.8, GRU(768) B2 T200
#: 32.9 / 19.9. Small batches of 8-32 rows, the same way, were within the host's noise: LSTM(256) B8 T50 3.93 /
#: 2.65, LSTM(128) B16 T100 3.48 / 3.42, GRU(128) B16 T100 3.11 / 3.60, 2.60 / 2.14, 2.21 / 2.25, LSTM(128) B32
#: T50 3.61 / 4.41, 3.48 / 2.71, 2.64 / 2.82.
PAUSE_SPLIT_BATCH_SECONDS = 0.002
#: While a shape's calls count as long, a call after a pause runs the static option again once this long has
#: passed since the last one did: fresh samples, so that calls the host held up do not keep a short shape long.
STATIC_REFRESH_SECONDS = 5.0


class _CallGaps:
    """When a shape's last call ended (or should have), to tell a call that comes close after it
    (:data:`CLOSE_CALL_SECONDS`) from one after a pause; and whether its calls come in bursts.

    A call after a pause runs without the partners, asleep by then, and,
    where the static option is serial (:attr:`declines`), the close calls
    after it decline them until they are awake
    (``numrnn.runtime.partners.Partners.run``). Where the last call after a
    pause was followed by a close one, :meth:`_arrive` sets :attr:`wake` for
    the next call after a pause: the kernel then wakes the partners into the
    split's loop (``Kernel._wake_partners``) while that call runs without
    them, so that the burst's second call can find them ready. Calls that
    come evenly spaced (two after a pause in a row) do not wake them: they
    would spin their few milliseconds for nothing after every call.

    Long calls are the exception: where the static option's last
    :data:`STATIC_SAMPLES` calls each took :data:`PAUSE_SPLIT_SECONDS` or
    more (:data:`PAUSE_SPLIT_BATCH_SECONDS` where it is the batch split,
    which wakes a thread of its own), every call counts as close (waking
    the partners costs less than the split saves) and none
    declines them, except one after a pause every
    :data:`STATIC_REFRESH_SECONDS`, which runs the static option again for
    a fresh sample. The shortest of those calls counts, so a call that the
    host held up does not make a shape long (in a ``numrnn bench --grid``
    run, 2xLSTM(128) B1 T100, about 1 ms a call serial, split after every
    pause once one such call decided alone).
    """

    #: The static option's calls kept to tell long calls.
    STATIC_SAMPLES = 3

    def __init__(self, static: tuple[str, int]):
        self._started = self._ends_at = -np.inf
        self._static = static
        self._serial_static = static == SERIAL
        #: Whether the call just picked, if split, may decline partners still asleep and run ``static`` instead:
        #: where that is serial (a batch split's threads would run beside the partners it wakes), unless its calls
        #: are long (the partners would sleep again behind it).
        self.declines = self._serial_static
        #: Seconds of the static option's last calls that ran as picked (STATIC_SAMPLES at most, oldest first),
        #: and when the last of them started.
        self._static_times: list[float] = []
        self._long_seconds = PAUSE_SPLIT_SECONDS if self._serial_static else PAUSE_SPLIT_BATCH_SECONDS
        self._static_at = -np.inf
        self._after_pause = False  # whether the last call came after a pause
        self._bursts = False  # whether the last call after a pause was followed by a close one
        #: The split option whose partners the call just picked should wake, or ``None``.
        self.wake: tuple[str, int] | None = None

    @property
    def long_calls(self) -> bool:
        """Whether the static option's last :data:`STATIC_SAMPLES` calls each took :data:`PAUSE_SPLIT_SECONDS` or
        more (:data:`PAUSE_SPLIT_BATCH_SECONDS`, the batch split's): every call counts as close (but for a fresh
        sample)."""
        return len(self._static_times) == self.STATIC_SAMPLES and min(self._static_times) >= self._long_seconds

    def _arrive(self, now: float, split: tuple[str, int] | None) -> bool:
        """A call starts at ``now``: whether it comes close after the last one (every call does where the static
        option's calls are long, but for a fresh sample); :attr:`wake` set to ``split`` where it comes after a pause
        in a shape whose calls come in bursts (``split=None``: wake none)."""
        long_now = self.long_calls and now - self._static_at < STATIC_REFRESH_SECONDS
        self.declines = self._serial_static and not long_now
        close = long_now or now - self._ends_at < CLOSE_CALL_SECONDS
        if self._after_pause:
            self._bursts = close
        self._after_pause = not close
        self.wake = split if not close and self._bursts else None
        return close

    def _start(self, now: float, expected_seconds: float | None = None) -> None:
        """A call starts at ``now``; until :meth:`_end` says, it is taken to last ``expected_seconds``, if given
        (else the last call's end stands)."""
        self._started = now
        if expected_seconds is not None:
            self._ends_at = now + expected_seconds

    def _end(self, option: tuple[str, int], seconds: float, as_picked: bool) -> None:
        """The call started last, picked as ``option``, took ``seconds``; ``as_picked``: it ran that option."""
        self._ends_at = self._started + seconds
        if as_picked and option == self._static:
            self._static_times = [*self._static_times, seconds][-self.STATIC_SAMPLES:]
            self._static_at = self._started


class CloseCallsChoice(_CallGaps):
    """A small batch's schedule: the unit split while its calls come close together, else the batch rule's.

    After a split call the partners wait for the next one in compiled code
    for a few milliseconds, then sleep. A call that finds them asleep wakes
    them through their queues, and on a virtual machine the host may have
    descheduled their idle CPU: with 10 ms between calls (the partners
    asleep each time), medians, serial / batch / units: LSTM(64) B4 T20 126
    / 408 / 1377 us, LSTM(128) B4 T20 375 / 708 / 1529 us, where back to
    back the unit split was fastest (62 / 223 / 41 us). So a call that comes
    :data:`CLOSE_CALL_SECONDS` or more after the shape's last one ended runs
    the batch rule's schedule (usually serial at these sizes), and the next
    call, if it follows close, splits; if the partners are still asleep it
    runs the batch rule's schedule too where that is serial, and wakes them
    for the calls after it (``numrnn.runtime.partners.Partners.run``'s
    ``decline``), rather than wait for them (bursts of five calls 20 ms
    apart, medians by position: tiny64 202, 2827, 89, 174, 71 us before,
    245, 88, 67, 61, 58 us after, with :class:`_CallGaps`'s wake). The same
    for one or two rows
    (latency256 with 10 ms between calls: 4.1 ms split against 1.7 ms
    serial; back to back, 0.7 against 1.4 ms). Not for the direction split,
    which won even so (bidir_masked, 10 ms apart: 5.0 against 8.7 ms
    serial), nor the GEMM-sized unit split's long calls.

    The same interface as :class:`MeasuredChoice` (``pick``, ``record``),
    every call timed.
    """

    def __init__(self, split: tuple[str, int], otherwise: tuple[str, int]):
        super().__init__(otherwise)
        self.split, self.otherwise = split, otherwise

    def pick(self, now: float) -> tuple[tuple[str, int], bool]:
        """The option this call runs, and True (time it: :meth:`record` says when it ended); ``now``: its start."""
        close = self._arrive(now, self.split if self._serial_static else None)
        self._start(now)
        return (self.split if close else self.otherwise), True

    def record(self, option: tuple[str, int], seconds: float, counted: bool = True) -> None:
        """The call that :meth:`pick` started last took ``seconds`` (``counted``: as picked, for the interface
        :class:`MeasuredChoice` shares)."""
        self._end(option, seconds, counted)


class MeasuredChoice(_CallGaps):
    """One call shape's schedule picked by timing its calls: whichever option ran them faster lately.

    For calls of one or two rows at the edge of the unit split's gain (the
    module docstring): every step of the split waits for ``h`` to cross
    between two cores, and on a virtual machine that crossing depends on
    where the host runs the two virtual CPUs at the time. On the AVX-512 Zen
    4 guest a round trip took 50, 100-120 or 190-540 ns (the same two-thread
    ping-pong, started anew), and tiny64 split (with a barrier a step then)
    ran in 37-39 us against 46 us serial when it was short, in 66-70 us when
    it was long, for seconds at a time.

    So the calls of such a shape run in rounds. The first round runs each
    option untimed, then :data:`SAMPLES` times timed; after it, the option
    that ran its timed calls faster (below) runs every call, untimed, and
    once :data:`ROUND_SECONDS` and :data:`ROUND_CALLS` calls have passed
    since the last round, a round of each option (the others, then the best)
    adds one timed call to each. An option's calls in a round are not timed
    until :data:`WARM_SECONDS` have passed since its first (at least one
    call; its warm-up starts again after a call of it that ran otherwise,
    and after a pause): they pay for the change (a compile or a cache load,
    partners woken from sleep, weights not yet in cache, and a partner's
    core that runs slow for a while after it sat idle). Timed at its second call, the
    split read 45-60 us where, run on, it took 25-27 us (tiny64 on Emerald
    Rapids; serial 29-31 us), so serial won rounds that the split would
    have won warm. A timed call that
    ran otherwise (its partners asleep or still waking, so the split
    declined them; another thread's split call; a compile) goes back to its
    round for the next call, up to :data:`RETRIES` times a round: a split
    call declines partners that are still waking
    (``numrnn.runtime.partners.Partners.run``), and while serial was the
    best the round's untimed split call only woke them, so its timed one
    would almost never find them ready and the split's timings would stay
    as they were.

    Each option counts by the median of its last :data:`SAMPLES` timed
    calls, leaving out those over :data:`OUTLIER_FACTOR` times the shortest
    of them: in ``numrnn bench`` the first split call after a peer's turn
    took 2.7 ms instead of 40 us (the partner's core still taken by the
    peer's spinning threads), often enough to move a plain median of three,
    while the shortest alone would keep an option that ran fast once for
    three rounds after the host made it slow. The plan measures only calls
    on which both options compute the same sums in the same order
    (:meth:`Scheduler._measures`), so the results do not depend on which ran.

    A call that comes :data:`CLOSE_CALL_SECONDS` or more after the shape's
    last one ended runs the static rule's option, outside the rounds, as
    :class:`CloseCallsChoice` does: the partners it would find asleep. With
    10 ms between tiny64's calls, after 20 back to back, the unit split
    (forced) ran them in 2.9-3.2 ms and serial in 0.14-0.19 ms (medians of
    the first 50 and the last 100 of 150), and the rounds took about 50 such
    calls to learn it (their median 2.8 ms). Such
    a call is timed to learn when it ends, not counted; an untimed call is
    taken to end after its option's typical time.

    ``options`` are ``(schedule, workers)`` pairs, the static rule's first.
    Calls from several threads may interleave their timings; that only blurs
    the choice.
    """

    SAMPLES = 3
    OUTLIER_FACTOR = 3.0
    ROUND_SECONDS = 0.05
    ROUND_CALLS = 32
    RETRIES = 64
    #: Seconds of an option's untimed calls in a round. tiny64's split by its position after 50 ms of serial
    #: calls (medians of 20 such runs, us): 202, 35, 30, 31 (calls 4-5), 30 (6-10), 29 (11-20), 30 (21-50), 28
    #: (after 100); after 50 ms of split calls 28, then 25-26. Rounds that warmed each option 20 calls (about
    #: 0.6 ms), three processes each way: the split timed at 24-27 us against 46-47, calls 27.4-29.6 us against
    #: 29.0-30.3; in turns as ``numrnn bench`` times them, 27.8 against 30.5 us.
    WARM_SECONDS = 5e-4

    def __init__(self, options: tuple[tuple[str, int], ...]):
        super().__init__(options[0])
        self.options = options
        self.best = options[0]
        self._times: dict[tuple[str, int], list[float]] = {option: [] for option in options}
        self._typical: dict[tuple[str, int], float] = {}
        self._round = self._round_of(options, self.SAMPLES)  # the calls left of the current round
        self._retries = 0  # timed calls of the current round put back (RETRIES)
        self._warming: tuple[str, int] | None = None  # the option the round is warming or timing
        self._warm_since: float | None = None  # when its warm-up started (None: at its next call)
        self._round_at = 0.0  # when the last round's last call started
        self._since = 0  # calls of the best since then
        self._last_seconds = 0.0  # the last timed call's
        self._counted = True  # whether the last call's time is a sample (not that of a call after a pause)

    def pick(self, now: float) -> tuple[tuple[str, int], bool]:
        """The option this call runs, and whether to time it (:meth:`record`); ``now``: its start."""
        if self._arrive(now, self.best if self._serial_static and self.best != self.options[0] else None):
            option, timed = self._next_call(now)
            self._counted = timed
        else:
            option, timed, self._counted = self.options[0], True, False
            self._warm_since = None  # a round's warm-up, if one is under way, starts again after the pause
        self._start(now, self._typical.get(option, self._last_seconds))
        return option, timed

    def _next_call(self, now: float) -> tuple[tuple[str, int], bool]:
        """A close call's option, and whether it is timed: the round's next, else the best."""
        if self._round:
            try:
                call = self._round.pop()
            except IndexError:  # another thread took the round's last call
                pass
            else:
                return self._warm(call, now)
        self._since += 1
        if self._since < self.ROUND_CALLS or now - self._round_at < self.ROUND_SECONDS:
            return self.best, False
        calls = self._round_of([option for option in self.options if option != self.best] + [self.best], 1)
        call = calls.pop()
        self._retries, self._warming = 0, None
        self._round = calls  # stored whole, after its first call is taken: another thread may pop it at once
        return self._warm(call, now)

    def _warm(self, call: tuple[tuple[str, int], bool], now: float) -> tuple[tuple[str, int], bool]:
        """The round's ``call`` just taken, or an untimed call of its option in its place (put back) while that
        option's warm-up started less than :data:`WARM_SECONDS` before ``now``: at its first call of the round, or
        again after a call of it that ran otherwise (:meth:`ran_otherwise`) or a pause."""
        option, timed = call
        if option != self._warming:
            self._warming, self._warm_since = option, now
        elif self._warm_since is None:
            self._warm_since = now
        if timed and now - self._warm_since < self.WARM_SECONDS:
            self._round.append(call)
            return option, False
        if not self._round:
            self._round_at, self._since = now, 0
        return call

    def ran_otherwise(self, option: tuple[str, int]) -> None:
        """A call picked as ``option`` ran otherwise (it declined partners still waking, or compiled): it warmed
        nothing, so a round's warm-up of ``option`` starts again at its next call (a timed one also goes back to
        its round: :meth:`record`)."""
        if option == self._warming:
            self._warm_since = None

    @staticmethod
    def _round_of(order, timed: int) -> list[tuple[tuple[str, int], bool]]:
        """A round's calls, ``(option, timed)`` popped from the end: each option in ``order`` once untimed, then
        ``timed`` times timed."""
        return [(option, is_timed) for option in reversed(order) for is_timed in [True] * timed + [False]]

    def typical(self) -> dict[tuple[str, int], float]:
        """Each option's time a call as compared, in seconds (options timed :data:`SAMPLES` times)."""
        return dict(self._typical)

    def record(self, option: tuple[str, int], seconds: float, counted: bool = True) -> None:
        """The timed call that :meth:`pick` started last, of ``option``, took ``seconds``; not a sample of it
        unless ``counted`` (False: it ran otherwise, or compiled, and a round's call is put back)."""
        self._end(option, seconds, counted)
        self._last_seconds = seconds
        if not self._counted:
            return
        if not counted:
            if self._retries < self.RETRIES:
                self._retries += 1
                self._round.append((option, True))
                self.ran_otherwise(option)
            return
        times = self._times[option]
        times.append(seconds)
        if len(times) > self.SAMPLES:
            del times[0]
        if len(times) == self.SAMPLES:
            ceiling = self.OUTLIER_FACTOR * min(times)
            kept = sorted(t for t in times if t <= ceiling)
            self._typical[option] = kept[len(kept) // 2]  # of two, the longer: a lone fast call does not decide
            if len(self._typical) == len(self.options):
                self.best = min(self._typical, key=self._typical.__getitem__)


def choose(spec: StackSpec, steps: int, batch: int) -> tuple[str, int]:
    """:meth:`Scheduler.choose` for one call of ``spec``."""
    return Scheduler(spec).choose(steps, batch)


def _blas_setters() -> list:
    """``openblas_set_num_threads_local`` of each OpenBLAS that the kernels' GEMMs may call."""
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


class single_threaded_blas:  # lower case: used like the function it replaced, ``with single_threaded_blas():``
    """OpenBLAS single-threaded while any numrnn call is in such a block (per-step GEMMs are too small to fork).

    ``openblas_set_num_threads_local`` sets the count of the whole process in
    OpenBLAS's pthreads builds, which scipy's wheels are (a count set in one
    thread is what every other thread reads back), so the workers of one call,
    and overlapping calls, share the setting: every block sets one thread (so
    a build with per-thread counts is covered too), the first of overlapping
    blocks saves the caller's count and the last one out puts it back. Saving
    and restoring in each block left a count of 1 or 2 by which worker finished
    last, and could restore 2 while another worker still ran its GEMMs.

    A class rather than a ``contextlib.contextmanager`` generator, which cost
    3.1 us to enter and leave against 1.9 us for a class (0.8 us of it the
    OpenBLAS calls); short serial calls skip it (``Kernel._run_serial``).
    """

    __slots__ = ()

    def __enter__(self) -> None:
        global _BLAS_USERS, _BLAS_SAVED
        with _BLAS_LOCK:
            counts = [setter(1) for setter in _blas_setters()]
            if _BLAS_USERS == 0:
                _BLAS_SAVED = counts
            _BLAS_USERS += 1

    def __exit__(self, *exc_info) -> None:
        global _BLAS_USERS
        with _BLAS_LOCK:
            _BLAS_USERS -= 1
            if _BLAS_USERS == 0:
                for setter, n in zip(_blas_setters(), _BLAS_SAVED):
                    setter(n)


_BLAS_LOCK = threading.Lock()
#: Blocks of :class:`single_threaded_blas` open now, and the count the first of them found.
_BLAS_USERS = 0
_BLAS_SAVED: list[int] = []


def _openblas_paths() -> list[str]:
    """SciPy's OpenBLAS (the kernels' GEMMs call it: ``numrnn.runtime.extern.gemm``), when it is a wheel's own."""
    import scipy

    base = os.path.dirname(os.path.dirname(scipy.__file__))
    return sorted(glob.glob(os.path.join(base, "scipy.libs", "libscipy_openblas*.so*")))


def preload_cython_blas() -> None:
    """Import ``scipy.linalg.cython_blas`` by itself, before anything imports it through ``scipy.linalg``.

    The kernels' GEMMs call the BLAS functions of that module
    (``numrnn.runtime.extern.link_blas`` imports it), as numba's ``np.dot``
    does. Python imports a package before its
    submodule, and ``scipy.linalg``'s ``__init__`` imports most of SciPy's
    linear algebra: 0.30 of the 1.0 s that a process with a warm disk cache
    took to its first seed000 result. The extension module alone loads in
    0.03 s (it needs only the ``scipy`` package, not ``scipy.linalg``), and
    with it in ``sys.modules`` an import of it finds it there. ``import
    scipy.linalg`` later still runs that package's ``__init__`` as usual, and
    :class:`_AttachPreloaded` then sets the package's ``cython_blas``
    attribute, which Python sets only when it loads a submodule itself. Where
    anything differs from what this expects, it does nothing, and the module
    is imported the usual way (with ``scipy.linalg``).
    """
    name = "scipy.linalg.cython_blas"
    if name in sys.modules or "scipy.linalg" in sys.modules:
        return
    try:
        scipy = importlib.util.find_spec("scipy")
        folder = os.path.join(scipy.submodule_search_locations[0], "linalg")
        paths = [os.path.join(folder, f"cython_blas{suffix}") for suffix in importlib.machinery.EXTENSION_SUFFIXES]
        path = next(p for p in paths if os.path.exists(p))
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    except Exception:  # any surprise: leave the import to numba
        sys.modules.pop(name, None)
        return
    sys.meta_path.insert(0, _AttachPreloaded())


class _AttachPreloaded(importlib.abc.MetaPathFinder):
    """Import hook, once: after ``scipy.linalg`` runs, set its ``cython_blas`` to the preloaded module."""

    def find_spec(self, fullname, path, target=None):
        """The usual spec of ``scipy.linalg``, its loader wrapped; ``None`` (not handled here) for anything else."""
        if fullname != "scipy.linalg" or self not in sys.meta_path:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_attach(module):
            exec_module(module)
            module.cython_blas = sys.modules["scipy.linalg.cython_blas"]

        spec.loader.exec_module = exec_and_attach
        return spec


#: Rows per worker up to which the packed product ran faster than BLAS wherever it was measured.
PACKED_PRODUCT_MAX_ROWS = 128


@functools.cache
def packed_product_rows() -> int:
    """Batch rows up to which the per-step recurrent product is the packed product rather than BLAS.

    The packed product (``codegen.cells.common.emit_panel_product``) reads
    weights packed once, in panels; a BLAS GEMM packs its operands again on
    every call. Measured with OpenBLAS's Haswell kernels (AVX2 Zen 3, one
    thread, inside ``@njit``, rows x inputs x outputs, packed / BLAS):
    2x64x256 1.3 / 12.3 us, 4x128x512 6.2 / 45.8, 16x128x512 35.5 / 76.9,
    64x128x512 108 / 137, 64x512x1024 832 / 1079, 128x120x360 144 / 160:
    the packed product up to :data:`PACKED_PRODUCT_MAX_ROWS` rows (the most
    measured). One row too, since the packed product walks its panels back
    and forth: B=1 whole calls, packed / gemv, medians of two fresh processes:
    LSTM(64) T50 99-106 / 115-120 us, LSTM(256) T100 1.77-1.97 / 1.95-2.15 ms,
    LSTM(128) T100 681-694 / 668-749 us, GRU(256) T100 1.07-1.56 / 1.22-1.42 ms
    (it used to lose at one row: LSTM(64) 83.4 against 75.9 us).

    OpenBLAS's SkylakeX kernels have small-matrix GEMMs for AVX-512, which on
    an early session's Zen 5 beat the hand loop that preceded the packed
    product (4x128x512 2.7 against 9.0 us), so BLAS took every row where
    OpenBLAS had them. On an AVX-512 Zen 4 (OpenBLAS SkylakeX), the packed
    product with 32-byte vectors beat them on every standard shape (two runs
    of ``numrnn bench``, alternating, BLAS / packed: seed000 77.1-77.5 /
    70.8-73.8 ms, seed002 16.7-17.7 / 15.5-15.8 ms, latency256 867 / 816 us,
    tiny64 54 / 46 us, throughput512 341-357 / 280-283 ms, bidir_masked
    4.9-5.7 / 4.9-5.0 ms). It now takes AVX-512's vectors where numba
    compiles for them (``codegen.cells.common.vector_bytes``), as wide as
    those kernels' own. Where its vectors are narrower than theirs (numba
    compiling without AVX-512, or ``NUMRNN_VECTOR_BYTES=32``), BLAS keeps the
    rows, as before: a core with full-width AVX-512 units may do twice the
    packed product's multiply-adds there (not measured).
    ``NUMRNN_PACKED_PRODUCT_ROWS`` overrides the choice.
    """
    configured = _env_int("NUMRNN_PACKED_PRODUCT_ROWS", 0)
    if configured is not None:
        return configured
    if vector_bytes() < 64 and _openblas_has_avx512_kernels():
        return 0
    return PACKED_PRODUCT_MAX_ROWS


#: OpenBLAS cores with AVX-512 small-matrix GEMM kernels.
_AVX512_CORES = ("skylakex", "cooperlake", "sapphirerapids")


def _openblas_has_avx512_kernels() -> bool:
    """Whether an OpenBLAS that the kernels' GEMMs may call runs its AVX-512 kernels."""
    for path in _openblas_paths():
        try:
            corename = ctypes.CDLL(path).scipy_openblas_get_corename
        except (OSError, AttributeError):
            continue
        corename.restype = ctypes.c_char_p
        if corename().decode().lower() in _AVX512_CORES:
            return True
    return False


def pool() -> ThreadPoolExecutor:
    """The process-wide worker pool (threads created once; each task sets single-threaded BLAS itself)."""
    global _POOL
    if _POOL is None:
        with _POOL_LOCK:
            if _POOL is None:
                _POOL = ThreadPoolExecutor(max_workers=max(2, cores()), thread_name_prefix="numrnn")
    return _POOL


def _hold_blas_setting() -> None:
    """Before ``fork``: wait until no thread is setting BLAS's thread count, and keep others from starting.

    The setter is a ctypes call, which releases the GIL: another thread could
    fork while one was inside it. The child then inherited OpenBLAS's lock
    held, and its next setter call waited forever, or a count of 1 with no
    block open to give the caller's back (a probe forking while three
    threads called layers: 8 hangs in about 1300 forks; beside two calling
    threads, 30 such counts in 950).
    """
    _BLAS_LOCK.acquire()


def _release_blas_setting() -> None:
    """After ``fork``, in the parent: :func:`_hold_blas_setting` undone."""
    _BLAS_LOCK.release()


def _forget_in_child() -> None:
    """After ``fork``: the child has none of the parent's threads, so neither its pool nor a lock one of them held.

    A child that used the parent's pool waited forever for tasks no thread
    would run; one forked inside a ``single_threaded_blas`` block gives BLAS
    back the count that block saved.
    """
    global _POOL, _POOL_LOCK, _BLAS_LOCK, _BLAS_USERS
    _POOL, _POOL_LOCK = None, threading.Lock()
    if _BLAS_USERS:
        for setter, n in zip(_blas_setters(), _BLAS_SAVED):
            setter(n)
    _BLAS_LOCK, _BLAS_USERS = threading.Lock(), 0


if hasattr(os, "register_at_fork"):  # no fork on Windows
    os.register_at_fork(before=_hold_blas_setting, after_in_parent=_release_blas_setting,
                        after_in_child=_forget_in_child)
