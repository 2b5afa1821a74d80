"""CPU target, unit split: one call run by ``spec.unit_split`` threads, each owning a slice of the units.

Small batches leave nothing to split over rows, and at one row a layer is a
chain of matrix-vector products bound by reading the recurrent weights. Split
the hidden units instead: worker ``w`` of ``n`` computes units ``[w*U/n,
(w+1)*U/n)`` of every layer, every gate, from its own column slice of the
weights (half the bytes per core at ``n = 2``, so a 1 MiB ``LSTM(256)``
recurrent matrix fits the two 512 KiB L2 caches) and its own slice of the
hoisted input projection. Step ``s`` needs all of ``h`` from step ``s - 1``,
so after every step the workers exchange it (:func:`_emit_send`,
:func:`_emit_receive`): each stores its new ``h`` in stamped cache lines of
the layer's exchange buffer ``xb`` and copies the others' into its own
``hp`` once their stamps show the step. The lines are double-buffered by
the step's parity, so a worker overwrites its lines only after every other
worker has read them (each had to send its own step in between).

Two cells read a buffer whole within the step, after each worker computed
its units of it: a GRU that resets before its product (``r * h``, which
``U_h`` multiplies) and an LSTM projection (``o * tanh(c)``, projected to
``h``). Their layers gather it from every worker there, through the same
lines at the next epoch (:func:`_emit_gather`), two exchanges a step. A
projection's worker owns ``proj_units / n`` columns of ``h`` and of the
outputs beside its ``units / n`` of ``c``.

A worker writes its outputs of a step after it sends that step's ``h``
(``LayerContext.defer_output``), and before it sends the next step's, or,
at the last step, before it sends that one: once a layer's last exchange
is done every worker's outputs of the layer can be read. Written before
the send, they held the others up: where a row of the output starts off a
cache line, the workers' columns share the line at their boundary, and a
store to it waited for the other core's copy ahead of the stamps (tiny64's
split kernel, this order against the other, calls by turns in one process:
26.4 against 27.8 us; on an output that starts on a line, 25.9 against
26.6). The barrier
(``numrnn.runtime.sync.barrier``) is left for the merge of a
bidirectional block, whose merged columns the next block reads.

Everything a worker writes is its own: its columns of ``h``, ``c``, the
outputs and a merged bidirectional output, so masking, reversal and merging
work as in the unsplit kernel. Buffers that more than one worker reads (the
``h`` exchanges, the outputs of inner layers and blocks) come from the
module's ``shared_buffers(T, T_out, B)``, which the runtime allocates (and
keeps for the next call of the same shape) and passes to every worker.

At one row a layer whose slice of the recurrent matrix is read from L2 (or
just past it; ``codegen.targets.cpu.fuses_projection``) projects its input
as it goes: the kernel skips the hoisted projection, the layer projects the
first block of ``FUSED_ROWS`` rows before its loop, and each step's
product projects a slice of the next block in the same passes
(``codegen.cells.common.emit_fused_product``). The product alone leaves
half the multiply-adds idle while it waits for its weights; the
projection's slice fills them.

Kernel signature: the unsplit kernel's, each weight with every worker's
slice stacked on a first axis (``numrnn.codegen.cells.split_packed``; a
worker takes ``[me]``), then ``me`` (worker index), ``flags``
(``numrnn.runtime.sync`` layout) and the shared buffers: one worker's job,
which differs from the others' in ``me`` only. Then ``ctl``, ``box`` and
``role``: every split kernel (this one and the direction split's) is also its
own job loop (:func:`job_loop`). Worker 0, the lead, posts the other workers'
jobs to partners that wait in the loop of this kernel
(``numrnn.runtime.partners``); a partner, its job done, waits there for the
next one.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import replace
from functools import partial

from codegen.cells import emitter_for, packed_names, recurrent_names
from codegen.cells.common import ITEMSIZE, emit_output_pass, emit_scratch_for_output, emit_step_times
from codegen.emit import Emitter
from codegen.spec import StackSpec
from codegen.targets.cpu import (
    FUSED_PARAMS,
    VIEW,
    Layer,
    NewArrays,
    _needs_merge,
    chain_of,
    condition_args,
    emit_chain_calls,
    emit_each_layer,
    emit_first_projection_block,
    emit_fuse_flag,
    emit_input_projection,
    fused_arguments,
    fuses_projection,
    input_bias_args,
    layers_of,
    merge_expression,
    njit_function,
)
from codegen.targets.cpu import kernel_arguments as unsplit_kernel_arguments


def slice_width(layer: Layer, spec: StackSpec) -> int:
    """Units of ``layer`` that one worker owns."""
    return layer.cell.units // spec.unit_split


def output_slice_width(layer: Layer, spec: StackSpec) -> int:
    """Columns of ``layer``'s ``h`` (and outputs) that one worker owns: its units, or its share of a projection."""
    return layer.cell.output_size // spec.unit_split


def exchange_widths(layer: Layer, spec: StackSpec) -> set[int]:
    """Values per row that one worker sends in ``layer``'s exchanges: its ``h``, and its gathered buffers'."""
    gathered = emitter_for(layer.cell).gathered_names(layer.cell)
    return {output_slice_width(layer, spec)} | ({slice_width(layer, spec)} if gathered else set())


def shared_buffers(spec: StackSpec) -> list[tuple[str, str]]:
    """``(name, allocation expression in T, T_out, B)`` of every buffer the workers share, in argument order.

    Each layer's ``xb``: its ``h`` exchange (:func:`_emit_send`), zeroed,
    as its stamps must start below every epoch.
    """
    layers, buffers = layers_of(spec), []
    for layer in layers:
        buffers.append((exchange_buffer(layer), allocation(exchange_shape(layer, spec), "int64", zeroed=True)))
    for bi, block in enumerate(spec.blocks):
        chain_ends = {chain_of(layers, bi, di)[-1].index for di in range(len(block.directions))}
        for layer in layers:
            if layer.block == bi and layer.index not in chain_ends:
                buffers.append((f"seq{layer.index}", allocation(f"(T, B, {layer.cell.output_size})", spec.dtype)))
        buffers.extend(block_buffers(spec, bi))
    return buffers


#: int64 slots of one line of an exchange buffer (64 bytes): values in all but the last, which holds the stamp.
LINE_SLOTS = 8


def exchange_buffer(layer: Layer) -> str:
    """The name of ``layer``'s ``h`` exchange buffer."""
    return f"xb{layer.index}"


def exchange_shape(layer: Layer, spec: StackSpec) -> str:
    """The shape expression (in ``B``) of ``layer``'s exchange buffer: ``(2, workers, B * lines, LINE_SLOTS)``.

    Even and odd steps, then each worker's lines: ``lines`` per row of its ``h``
    or of a gathered buffer, whichever is wider (:func:`exchange_layout`).
    """
    return f"(2, {spec.unit_split}, B * {row_lines(layer, spec)}, {LINE_SLOTS})"


def row_lines(layer: Layer, spec: StackSpec) -> int:
    """Lines a row of one worker's part of ``layer``'s exchange buffer has room for: its widest exchange's.

    Every exchange of the layer starts each worker's part at the same place,
    whatever its own width: parts placed by a narrower exchange's lines
    would overlap another worker's (or the other parity's) part of a wider one.
    """
    return max(exchange_layout(spec, width)[1] for width in exchange_widths(layer, spec))


def exchange_layout(spec: StackSpec, width: int) -> tuple[int, int]:
    """Values of one exchange line, and lines per row of one worker's ``width`` values."""
    per_line = (LINE_SLOTS - 1) * 8 // ITEMSIZE[spec.dtype]
    return per_line, -(-width // per_line)


def block_buffers(spec: StackSpec, bi: int) -> list[tuple[str, str]]:
    """The shared outputs of block ``bi``: both directions side by side (``dest``), merged (``merged``).

    The last block writes straight into ``y`` unless it merges.
    """
    block, last_block = spec.blocks[bi], bi == len(spec.blocks) - 1
    if _needs_merge(block):
        width = sum(d.output_size for d in block.directions)
        merged = [] if last_block else [(f"merged{bi}", allocation(f"(T, B, {block.output_size})", spec.dtype))]
        return [(f"dest{bi}", allocation(f"({'T_out' if last_block else 'T'}, B, {width})", spec.dtype)), *merged]
    return [] if last_block else [(f"dest{bi}", allocation(f"(T, B, {block.output_size})", spec.dtype))]


def allocation(shape: str, dtype: str, zeroed: bool = False) -> str:
    # Aligned, so that two workers' slices of a row share no cache line where the slices are whole lines
    # (tiny64 split, h exchange 16 or 32 bytes off a line: 0.5-1.5 us a call slower).
    return f"{ALIGNED_ZEROS if zeroed else ALIGNED_EMPTY}({shape}, np.{dtype})"


def emit_shared_buffers_function(em: Emitter, buffers: list[tuple[str, str]]) -> None:
    """The module's ``shared_buffers(T, T_out, B)``: every buffer the workers of one call share."""
    with em.block("def shared_buffers(T, T_out, B):"):
        em('"""Buffers every worker of one call reads (the runtime keeps a set per call shape)."""')
        allocations = "".join(f"{made}, " for _, made in buffers)
        em(f"return ({allocations.rstrip()})")  # (), (a,) or (a, b,): a split of one concatenated block shares none
    em.blank()
    em.blank()


def kernel_arguments(spec: StackSpec, buffers: list[tuple[str, str]] | None = None) -> list[str]:
    """A split kernel's parameter names, in order: the unsplit kernel's, ``me``, ``flags``, the ``buffers``.

    ``buffers`` defaults to the unit split's :func:`shared_buffers`, whose
    kernel takes every weight stacked over the workers (:func:`stacked`).
    """
    if buffers is not None:
        return [*unsplit_kernel_arguments(spec, workspace=False), "me", "flags", *(name for name, _ in buffers)]
    weights = {a for layer in layers_of(spec) for a in layer.weight_args()}
    names = [stacked(a) if a in weights else a for a in unsplit_kernel_arguments(spec, workspace=False)]
    return [*names, "me", "flags", *(name for name, _ in shared_buffers(spec))]


def stacked(weight: str) -> str:
    """The unit-split kernel's argument holding every worker's slice of ``weight``."""
    return f"{weight}_workers"


#: The names split kernel modules give :func:`codegen.cells.aligned_empty` and :func:`codegen.cells.aligned_zeros`.
ALIGNED_EMPTY, ALIGNED_ZEROS = "_aligned_empty", "_aligned_zeros"
#: What split kernel modules import from ``numrnn.runtime.sync``.
SYNC_IMPORTS = ("GENERATION, LEAD, PARTNER_WAIT_ROUNDS, SERVE, STANDBY, atomic_store, await_partners, await_stamp, "
                "barrier, next_job, post_jobs, publish, receive")


def partner_tag(spec: StackSpec) -> int:
    """The number a partner waiting in this spec's job loop shows (> 0; ``numrnn.runtime.sync``)."""
    return int(spec.cache_key()[:15], 16) + 1


@contextmanager
def job_loop(em: Emitter, spec: StackSpec, arguments: list[str], workers: int, docstring: str):
    """The split kernel ``def``, its body (the ``with`` block's lines) run once per job.

    Called with ``role=LEAD`` it first posts the partners' jobs, its own with
    ``me`` set to each partner's index (returning False, having run nothing,
    when they are not all waiting in this kernel); with ``LEAD_COLD`` it runs
    its job as given; either lead then waits for its partners. With
    ``role=SERVE`` it runs the job it was called with, then every job posted
    to its box until it leaves the loop; with ``STANDBY``, only the jobs
    posted (``numrnn.runtime.partners.Partners.stand_by``).
    """
    job = _nested_tuple(arguments)
    with njit_function(em, spec.dtype, f"{spec.kernel_name()}({', '.join([*arguments, 'ctl', 'box', 'role'])})",
                       docstring):
        em(f"job = {job}")
        with em.block("if role == LEAD:"):
            with em.block(f"for w in range(1, {workers}):"):
                em(f"publish(box[w], {_nested_tuple(['w' if a == 'me' else a for a in arguments])})")
            with em.block(f"if not post_jobs(ctl, np.int64({workers}), PARTNER_TAG):"):
                em("return False")
        with em.block("elif role == STANDBY:"):
            _emit_next_job(em)
            em("role = SERVE")
        with em.block("while True:"):
            em(f"{job} = job")
            yield
            with em.block("if role != SERVE:"):
                em(f"await_partners(ctl, np.int64({workers}))", "return True")
            _emit_next_job(em)


def _emit_next_job(em: Emitter) -> None:
    """A partner waits in the job loop for its next job, into ``job``; the kernel returns if none comes."""
    with em.block("if not next_job(ctl, me, PARTNER_TAG, np.int64(PARTNER_WAIT_ROUNDS)):"):
        em("return True")
    em("job = receive(box[me], job)")


#: Names per inner tuple of a job: CPython builds a tuple display of more than 30 names through a
#: list, which numba's bytecode rewrite refuses when those names are also assigned in a loop.
JOB_GROUP = 16


def _nested_tuple(names: list[str]) -> str:
    """``((a, b, ...), (...),)``: ``names`` as a tuple of tuples of at most :data:`JOB_GROUP` each."""
    groups = ["(" + ", ".join(names[i:i + JOB_GROUP]) + ",)" for i in range(0, len(names), JOB_GROUP)]
    return f"({', '.join(groups)},)"


def emit_partner_tag(em: Emitter, spec: StackSpec) -> None:
    """``PARTNER_TAG``, the constant the module's job loop waits under.

    An ``np.int64``, as every integer constant the job loop passes to
    ``numrnn.runtime.sync``: numba types a plain literal by its value and
    would compile the functions it is passed to once per kernel.
    """
    em(f"PARTNER_TAG = np.int64({partner_tag(spec)})")
    em.blank()
    em.blank()


def emit_split_module_body(em: Emitter, spec: StackSpec) -> None:
    """The layer functions, ``shared_buffers`` and the kernel of a unit-split spec."""
    layers = layers_of(spec)
    emit_each_layer(em, spec, layers, _emit_layer_function)
    emit_shared_buffers_function(em, shared_buffers(spec))
    emit_partner_tag(em, spec)
    _emit_kernel(em, spec, layers)


def _emit_layer_function(em: Emitter, spec: StackSpec, layer: Layer) -> None:
    """One worker's share of a layer: its states in private contiguous copies, ``h`` exchanged per step.

    The step code is the unsplit emitter's, on ``n`` units: ``h`` and ``c``
    are this worker's contiguous slices (strided views would keep LLVM from
    vectorizing the gate loop), and the product reads the whole previous
    ``h`` from the worker's own copy (``hp``), which the exchange fills
    after each step with this worker's new ``h`` and the others'. No
    barrier starts the layer: ``hp`` starts as the whole initial state, and
    the previous layer's outputs were all written before its last exchange.
    A cell that reads a scratch buffer whole within the step (its
    ``gathered_names``: a reset-before GRU's ``r * h``, a projection's ``o *
    tanh(c)``) exchanges it there too, into ``<name>_all``
    (:func:`_emit_gather`). An LSTM projection's worker owns ``proj_units /
    n`` columns of ``h`` (from ``h0``) beside its units of ``c``.
    """
    cell = layer.cell
    n, m = slice_width(layer, spec), output_slice_width(layer, spec)
    emitter = emitter_for(cell)
    fused = fuses_projection(layer.context, n)
    gathered = emitter.gathered_names(cell)
    split_cell = replace(cell, units=n, proj_units=m if cell.proj_units else None)
    ctx = replace(layer.context, cell=split_cell, recurrent_input="hp", fused_projection=fused,
                  defer_output=True, inline_one_row=not fused,
                  gather=partial(_emit_gather, spec=spec, layer=layer) if gathered else None)
    others = list(cell.state_names[1:])
    params = ["xw", *input_bias_args(cell), *recurrent_names(cell), "hstate", *(f"{o}state" for o in others),
              *condition_args(spec), "out", "small", "xb", "u0", "flags", "me", "epoch",
              *(FUSED_PARAMS if fused else [])]
    docstring = f"This worker's units [u0, u0 + {n}) of the layer; returns the epoch it reached (its last stamp)."
    with njit_function(em, spec.dtype, f"{layer.function}({', '.join(params)})", docstring, gate_width=n):
        em("T = xw.shape[0]", "B = xw.shape[1]")
        states = _StateSlices(cell, n, m)
        states.emit_offsets(em)
        for name, width in states.widths:
            em(f"{name} = np.empty((B, {width}), dtype=np.{spec.dtype})")
        states.emit_copies(em, lambda name, offset: (f"{name}[b, j]", f"{name}state[b, {offset} + j]"))
        em(f"hp = np.empty((B, {cell.output_size}), dtype=np.{spec.dtype})")
        _emit_copy(em, cell.output_size, ("hp[b, j]", "hstate[b, j]"))
        # Zeros: a masked row's product reads its row of the buffer, which no exchange may have filled yet.
        em(*(f"{_whole(name)} = np.zeros((B, {cell.units}), dtype=np.{spec.dtype})" for name in gathered))
        emitter.emit_scratch(em, ctx, spec.dtype)
        emit_scratch_for_output(em, ctx, spec.dtype)
        if fused:
            emit_first_projection_block(em, ctx)
        em("xb_slots = xb.reshape(xb.size)", f"xb_values = xb_slots.view(np.{spec.dtype})")
        with em.block("for s in range(T):"):
            emit_step_times(em, ctx)
            emitter.emit_step(em, ctx)
            em("epoch += 1")
            # The outputs after this step's h is sent, off the path the others wait on; the last step's
            # before, so that every output of the layer can be read once its last exchange is done.
            with em.block("if s == T - 1:"):
                emit_output_pass(em, ctx)
            h_lines = _ExchangeLines(spec, layer, m)
            _emit_send(em, spec, h_lines, "h", "hp", states.offset("h"))
            with em.block("if s < T - 1:"):
                emit_output_pass(em, ctx)
            _emit_receive(em, spec, h_lines, "hp")
        states.emit_copies(em, lambda name, offset: (f"{name}state[b, {offset} + j]", f"{name}[b, j]"))
        em("return epoch")


class _StateSlices:
    """A split layer's states, each a worker's slice: ``h`` of ``m`` columns from ``h0`` (``u0`` when ``m``
    is ``n``), the others of ``n`` units from ``u0``."""

    def __init__(self, cell, n: int, m: int):
        self.widths = [("h", m), *((name, n) for name in cell.state_names[1:])]
        self._h0 = None if m == n else f"me * {m}"

    def emit_offsets(self, em: Emitter) -> None:
        """``h0``, where ``h``'s slice starts elsewhere than the units' (``u0``, a parameter)."""
        if self._h0 is not None:
            em(f"h0 = {self._h0}")

    def offset(self, name: str) -> str:
        """The first column of the worker's slice of state ``name``."""
        return "h0" if name == "h" and self._h0 is not None else "u0"

    def emit_copies(self, em: Emitter, pair) -> None:
        """``dst = src`` for ``pair(name, offset)`` of every state, one loop per width."""
        for width in dict.fromkeys(width for _, width in self.widths):
            _emit_copy(em, width, *(pair(name, self.offset(name)) for name, w in self.widths if w == width))


def _whole(name: str) -> str:
    """The buffer that gathers every worker's units of the scratch buffer ``name``."""
    return f"{name}_all"


def _emit_gather(em: Emitter, name: str, *, spec: StackSpec, layer: Layer) -> str:
    """``LayerContext.gather`` of a split layer: exchange this step's ``name`` as ``h`` is exchanged, into
    :func:`_whole` (``name``); return that name.

    The exchange takes the next epoch and the same exchange buffer, lines and
    parities as ``h``'s: a worker still rewrites a line only after every other
    worker has sent the exchange between, which each sent after reading the line.
    """
    lines = _ExchangeLines(spec, layer, slice_width(layer, spec))
    whole = _whole(name)
    em("epoch += 1")
    _emit_send(em, spec, lines, name, whole, "u0")
    _emit_receive(em, spec, lines, whole)
    return whole


def _emit_send(em: Emitter, spec: StackSpec, lines: _ExchangeLines, source: str, whole: str, offset: str) -> None:
    """The first half of an exchange: this worker's ``lines.n`` values a row of ``source`` (its new ``h``, or a
    buffer to gather) to the others, and into its ``whole`` copy (``hp``) from column ``offset``.

    The layer's exchange buffer has int64 slots ``xb_slots`` and values
    ``xb_values`` (the same memory). Row ``b`` of a worker's ``source`` fills
    lines ``b * lines ..`` of its lines for the epoch's parity, ``per_line``
    values each, and each line's last slot gets the epoch after its values,
    with release ordering (``numrnn.runtime.sync``). A worker rewrites the
    lines of one parity two exchanges later, once every other worker has
    sent the exchange between, which it sent after reading them
    (:func:`_emit_receive`).

    Emitted inline with the line layout as constants: an exchange made by a
    function over views of the buffer cost a tiny64 split call 5-7 us of 29
    (its references to the arrays), and one with the layout computed at run
    time 2-5 us more than this.
    """
    em(f"mine = ((epoch % 2) * {spec.unit_split} + me) * B * {lines.part_slots}")
    lines.emit(em, "mine", f"xb_values[{lines.ratio} * at + i] = {source}[b, line * {lines.per_line} + i]",
               stamped=True)
    _emit_copy(em, lines.n, (f"{whole}[b, {offset} + j]", f"{source}[b, j]"))


def _emit_receive(em: Emitter, spec: StackSpec, lines: _ExchangeLines, whole: str) -> None:
    """The second half of an exchange: for each other worker, wait for the stamps of its lines
    (:func:`numrnn.runtime.sync.await_stamp`), then copy its values into ``whole``."""
    workers = spec.unit_split
    with em.block(f"for w in range({workers}):"):
        with em.block("if w != me:"):
            em(f"theirs = ((epoch % 2) * {workers} + w) * B * {lines.part_slots}")
            with em.block(f"for line in range(B * {lines.count}):"):
                em(f"await_stamp(xb_slots, theirs + line * {LINE_SLOTS} + {LINE_SLOTS - 1}, epoch, flags)")
            lines.emit(em, "theirs", f"{whole}[b, w * {lines.n} + line * {lines.per_line} + i] = "
                       f"xb_values[{lines.ratio} * at + i]", stamped=False)


class _ExchangeLines:
    """One worker's lines of an exchange, per row: ``count`` lines of ``per_line`` of its ``n`` values, in a part
    of the buffer with ``part_slots`` slots a row (:func:`row_lines`)."""

    def __init__(self, spec: StackSpec, layer: Layer, width: int):
        self.n = width
        self.per_line, self.count = exchange_layout(spec, width)
        self.part_slots = row_lines(layer, spec) * LINE_SLOTS
        self.ratio = 8 // ITEMSIZE[spec.dtype]  # values per int64 slot

    def emit(self, em: Emitter, start: str, assignment: str, *, stamped: bool) -> None:
        """``assignment`` for each value of every row's lines from slot ``start``; each line stamped after its
        values if ``stamped``."""
        with em.block("for b in range(B):"):
            with em.block(f"for line in range({self.count}):"):
                em(f"at = {start} + (b * {self.count} + line) * {LINE_SLOTS}")
                with em.block(f"for i in range(min({self.per_line}, {self.n} - line * {self.per_line})):"):
                    em(assignment)
                if stamped:
                    em(f"atomic_store(xb_slots, at + {LINE_SLOTS - 1}, epoch)")


def _emit_copy(em: Emitter, n: int, *pairs: tuple[str, str]) -> None:
    """``dst = src`` for every row ``b`` and unit ``j < n``, as loops.

    Loops rather than slice assignments: numba's generic strided setitem took
    the cold compile of a three-layer split stack from 9 to 20 s.
    """
    with em.block("for b in range(B):"):
        with em.block(f"for j in range({n}):"):
            em(*(f"{dst} = {src}" for dst, src in pairs))


def _emit_kernel(em: Emitter, spec: StackSpec, layers: list[Layer]) -> None:
    with job_loop(em, spec, kernel_arguments(spec), spec.unit_split,
                  "Worker ``me`` of the call: its slice of every layer, in step with the other workers."):
        em(*(f"{weight} = {stacked(weight)}[me]" for layer in layers for weight in layer.weight_args()))
        em("T = x.shape[0]", "B = x.shape[1]", "inp = x", "epoch = flags[GENERATION]")
        for bi, block in enumerate(spec.blocks):
            last_block = bi == len(spec.blocks) - 1
            em(f"# block {bi}")
            em(f"dest = dest{bi}" if _needs_merge(block) or not last_block else "dest = y")
            for di, direction in enumerate(block.directions):
                chain = chain_of(layers, bi, di)
                em(f"# block {bi}, direction {di} ({direction.reverse})", "src = inp")
                emit_chain_calls(em, spec, chain, _emit_layer_call)
            if _needs_merge(block):
                _emit_merge(em, spec, block, chain[-1], "y" if last_block else f"merged{bi}")
                if not last_block:
                    em("epoch += 1", f"barrier(flags, me, {spec.unit_split}, epoch)", f"inp = merged{bi}")
            elif not last_block:
                em("inp = dest")


def _emit_layer_call(em: Emitter, spec: StackSpec, layer: Layer, *, is_last: bool) -> None:
    cell, n, m = layer.cell, slice_width(layer, spec), output_slice_width(layer, spec)
    weights = dict(zip(packed_names(cell), layer.weight_args()))
    em(f"u0 = me * {n}")
    fused = fuses_projection(layer.context, n)
    deferred = emit_fuse_flag(em, layer, spec.dtype) if fused else None
    emit_input_projection(em, spec, layer, weights, NewArrays(spec.dtype), deferred)
    out = "dest" if is_last else f"seq{layer.index}"
    recurrent = [weights[name] for name in recurrent_names(cell)]
    bias = [weights["b"]] if cell.use_bias else []
    args = [f"{VIEW}(xw, 0, (T, B, {cell.gates * n}))", *bias, *recurrent, *layer.state_args(), *condition_args(spec),
            f"{out}[:, :, {'u0' if m == n else f'me * {m}'}:]", "small", exchange_buffer(layer), "u0", "flags", "me",
            "epoch",
            *(fused_arguments(weights) if fused else [])]
    em(f"epoch = {layer.function}({', '.join(args)})")
    if not is_last:
        em(f"src = seq{layer.index}")


def _emit_merge(em: Emitter, spec: StackSpec, block, last: Layer, target: str) -> None:
    """Merge this worker's columns of both directions (it wrote both, so no barrier is needed first)."""
    w, n = block.directions[0].output_size, output_slice_width(last, spec)
    fw, bw = "dest[t, b, u0 + j]", f"dest[t, b, {w} + u0 + j]"
    expr = merge_expression(block.merge, fw, bw)
    em(f"u0 = me * {n}")
    with em.block(f"for t in range({target}.shape[0]):"):
        _emit_copy(em, n, (f"{target}[t, b, u0 + j]", expr))
