"""Fixed-width float vectors for ``@njit`` code: the registers of the packed recurrent product.

LLVM vectorizes a loop over an array, but it keeps the partial sums of a
matrix product in memory (it cannot prove that the output does not alias the
weights), so each multiply-add of the old hand loop was a load, a store and
two weight loads. These intrinsics let the generated micro-kernel
(``codegen.cells.common.emit_panel_functions``) hold a block of outputs in
vector registers over the whole input loop: the 4x128x512 product of
bidir_masked's workers went 18.2 -> 9.5 us (one thread, AVX2 Zen 3, one call
from Python at a time; figures from a loop inside ``@njit`` are in
``numrnn.runtime.schedule.packed_product_rows``).

A vector is 32 bytes: 8 float32 or 4 float64 lanes (one AVX register; LLVM
splits it on narrower machines). ``vmuladd`` is one fused multiply-add for
float32, whose kernels may contract anyway (``codegen.targets.cpu.FAST_MATH``),
and a multiply then an add for float64, which stays exact.

Indices are not checked: the callers are generated loops whose bounds come
from the arrays' shapes.
"""

from __future__ import annotations

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

from codegen.cells.common import VECTOR_BYTES


class Vector(types.Type):
    """A numba type: ``lanes`` values of ``dtype`` in one register."""

    def __init__(self, dtype: types.Float):
        self.dtype = dtype
        self.lanes = VECTOR_BYTES // (dtype.bitwidth // 8)
        super().__init__(name=f"vector({dtype}x{self.lanes})")


@register_model(Vector)
class _VectorModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _llvm_vector(fe_type))


def _llvm_vector(vector: Vector) -> ir.VectorType:
    element = ir.FloatType() if vector.dtype.bitwidth == 32 else ir.DoubleType()
    return ir.VectorType(element, vector.lanes)


def _item_pointer(context, builder, array_type, array, indices):
    """Address of ``array[indices]``, no wraparound and no bounds check."""
    view = context.make_array(array_type)(context, builder, array)
    return cgutils.get_item_pointer2(context, builder, view.data, cgutils.unpack_tuple(builder, view.shape),
                                     cgutils.unpack_tuple(builder, view.strides), array_type.layout, indices,
                                     wraparound=False)


def _vector_pointer(context, builder, sig, args, count):
    pointer = _item_pointer(context, builder, sig.args[0], args[0], args[1:1 + count])
    return builder.bitcast(pointer, _llvm_vector(Vector(sig.args[0].dtype)).as_pointer())


@intrinsic
def vload(typingctx, array, i, j, k):
    """``array[i, j, k:k + lanes]`` of a 3-d array whose last axis is contiguous."""
    def codegen(context, builder, sig, args):
        return builder.load(_vector_pointer(context, builder, sig, args, 3), align=array.dtype.bitwidth // 8)
    return Vector(array.dtype)(array, i, j, k), codegen


@intrinsic
def vstore(typingctx, array, i, j, value):
    """``array[i, j:j + lanes] = value`` of a 2-d array whose last axis is contiguous."""
    def codegen(context, builder, sig, args):
        builder.store(args[3], _vector_pointer(context, builder, sig, args, 2), align=array.dtype.bitwidth // 8)
        return context.get_dummy_value()
    return types.none(array, i, j, value), codegen


@intrinsic
def vlane(typingctx, value, lane):
    """Lane ``lane`` of ``value``, a scalar."""
    def codegen(context, builder, sig, args):
        return builder.extract_element(args[0], args[1])
    return value.dtype(value, lane), codegen


@intrinsic
def vsplat(typingctx, array, i, j):
    """A vector with ``array[i, j]`` (2-d) in every lane."""
    def codegen(context, builder, sig, args):
        vector = _llvm_vector(Vector(array.dtype))
        scalar = builder.load(_item_pointer(context, builder, sig.args[0], args[0], args[1:]))
        one = builder.insert_element(ir.Constant(vector, ir.Undefined), scalar, ir.Constant(ir.IntType(32), 0))
        zeros = ir.Constant(ir.VectorType(ir.IntType(32), vector.count), [0] * vector.count)
        return builder.shuffle_vector(one, ir.Constant(vector, ir.Undefined), zeros)
    return Vector(array.dtype)(array, i, j), codegen


@intrinsic
def vzeros(typingctx, array):
    """A vector of zeros of ``array``'s dtype."""
    def codegen(context, builder, sig, args):
        vector = _llvm_vector(Vector(array.dtype))
        return ir.Constant(vector, [0.0] * vector.count)
    return Vector(array.dtype)(array), codegen


@intrinsic
def vmuladd(typingctx, x, w, acc):
    """``acc + x * w`` per lane: fused for float32, a rounded product then a sum for float64."""
    def codegen(context, builder, sig, args):
        a, b, c = args
        if x.dtype.bitwidth == 64:
            return builder.fadd(c, builder.fmul(a, b))
        vector = _llvm_vector(x)
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vector, [vector] * 3),
                                             f"llvm.fma.v{vector.count}f32")
        return builder.call(fma, [a, b, c])
    return x(x, w, acc), codegen
