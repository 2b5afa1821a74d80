"""The packed recurrent product's micro-kernel, as one numba intrinsic that writes its LLVM loop directly.

LLVM vectorizes a loop over an array, but it keeps the partial sums of a
matrix product in memory (it cannot prove that the output does not alias the
weights), so each multiply-add of the old hand loop was a load, a store and
two weight loads. :func:`panel_block` holds a block of outputs in vector
registers over the whole input loop: the 4x128x512 product of bidir_masked's
workers went 18.2 -> 9.5 us (one thread, AVX2 Zen 3, one call from Python at
a time; figures from a loop inside ``@njit`` are in
``numrnn.runtime.schedule.packed_product_rows``).

A vector is ``codegen.cells.common.vector_bytes()`` bytes: 32 (8 float32 or
4 float64 lanes, one AVX register) or, where numba compiles for AVX-512, 64
(LLVM splits a vector wider than the machine's). A multiply-add is one fused multiply-add for
float32, whose kernels may contract anyway (``codegen.targets.cpu.FAST_MATH``),
and a multiply then an add for float64, which stays exact.

The block used to be Python source of six small intrinsics (a load, a
broadcast, a multiply-add ... per vector), an ``@njit`` function per block
shape in the shared module: seven functions that compiled in 5.1 s on a
cold machine. Written out in one function, they still took 2.9 s, 1.5 s of
it numba typing and lowering those calls (about 400) one by one. Built
here, a block is one call to type, and its IR is the same loop; the
module's C entries compile in 1.2-1.4 s. The module's source names the
vector width and ``PANEL_VECTORS``
(``codegen.targets.cpu.generate_shared``), so that a change of either
changes its name and so its disk cache.

Indices are not checked: the callers are generated loops whose bounds come
from the arrays' shapes, or (a unit-split layer's one-row product) from the
spec that the layer's buffers and panels are made from too.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from codegen.cells.common import FUSED_PANELS, FUSED_ROWS, PANEL_VECTORS, vector_bytes
from numrnn.runtime.extern import is_c_array


@intrinsic
def panel_block(typingctx, h, wp, out, row, p, cols, rows, panels):
    """``out[row:row + rows, block] = h[row:row + rows] @ panels p..p+panels-1`` of ``wp``.

    ``wp`` is ``(panels, inputs, P)``, C-contiguous, ``P`` being
    :data:`PANEL_VECTORS` vectors; ``h`` (``inputs`` columns) and ``out``
    (the matrix's outputs) are C-contiguous with one row per batch row.
    ``rows`` and ``panels`` are literal integers. With one panel, only its
    first ``cols`` columns are stored (the matrix's last, partial panel);
    with more, all of them. A literal ``cols`` settles which when the block
    compiles (the inline one-row product,
    ``codegen.cells.common.emit_one_row_product``). Each output adds its
    terms in input order, one multiply-add each.
    """
    if not (is_c_array(h, 2) and is_c_array(wp, 3) and is_c_array(out, 2)
            and h.dtype == wp.dtype == out.dtype and isinstance(h.dtype, types.Float)
            and isinstance(rows, types.IntegerLiteral) and isinstance(panels, types.IntegerLiteral)
            and all(isinstance(a, types.Integer) for a in (row, p, cols))):
        return None
    block = _Block(h.dtype, rows.literal_value, panels.literal_value)
    known_cols = cols.literal_value if isinstance(cols, types.IntegerLiteral) else None

    def codegen(context, builder, sig, args):
        arrays = [context.make_array(t)(context, builder, a) for t, a in zip(sig.args[:3], args[:3])]
        row_, p_, cols_ = (context.cast(builder, a, t, types.int64) for a, t in zip(args[3:6], sig.args[3:6]))
        block.emit(builder, *arrays, row_, p_, cols_, known_cols)
        return context.get_dummy_value()

    return types.none(h, wp, out, row, p, cols, rows, panels), codegen


@intrinsic
def fused_block(typingctx, h, up, out, x, wp, xw, p, row, q, v, valid, rec_panels):
    """Row 0 of ``h`` times ``rec_panels`` panels of ``up``, and ``FUSED_ROWS`` rows of ``x`` times a vector of ``wp``.

    The first is a pass of the recurrent product (``out[0, panels p..]``,
    as :func:`panel_block` computes it with one row); the second is a
    slice of a later step's input projection: rows ``row..row +
    FUSED_ROWS - 1`` of ``xw`` at vector ``v`` of panel ``q``, of which
    only the first ``valid`` lanes are stored (the matrix's last, partial
    panel). ``rec_panels`` is a literal, :data:`FUSED_PANELS` or 0 (the
    projection alone). At one row the product loads one weight vector per
    multiply-add, so reading its matrix from L2 leaves half the
    multiply-adds idle; the projection's slice loads one weight vector per
    :data:`FUSED_ROWS` multiply-adds and fills them
    (``codegen.cells.common.emit_fused_product``).

    The two share one loop over their common inputs, then each finishes
    its own (the recurrent matrix has ``units`` inputs, the input kernel
    ``inputs``). Every output adds its terms in input order, one
    multiply-add each, as :func:`panel_block` does: the same sums.
    """
    arrays, integers = (h, up, out, x, wp, xw), (p, row, q, v, valid)
    if not (all(is_c_array(a, n) for a, n in zip(arrays, (2, 3, 2, 2, 3, 2)))
            and len({a.dtype for a in arrays}) == 1 and isinstance(h.dtype, types.Float)
            and isinstance(rec_panels, types.IntegerLiteral) and rec_panels.literal_value in (0, FUSED_PANELS)
            and all(isinstance(a, types.Integer) for a in integers)):
        return None
    block = _FusedBlock(h.dtype, rec_panels.literal_value)

    def codegen(context, builder, sig, args):
        made = [context.make_array(t)(context, builder, a) for t, a in zip(sig.args[:6], args[:6])]
        scalars = [context.cast(builder, a, t, types.int64) for a, t in zip(args[6:11], sig.args[6:11])]
        block.emit(builder, *made, *scalars)
        return context.get_dummy_value()

    return types.none(*arrays, *integers, rec_panels), codegen


@intrinsic
def full_width_vectors(typingctx):
    """Let LLVM vectorize the calling function's loops with :func:`vector_bytes`-byte registers (a statement).

    On Intel cores with AVX-512 LLVM prefers 32-byte vectors for the loops
    it vectorizes itself (its ``prefer-256-bit`` tuning), so a kernel's
    gate loops ran at half the width that the packed product's explicit
    vectors use. The function attribute ``prefer-vector-width`` lifts that
    for the function being compiled; numba has no option for it, and
    llvmlite admits only the attributes it lists, so the string attribute is
    put in the attribute set directly. An elementwise loop (the gates)
    computes the same operations on more lanes at a time, to the same bits
    (a test runs both widths); a sum that fastmath lets LLVM vectorize (an
    LSTM projection's dot products) adds its terms in another order.
    Measured on Emerald Rapids, the gates of an LSTM(128) step at 8 rows
    (one thread, medians of 7 x 10,000 steps): 1.72 -> 1.28 us.
    """

    def codegen(context, builder, sig, args):
        set.add(builder.function.attributes, f'"prefer-vector-width"="{vector_bytes() * 8}"')
        return context.get_dummy_value()

    return types.none(), codegen


class _Block:
    """The LLVM IR of one block shape: ``rows`` rows by ``panels`` panels of ``dtype``."""

    def __init__(self, dtype: types.Float, rows: int, panels: int):
        self.rows, self.panels = rows, panels
        self.exact = dtype.bitwidth == 64
        self.scalar = ir.DoubleType() if self.exact else ir.FloatType()
        self.lanes = vector_bytes() // (dtype.bitwidth // 8)
        self.vector = ir.VectorType(self.scalar, self.lanes)
        self.align = dtype.bitwidth // 8

    def emit(self, builder: ir.IRBuilder, h, wp, out, row, p, cols, known_cols: int | None = None) -> None:
        """The block at the builder's position: zeroed accumulators, the input loop, the stores.

        ``known_cols``: ``cols`` as a constant, if it is one: a single
        panel's stores are then chosen here rather than by a branch.
        """
        inputs, width = cgutils.unpack_tuple(builder, wp.shape)[1:]
        h_stride = cgutils.unpack_tuple(builder, h.shape)[1]
        out_stride = cgutils.unpack_tuple(builder, out.shape)[1]
        vectors = [(q, v) for q in range(self.panels) for v in range(PANEL_VECTORS)]
        acc = {}
        for r in range(self.rows):
            for qv in vectors:
                acc[r, qv] = cgutils.alloca_once(builder, self.vector)
                builder.store(ir.Constant(self.vector, [0.0] * self.lanes), acc[r, qv])
        with cgutils.for_range(builder, inputs) as loop:
            k = loop.index
            weights = {}
            for q, v in vectors:
                panel_row = builder.add(builder.mul(builder.add(p, _i64(q)), inputs), k)
                start = builder.add(builder.mul(panel_row, width), _i64(v * self.lanes))
                weights[q, v] = self._load(builder, wp.data, start)
            for r in range(self.rows):
                x = self._splat(builder, h.data, builder.add(builder.mul(builder.add(row, _i64(r)), h_stride), k))
                for qv in vectors:
                    builder.store(self._muladd(builder, x, weights[qv], builder.load(acc[r, qv])), acc[r, qv])
        first = builder.mul(p, width)

        def start_of(r, column):
            return builder.add(builder.mul(builder.add(row, _i64(r)), out_stride), builder.add(first, column))

        def store_all():
            for r in range(self.rows):
                for q, v in vectors:
                    column = _i64((q * PANEL_VECTORS + v) * self.lanes)
                    pointer = self._vector_pointer(builder, out.data, start_of(r, column))
                    builder.store(builder.load(acc[r, (q, v)]), pointer, align=self.align)

        panel_columns = PANEL_VECTORS * self.lanes
        if self.panels > 1 or (known_cols is not None and known_cols >= panel_columns):
            store_all()
            return
        if known_cols is not None:
            for v in range(PANEL_VECTORS):
                for lane in range(min(self.lanes, known_cols - v * self.lanes)):
                    for r in range(self.rows):
                        value = builder.extract_element(builder.load(acc[r, (0, v)]), _i32(lane))
                        builder.store(value, builder.gep(out.data, [start_of(r, _i64(v * self.lanes + lane))],
                                                         inbounds=True))
            return
        with builder.if_else(builder.icmp_signed("==", cols, width)) as (full, partial):
            with full:
                store_all()
            with partial:
                for v in range(PANEL_VECTORS):
                    self._store_lanes(builder, out.data, [acc[r, (0, v)] for r in range(self.rows)],
                                      [start_of(r, _i64(v * self.lanes)) for r in range(self.rows)],
                                      builder.sub(cols, _i64(v * self.lanes)))

    def _store_lanes(self, builder, data, accumulators, starts, count) -> None:
        """Each accumulator's first ``min(lanes, count)`` lanes from its row's start (none if ``count <= 0``)."""
        count = builder.select(builder.icmp_signed("<", count, _i64(self.lanes)), count, _i64(self.lanes))
        with cgutils.for_range(builder, count) as loop:
            lane = loop.index
            for accumulator, start in zip(accumulators, starts):
                value = builder.extract_element(builder.load(accumulator), lane)
                builder.store(value, builder.gep(data, [builder.add(start, lane)], inbounds=True))

    def _vector_pointer(self, builder, data, start):
        return builder.bitcast(builder.gep(data, [start], inbounds=True), self.vector.as_pointer())

    def _load(self, builder, data, start):
        return builder.load(self._vector_pointer(builder, data, start), align=self.align)

    def _splat(self, builder, data, index):
        scalar = builder.load(builder.gep(data, [index], inbounds=True))
        one = builder.insert_element(ir.Constant(self.vector, ir.Undefined), scalar, _i32(0))
        return builder.shuffle_vector(one, ir.Constant(self.vector, ir.Undefined),
                                      ir.Constant(ir.VectorType(ir.IntType(32), self.lanes), [0] * self.lanes))

    def _muladd(self, builder, x, w, acc):
        """``acc + x * w`` per lane: fused for float32, a rounded product then a sum for float64."""
        if self.exact:
            return builder.fadd(acc, builder.fmul(x, w))
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(self.vector, [self.vector] * 3),
                                             f"llvm.fma.v{self.lanes}f32")
        return builder.call(fma, [x, w, acc])


class _FusedBlock(_Block):
    """The LLVM IR of :func:`fused_block`: a one-row pass of ``rec_panels`` panels and a projection slice."""

    def __init__(self, dtype: types.Float, rec_panels: int):
        super().__init__(dtype, 1, rec_panels)

    def emit(self, builder: ir.IRBuilder, h, up, out, x, wp, xw, p, row, q, v, valid) -> None:
        """Zeroed accumulators, the shared input loop and each side's own, the stores."""
        rec_inputs, rec_width = cgutils.unpack_tuple(builder, up.shape)[1:]
        proj_inputs, proj_width = cgutils.unpack_tuple(builder, wp.shape)[1:]
        x_stride = cgutils.unpack_tuple(builder, x.shape)[1]
        xw_stride = cgutils.unpack_tuple(builder, xw.shape)[1]
        recurrent = [(k, w) for k in range(self.panels) for w in range(PANEL_VECTORS)]
        zero = ir.Constant(self.vector, [0.0] * self.lanes)
        rec_acc = {kw: cgutils.alloca_once_value(builder, zero) for kw in recurrent}
        proj_acc = [cgutils.alloca_once_value(builder, zero) for _ in range(FUSED_ROWS)]
        proj_column = builder.add(builder.mul(q, proj_width), builder.mul(v, _i64(self.lanes)))

        def add_recurrent(k):
            hk = self._splat(builder, h.data, k)
            for panel, w in recurrent:
                panel_row = builder.add(builder.mul(builder.add(p, _i64(panel)), rec_inputs), k)
                start = builder.add(builder.mul(panel_row, rec_width), _i64(w * self.lanes))
                weight = self._load(builder, up.data, start)
                acc = rec_acc[panel, w]
                builder.store(self._muladd(builder, hk, weight, builder.load(acc)), acc)

        def add_projection(k):
            panel_row = builder.add(builder.mul(q, proj_inputs), k)
            weight = self._load(builder, wp.data, builder.add(builder.mul(panel_row, proj_width),
                                                              builder.mul(v, _i64(self.lanes))))
            for r, acc in enumerate(proj_acc):
                xk = self._splat(builder, x.data, builder.add(builder.mul(builder.add(row, _i64(r)), x_stride), k))
                builder.store(self._muladd(builder, xk, weight, builder.load(acc)), acc)

        def loop(start, stop, *bodies):
            with cgutils.for_range(builder, builder.sub(stop, start)) as counter:
                k = builder.add(counter.index, start)
                for body in bodies:
                    body(k)

        if self.panels:
            shared = builder.select(builder.icmp_signed("<", rec_inputs, proj_inputs), rec_inputs, proj_inputs)
            loop(_i64(0), shared, add_recurrent, add_projection)
            loop(shared, rec_inputs, add_recurrent)
            loop(shared, proj_inputs, add_projection)
            for panel, w in recurrent:
                column = builder.add(builder.mul(builder.add(p, _i64(panel)), rec_width), _i64(w * self.lanes))
                builder.store(builder.load(rec_acc[panel, w]), self._vector_pointer(builder, out.data, column),
                              align=self.align)
        else:
            loop(_i64(0), proj_inputs, add_projection)
        starts = [builder.add(builder.mul(builder.add(row, _i64(r)), xw_stride), proj_column)
                  for r in range(FUSED_ROWS)]
        with builder.if_else(builder.icmp_signed(">=", valid, _i64(self.lanes))) as (full, partial):
            with full:
                for acc, start in zip(proj_acc, starts):
                    builder.store(builder.load(acc), self._vector_pointer(builder, xw.data, start), align=self.align)
            with partial:
                self._store_lanes(builder, xw.data, proj_acc, starts, valid)


def _i64(value: int) -> ir.Constant:
    return ir.Constant(ir.IntType(64), value)


def _i32(value: int) -> ir.Constant:
    return ir.Constant(ir.IntType(32), value)
