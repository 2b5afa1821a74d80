"""``view(array, start, shape)``: a C-contiguous view of a C-contiguous array's elements, for the kernels' buffers.

The kernels carve their buffers from the workspace and look at the input
projection in the shapes their loops want. ``ws[a:b].reshape(shape)`` and
``xw.reshape(shape)`` compile numba's general reshape at every call site:
the shape normalization, a call to find a copy-free layout, and the error
paths of both. This intrinsic only computes the strides. seed000's stack
(11 such sites) compiled in 1.4-2.5 s with it against 2.1-3.1 s with
reshapes (kernel and layer function, alternating fresh processes).

Nothing is checked here: the generated kernel checks once that ``ws`` is as
large as its ``workspace_size`` (a direction-split kernel, that each row of
its ``workspaces`` is as large as its ``shared_buffers`` make it), and every
other view has the size of the array it looks at.
"""

from __future__ import annotations

from numba import types
from numba.core import cgutils
from numba.core.imputils import impl_ret_borrowed
from numba.extending import intrinsic
from numba.np.arrayobj import populate_array


@intrinsic
def view(typingctx, array, start, shape):
    """``array.reshape(-1)[start:start + prod(shape)].reshape(shape)`` for a C-contiguous ``array``, unchecked."""
    if not (isinstance(array, types.Array) and array.layout == "C" and isinstance(start, types.Integer)
            and isinstance(shape, types.UniTuple) and isinstance(shape.dtype, types.Integer)):
        return None
    result = types.Array(array.dtype, len(shape), "C")

    def codegen(context, builder, sig, args):
        source = context.make_array(sig.args[0])(context, builder, args[0])
        dims = [context.cast(builder, d, shape.dtype, types.intp)
                for d in cgutils.unpack_tuple(builder, args[2], len(shape))]
        strides = [source.itemsize]
        for d in reversed(dims[1:]):
            strides.insert(0, builder.mul(strides[0], d))
        first = builder.gep(source.data, [context.cast(builder, args[1], sig.args[1], types.intp)])
        target = context.make_array(result)(context, builder)
        populate_array(target, data=first, shape=dims, strides=strides, itemsize=source.itemsize,
                       meminfo=source.meminfo)
        return impl_ret_borrowed(context, builder, result, target._getvalue())

    return result(array, start, shape), codegen
