"""The matrix products as C functions that every kernel calls by name, instead of a copy in each kernel.

When an ``@njit`` function calls another, numba links the callee's LLVM
module into the caller's, then optimizes and generates machine code for the
whole module again; ``np.dot`` likewise adds numba's checks and BLAS call at
every call site. The packed product (``codegen.cells.common.emit_panel_product``)
and its micro-kernels were most of the code of a small kernel, so every
kernel, and every layer function, compiled them again.

Instead the shared module compiles each product once as a C function
(``numba.cfunc``, cached on disk like the rest), and :func:`link_group`
gives its address a name in LLVM's symbol table
(``llvmlite.binding.add_symbol``).
The GEMM's entry calls scipy's BLAS itself (:func:`gemm`), as ``np.dot``
would, without the checks and the dispatch numba compiles with ``np.dot``
(0.5 s of a cold machine's first compile).
:func:`extern_call` makes the intrinsic that kernels call it through: it
declares the function by that name and passes each array as its data pointer
and shape. The kernels' cached machine code keeps the name, which LLVM
resolves again when a later process loads it, so :func:`link_group` must
run before a kernel is compiled or loaded; the kernel modules call it when
imported.

On a machine that has not compiled the entries yet (1.2-1.4 s, most of a
cold machine's first result), :func:`link_group` hands their compile to a
helper process, which fills numba's disk cache, and names a forwarder to
LLVM in each one's place, so that the kernel compiles here meanwhile, on the
other core. A forwarder jumps through a cell that :func:`finish_links` fills
with the entry's address once the helper is done; a forwarder called before
then calls :func:`finish_links` itself (through a ctypes callback, which
takes the GIL). Kernels compiled after that call the entries directly.
"""

from __future__ import annotations

import ctypes
import importlib
import logging
import os
import traceback
from dataclasses import dataclass, field
from threading import Lock

import llvmlite.binding as llvm
from llvmlite import ir
from numba import cfunc, types
from numba.core import cgutils, sigutils
from numba.core.ccallback import CFunc
from numba.extending import intrinsic

from numrnn.runtime import amx, helper

log = logging.getLogger("numrnn")

_LINKED: dict[str, object] = {}
_LOCK = Lock()


def is_c_array(array: types.Type, ndim: int) -> bool:
    """Whether a numba type is a C-contiguous array of ``ndim`` dimensions (what the C entries take)."""
    return isinstance(array, types.Array) and array.layout == "C" and array.ndim == ndim


def c_signature(dtype: types.Float, ndims: tuple[int, ...], scalars: int) -> types.Signature:
    """The C function's arguments: per array a pointer and its ``ndim`` sizes, then ``scalars`` int64 values."""
    arrays = [t for ndim in ndims for t in (types.CPointer(dtype), *(types.int64,) * ndim)]
    return types.void(*arrays, *(types.int64,) * scalars)


def link_group(link_function: str, entries, dtype: types.Float, **options) -> None:
    """Compile (or load) each entry as a C function of :func:`c_signature` and name its address ``symbol`` to LLVM.

    Once per process and symbol. ``entries`` are ``((symbol, ndims,
    scalars), function)`` pairs: ``function`` is the shared module's plain
    Python function that wraps the pointers in arrays (``numba.carray``) and
    computes; it lives there so that its disk cache does too. ``options``
    are further jit options (``fastmath``). Entries that are not in numba's
    disk cache are compiled by a helper process that runs ``link_function``
    (the shared module's qualified name of the function that calls this),
    while forwarders stand in for them (above); without a helper
    (:func:`numrnn.runtime.helper.allowed`, never in the helper itself), here.
    """
    if all(symbol in _LINKED for (symbol, _, _), _ in entries):
        return
    with _LOCK:
        missing, loaded_any = [], False
        for (symbol, ndims, scalars), function in entries:
            if symbol in _LINKED or any(symbol in d.symbols for d in _PENDING):
                continue
            signature = c_signature(dtype, ndims, scalars)
            loaded = _load_cached(function, signature, options)
            if loaded is not None:
                _name(symbol, loaded)
                loaded_any = True
            else:
                missing.append((symbol, function, signature))
        if not missing:
            if loaded_any:  # a helper started early, before the cache could be read, is not needed
                helper.done(link_function)
            return
        if helper.allowed() and not _IN_HELPER:
            try:
                _PENDING.append(_Deferred.start(link_function, missing, dtype, options))
                return
            except OSError as error:  # no interpreter to start: compile here
                log.warning("could not start a helper process to compile the shared entries (%s); "
                            "compiling them here", error)
        for symbol, function, signature in missing:
            _name(symbol, _compile(function, signature, options))


def compile_here() -> None:
    """Make this process compile every entry itself (the helper process calls this first)."""
    global _IN_HELPER
    _IN_HELPER = True


_IN_HELPER = False


def finish_links(dtype: str | None = None) -> None:
    """Link the entries (of ``dtype``'s flavor, else all) that helper processes compile: wait for each helper,
    then load its entries (or compile them here if it failed) and point their forwarders at them. Returns at
    once when nothing is pending."""
    for deferred in list(_PENDING):
        if dtype is None or str(deferred.dtype) == dtype:
            deferred.finish()


def linked(symbol: str):
    """The C function :func:`link_group` compiled for ``symbol`` (a ``numba.cfunc``: ``.address``, ``.ctypes``)."""
    finish_links()
    with _LOCK:
        return _LINKED[symbol]


def _name(symbol: str, compiled) -> None:
    llvm.add_symbol(symbol, compiled.address)
    _LINKED[symbol] = compiled  # keeps the machine code alive


def _jit_options(options: dict) -> dict:
    return {"nogil": True, "error_model": "numpy", **options}


def _compile(function, signature: types.Signature, options: dict):
    """The entry from numba's disk cache, else compiled (and cached)."""
    return cfunc(signature, cache=True, **_jit_options(options))(function)


class _NotCached(Exception):
    pass


class _CacheOnly(CFunc):
    """A ``numba.cfunc`` that loads from the disk cache and raises :class:`_NotCached` instead of compiling."""

    def _compile_uncached(self):
        raise _NotCached


def _load_cached(function, signature: types.Signature, options: dict):
    """The entry from numba's disk cache, or None where it has none."""
    loaded = _CacheOnly(function, sigutils.normalize_signature(signature), locals={}, options=_jit_options(options))
    loaded.enable_caching()
    try:
        loaded.compile()
    except _NotCached:
        return None
    return loaded


@dataclass
class _Deferred:
    """Entries a helper process compiles, and the forwarders named in their place meanwhile."""

    running: helper.Helper
    entries: list  # (symbol, function, signature)
    dtype: types.Float
    options: dict
    cells: list[int]  # per entry, the address of the cell its forwarder jumps through
    engine: object  # the forwarders' machine code
    #: Held while a thread waits for the helper; not ``_LOCK``, so that other kernels link meanwhile.
    lock: Lock = field(default_factory=Lock)

    @property
    def symbols(self) -> list[str]:
        return [symbol for symbol, _, _ in self.entries]

    @classmethod
    def start(cls, link_function: str, entries: list, dtype: types.Float, options: dict) -> _Deferred:
        running = helper.start(link_function)
        engine, functions, cells = _forwarders([signature for _, _, signature in entries])
        for (symbol, _, _), address in zip(entries, functions):
            llvm.add_symbol(symbol, address)
        return cls(running, entries, dtype, options, cells, engine)

    def finish(self) -> None:
        """Wait for the helper, then load (or compile) each entry, fill its cell and name it to LLVM."""
        with self.lock:
            if self not in _PENDING:  # another thread finished it
                return
            failure = self.running.wait()
            helper.done(self.running.link_function)
            if failure is not None:
                log.warning("the helper process compiling %s failed (%s); compiling here",
                            self.running.link_function, failure)
            with _LOCK:
                for (symbol, function, signature), cell in zip(self.entries, self.cells):
                    compiled = _compile(function, signature, self.options)
                    ctypes.c_void_p.from_address(cell).value = compiled.address
                    _name(symbol, compiled)
                _FORWARDERS.append(self.engine)  # kernels compiled meanwhile keep jumping through it
                _PENDING.remove(self)


_PENDING: list[_Deferred] = []
_FORWARDERS: list = []


def _forwarders(signatures: list[types.Signature], fill_symbol: str | None = None,
                fill=None) -> tuple[object, list[int], list[int]]:
    """Machine code of one forwarder per C signature: each loads its cell and calls the address it holds,
    calling ``fill`` (a ctypes callback, named ``fill_symbol``; :func:`finish_links` by default) first
    while the cell is empty. Returns the execution engine that holds the code, the forwarders' addresses
    and their cells'."""
    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    module = ir.Module("numrnn_forwarders")
    module.triple = llvm.get_process_triple()
    fill_symbol, fill = (_FINISH_SYMBOL, _FINISH_CALLBACK) if fill is None else (fill_symbol, fill)
    finish = ir.Function(module, ir.FunctionType(ir.VoidType(), []), fill_symbol)
    for i, signature in enumerate(signatures):
        arguments = [ir.IntType(8).as_pointer() if isinstance(t, types.CPointer) else ir.IntType(64)
                     for t in signature.args]
        pointer = ir.FunctionType(ir.VoidType(), arguments).as_pointer()
        cell = ir.GlobalVariable(module, pointer, f"cell{i}")
        cell.initializer = ir.Constant(pointer, None)
        forwarder = ir.Function(module, pointer.pointee, f"forward{i}")
        builder = ir.IRBuilder(forwarder.append_basic_block())
        with builder.if_then(builder.icmp_unsigned("==", builder.load(cell), ir.Constant(pointer, None)),
                             likely=False):
            builder.call(finish, [])
        builder.call(builder.load(cell), list(forwarder.args))
        builder.ret_void()
    llvm.add_symbol(fill_symbol, ctypes.cast(fill, ctypes.c_void_p).value)
    parsed = llvm.parse_assembly(str(module))
    engine = llvm.create_mcjit_compiler(parsed, llvm.Target.from_default_triple().create_target_machine())
    engine.finalize_object()
    return (engine, [engine.get_function_address(f"forward{i}") for i in range(len(signatures))],
            [engine.get_global_value_address(f"cell{i}") for i in range(len(signatures))])


def _finish_from_kernel() -> None:
    """:func:`finish_links` for a forwarder called before its cell was filled. An exception cannot reach
    the kernel that called it, and returning would run a product that was never linked: it aborts (a
    KeyboardInterrupt while it waits too)."""
    try:
        finish_links()
    except BaseException:
        try:
            traceback.print_exc()
            os.write(2, b"numrnn: could not link the shared entries a running kernel called; aborting\n")
        finally:
            os.abort()


def _forget_in_child() -> None:
    """After ``fork``: a thread that waited for a helper is not in the child, so nor is the lock it held."""
    for deferred in _PENDING:
        deferred.lock = Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)


_FINISH_SYMBOL = "numrnn_finish_links"
_FINISH_CALLBACK = ctypes.CFUNCTYPE(None)(_finish_from_kernel)


#: scipy's BLAS functions (``scipy.linalg.cython_blas``) that :func:`gemm` calls, by name and float width.
BLAS_FUNCTIONS = {(name, bits): f"{'s' if bits == 32 else 'd'}{name}"
                  for name in ("gemm", "gemv", "dot") for bits in (32, 64)}


def blas_symbol(name: str, bits: int) -> str:
    """LLVM's name for the BLAS function ``name`` of ``bits``-bit floats (:func:`link_blas`)."""
    return f"numrnn_{BLAS_FUNCTIONS[name, bits]}"


def link_blas() -> None:
    """Give LLVM the addresses of scipy's BLAS functions that :func:`gemm` calls, and the tile product's
    (``numrnn.runtime.amx.link``), once per process.

    Before any function that calls :func:`gemm` is compiled or loaded. They
    are the functions numba's ``np.dot`` calls (through its C helper), from
    the Cython module's table of C functions.
    """
    global _BLAS
    if _BLAS is not None:
        return
    with _LOCK:
        if _BLAS is not None:
            return
        blas = importlib.import_module("scipy.linalg.cython_blas")
        # Every address first: a symbol left out would make a loaded entry jump to nowhere.
        addresses = {blas_symbol(*key): _capsule_address(blas.__pyx_capi__[function])
                     for key, function in BLAS_FUNCTIONS.items()}
        for symbol, address in addresses.items():
            llvm.add_symbol(symbol, address)
        amx.link()
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
    """An intrinsic ``call(*arrays, *scalars)`` that calls the C function :func:`link_group` named ``symbol``.

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
