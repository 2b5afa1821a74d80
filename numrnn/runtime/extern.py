"""The matrix products as C functions that every kernel calls by name, instead of a copy in each kernel.

When an ``@njit`` function calls another, numba links the callee's LLVM
module into the caller's, then optimizes and generates machine code for the
whole module again; ``np.dot`` likewise adds numba's checks and BLAS call at
every call site. The packed product (``codegen.cells.common.emit_panel_product``)
and its micro-kernels were most of the code of a small kernel, so every
kernel, and every layer function, compiled them again.

Instead the shared module compiles each product once as a C function
(``numba.cfunc``, cached on disk like the rest), and :func:`link` gives its
address a name in LLVM's symbol table (``llvmlite.binding.add_symbol``).
:func:`extern_call` makes the intrinsic that kernels call it through: it
declares the function by that name and passes each array as its data pointer
and shape. The kernels' cached machine code keeps the name, which LLVM
resolves again when a later process loads it, so :func:`link` must run
before a kernel is compiled or loaded; the kernel modules call it when
imported.
"""

from __future__ import annotations

import threading

import llvmlite.binding as llvm
from llvmlite import ir
from numba import cfunc, types
from numba.core import cgutils
from numba.extending import intrinsic

_LINKED: dict[str, object] = {}
_LOCK = threading.Lock()


def c_signature(dtype: types.Float, ndims: tuple[int, ...], scalars: int) -> types.Signature:
    """The C function's arguments: per array a pointer and its ``ndim`` sizes, then ``scalars`` int64 values."""
    arrays = [t for ndim in ndims for t in (types.CPointer(dtype), *(types.int64,) * ndim)]
    return types.void(*arrays, *(types.int64,) * scalars)


def link(symbol: str, entry, dtype: types.Float, ndims: tuple[int, ...], scalars: int, **options) -> None:
    """Compile (or load) ``entry`` as a C function of :func:`c_signature` and give LLVM its address as ``symbol``.

    Once per process and symbol. ``entry`` is the shared module's plain
    Python function that wraps the pointers in arrays (``numba.carray``) and
    computes; it lives there so that its disk cache does too. ``options``
    are further jit options (``fastmath``).
    """
    with _LOCK:
        if symbol in _LINKED:
            return
        signature = c_signature(dtype, ndims, scalars)
        compiled = cfunc(signature, cache=True, nogil=True, error_model="numpy", **options)(entry)
        llvm.add_symbol(symbol, compiled.address)
        _LINKED[symbol] = compiled  # keeps the machine code alive


def linked(symbol: str):
    """The C function :func:`link` compiled for ``symbol`` (a ``numba.cfunc``: ``.address``, ``.ctypes``)."""
    with _LOCK:
        return _LINKED[symbol]


def extern_call(symbol: str, ndims: tuple[int, ...], scalars: int):
    """An intrinsic ``call(*arrays, *scalars)`` that calls the C function :func:`link` named ``symbol``.

    The arrays must be C-contiguous, of one float dtype, with ``ndims``
    dimensions; the scalars are integers, passed as int64.
    """
    @intrinsic
    def call(typingctx, *args):
        arrays = args[:len(ndims)]
        if len(args) != len(ndims) + scalars or not all(
                isinstance(a, types.Array) and a.layout == "C" and a.ndim == n and a.dtype == arrays[0].dtype
                for a, n in zip(arrays, ndims)):
            return None
        if not all(isinstance(a, types.Integer) for a in args[len(ndims):]):
            return None
        signature = types.void(types.StarArgTuple.from_types(args))

        def codegen(context, builder, sig, packed):
            argument_types = sig.args[0].types
            values = cgutils.unpack_tuple(builder, packed[0])
            flat = []
            for array_type, value in zip(argument_types[:len(ndims)], values[:len(ndims)]):
                view = context.make_array(array_type)(context, builder, value)
                flat += [view.data, *cgutils.unpack_tuple(builder, view.shape)]
            flat += [context.cast(builder, value, value_type, types.int64)
                     for value_type, value in zip(argument_types[len(ndims):], values[len(ndims):])]
            function_type = ir.FunctionType(ir.VoidType(), [v.type for v in flat])
            builder.call(cgutils.get_or_insert_function(builder.module, function_type, symbol), flat)
            return context.get_dummy_value()

        return signature, codegen

    return call
