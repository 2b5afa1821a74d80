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
The GEMM's entry calls scipy's BLAS itself (:func:`gemm`), as ``np.dot``
would, without the checks and the dispatch numba compiles with ``np.dot``
(0.5 s of a cold machine's first compile).
:func:`extern_call` makes the intrinsic that kernels call it through: it
declares the function by that name and passes each array as its data pointer
and shape. The kernels' cached machine code keeps the name, which LLVM
resolves again when a later process loads it, so :func:`link` must run
before a kernel is compiled or loaded; the kernel modules call it when
imported.
"""

from __future__ import annotations

import ctypes
import importlib
import threading

import llvmlite.binding as llvm
from llvmlite import ir
from numba import cfunc, types
from numba.core import cgutils
from numba.extending import intrinsic

_LINKED: dict[str, object] = {}
_LOCK = threading.Lock()


def is_c_array(array: types.Type, ndim: int) -> bool:
    """Whether a numba type is a C-contiguous array of ``ndim`` dimensions (what the C entries take)."""
    return isinstance(array, types.Array) and array.layout == "C" and array.ndim == ndim


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


#: scipy's BLAS functions (``scipy.linalg.cython_blas``) that :func:`gemm` calls, by name and float width.
BLAS_FUNCTIONS = {(name, bits): f"{'s' if bits == 32 else 'd'}{name}"
                  for name in ("gemm", "gemv", "dot") for bits in (32, 64)}


def blas_symbol(name: str, bits: int) -> str:
    """LLVM's name for the BLAS function ``name`` of ``bits``-bit floats (:func:`link_blas`)."""
    return f"numrnn_{BLAS_FUNCTIONS[name, bits]}"


def link_blas() -> None:
    """Give LLVM the addresses of scipy's BLAS functions that :func:`gemm` calls, once per process.

    Before any function that calls :func:`gemm` is compiled or loaded. They
    are the functions numba's ``np.dot`` calls (through its C helper), from
    the Cython module's table of C functions.
    """
    global _BLAS
    with _LOCK:
        if _BLAS is not None:
            return
        blas = importlib.import_module("scipy.linalg.cython_blas")
        # Every address first: a symbol left out would make a loaded entry jump to nowhere.
        addresses = {blas_symbol(*key): _capsule_address(blas.__pyx_capi__[function])
                     for key, function in BLAS_FUNCTIONS.items()}
        for symbol, address in addresses.items():
            llvm.add_symbol(symbol, address)
        _BLAS = blas  # keeps the module, and so its functions, loaded


_BLAS = None
_CAPSULE_NAME = ctypes.PYFUNCTYPE(ctypes.c_char_p, ctypes.py_object)(("PyCapsule_GetName", ctypes.pythonapi))
_CAPSULE_POINTER = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)(
    ("PyCapsule_GetPointer", ctypes.pythonapi))


def _capsule_address(capsule) -> int:
    return _CAPSULE_POINTER(capsule, _CAPSULE_NAME(capsule))


@intrinsic
def gemm(typingctx, a, b, out):
    """``out = a @ b`` by BLAS, for C-contiguous 2-D arrays of one float dtype (:func:`link_blas` first).

    The calls numba's ``np.dot(a, b, out)`` makes for such arrays, so the
    results are the same to the bit: zeros if a size is 0; a dot product for
    one row and one column; a matrix-vector product (``gemv``) for one row
    or one column; else ``gemm``, to which column-major BLAS, computing
    ``out.T = b.T @ a.T``, gets ``b`` first, no transposes, and each array's
    row length as its leading dimension. Without ``np.dot``'s checks, which
    numba compiles with it: the callers' shapes come from the arrays they
    allocate, and a kernel refuses a call with more rows than BLAS's 32-bit
    sizes take (``numrnn.runtime.kernels.MAX_BLAS_ROWS``); the other sizes
    are a layer's widths.
    """
    arrays = (a, b, out)
    if not (all(is_c_array(t, 2) for t in arrays)
            and a.dtype == b.dtype == out.dtype and a.dtype in (types.float32, types.float64)):
        return None

    def codegen(context, builder, sig, args):
        _Blas(context, builder, sig.args[0].dtype).product(
            *(context.make_array(t)(context, builder, v) for t, v in zip(sig.args, args)))
        return context.get_dummy_value()

    return types.none(a, b, out), codegen


class _Blas:
    """IR that calls scipy's BLAS on pointers to its arguments, as Fortran passes them."""

    def __init__(self, context, builder, dtype: types.Float):
        self.builder, self.bits = builder, dtype.bitwidth
        self.scalar = context.get_value_type(dtype)

    def product(self, a, b, out) -> None:
        """:func:`gemm`'s ``out = a @ b``, choosing the BLAS call as ``np.dot`` does."""
        builder = self.builder
        (m, k), n = cgutils.unpack_tuple(builder, a.shape), cgutils.unpack_tuple(builder, b.shape)[1]
        zero, one = ir.Constant(m.type, 0), ir.Constant(m.type, 1)
        empty = builder.or_(builder.icmp_signed("==", k, zero),
                            builder.or_(builder.icmp_signed("==", m, zero), builder.icmp_signed("==", n, zero)))
        with builder.if_else(empty, likely=False) as (if_empty, if_not):
            with if_empty:
                size = builder.mul(builder.mul(m, n), ir.Constant(m.type, self.bits // 8))
                cgutils.memset(builder, out.data, size, 0)
            with if_not:
                row, column = builder.icmp_signed("==", m, one), builder.icmp_signed("==", n, one)
                with builder.if_else(column) as (one_column, columns):
                    with one_column:
                        with builder.if_else(row) as (one_row, rows):
                            with one_row:
                                self._dot(k, a.data, b.data, out.data)
                            with rows:  # a @ b's column: a (m, k) is Fortran's (k, m), transposed
                                self._gemv("T", k, m, a.data, k, b.data, out.data)
                    with columns:
                        with builder.if_else(row) as (one_row, rows):
                            with one_row:  # a's row @ b: b (k, n) is Fortran's (n, k)
                                self._gemv("N", n, k, b.data, n, a.data, out.data)
                            with rows:
                                self._gemm(m, n, k, a.data, b.data, out.data)

    def _gemm(self, m, n, k, a, b, out) -> None:
        no = self._char("N")
        self._call("gemm", [no, no, self._int(n), self._int(m), self._int(k), self._float(1.0), b, self._int(n), a,
                            self._int(k), self._float(0.0), out, self._int(n)])

    def _gemv(self, transpose: str, rows, columns, matrix, leading, vector, out) -> None:
        step = self._int(ir.Constant(rows.type, 1))
        self._call("gemv", [self._char(transpose), self._int(rows), self._int(columns), self._float(1.0), matrix,
                            self._int(leading), vector, step, self._float(0.0), out, step])

    def _dot(self, k, a, b, out) -> None:
        step = self._int(ir.Constant(k.type, 1))
        self.builder.store(self._call("dot", [self._int(k), a, step, b, step], self.scalar), out)

    def _call(self, name: str, arguments: list, returns=None):
        function_type = ir.FunctionType(returns or ir.VoidType(), [v.type for v in arguments])
        function = cgutils.get_or_insert_function(self.builder.module, function_type, blas_symbol(name, self.bits))
        return self.builder.call(function, arguments)

    def _slot(self, value):
        pointer = cgutils.alloca_once(self.builder, value.type)
        self.builder.store(value, pointer)
        return pointer

    def _int(self, value):
        return self._slot(self.builder.trunc(value, ir.IntType(32)))

    def _char(self, letter: str):
        return self._slot(ir.Constant(ir.IntType(8), ord(letter)))

    def _float(self, value: float):
        return self._slot(ir.Constant(self.scalar, value))


def extern_call(symbol: str, ndims: tuple[int, ...], scalars: int):
    """An intrinsic ``call(*arrays, *scalars)`` that calls the C function :func:`link` named ``symbol``.

    The arrays must be C-contiguous, of one float dtype, with ``ndims``
    dimensions; the scalars are integers, passed as int64.
    """
    @intrinsic
    def call(typingctx, *args):
        arrays = args[:len(ndims)]
        if len(args) != len(ndims) + scalars or not all(
                is_c_array(a, n) and a.dtype == arrays[0].dtype for a, n in zip(arrays, ndims)):
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
