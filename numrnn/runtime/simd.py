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
from the arrays' shapes.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from codegen.cells.common import PANEL_VECTORS, vector_bytes
from numrnn.runtime.extern import is_c_array


@intrinsic
def panel_block(typingctx, h, wp, out, row, p, cols, rows, panels):
    """``out[row:row + rows, block] = h[row:row + rows] @ panels p..p+panels-1`` of ``wp``.

    ``wp`` is ``(panels, inputs, P)``, C-contiguous, ``P`` being
    :data:`PANEL_VECTORS` vectors; ``h`` (``inputs`` columns) and ``out``
    (the matrix's outputs) are C-contiguous with one row per batch row.
    ``rows`` and ``panels`` are literal integers. With one panel, only its
    first ``cols`` columns are stored (the matrix's last, partial panel);
    with more, all of them. Each output adds its terms in input order, one
    multiply-add each.
    """
    if not (is_c_array(h, 2) and is_c_array(wp, 3) and is_c_array(out, 2)
            and h.dtype == wp.dtype == out.dtype and isinstance(h.dtype, types.Float)
            and isinstance(rows, types.IntegerLiteral) and isinstance(panels, types.IntegerLiteral)
            and all(isinstance(a, types.Integer) for a in (row, p, cols))):
        return None
    block = _Block(h.dtype, rows.literal_value, panels.literal_value)

    def codegen(context, builder, sig, args):
        arrays = [context.make_array(t)(context, builder, a) for t, a in zip(sig.args[:3], args[:3])]
        row_, p_, cols_ = (context.cast(builder, a, t, types.int64) for a, t in zip(args[3:6], sig.args[3:6]))
        block.emit(builder, *arrays, row_, p_, cols_)
        return context.get_dummy_value()

    return types.none(h, wp, out, row, p, cols, rows, panels), codegen


class _Block:
    """The LLVM IR of one block shape: ``rows`` rows by ``panels`` panels of ``dtype``."""

    def __init__(self, dtype: types.Float, rows: int, panels: int):
        self.rows, self.panels = rows, panels
        self.exact = dtype.bitwidth == 64
        self.scalar = ir.DoubleType() if self.exact else ir.FloatType()
        self.lanes = vector_bytes() // (dtype.bitwidth // 8)
        self.vector = ir.VectorType(self.scalar, self.lanes)
        self.align = dtype.bitwidth // 8

    def emit(self, builder: ir.IRBuilder, h, wp, out, row, p, cols) -> None:
        """The block at the builder's position: zeroed accumulators, the input loop, the stores."""
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

        if self.panels > 1:
            store_all()
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


def _i64(value: int) -> ir.Constant:
    return ir.Constant(ir.IntType(64), value)


def _i32(value: int) -> ir.Constant:
    return ir.Constant(ir.IntType(32), value)
