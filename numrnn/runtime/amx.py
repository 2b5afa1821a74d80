"""The input projection on Intel AMX tiles, as exact as float32, where a CPU has them.

An AMX core multiplies bfloat16 tiles at 16 times the float32 multiply-add
rate of its AVX-512 units (``TDPBF16PS``: a 16x32 by 32x16 product, float32
sums, every 16 cycles). A float32 number is the exact sum of three bfloat16
numbers (its significand's three bytes: ``x = hi + mid + lo``), so

    a @ b = ah@bh + am@bh + al@bh + am@bm + ah@bm + ah@bl  (+ terms under 2**-24 of a product)

six tile products where one float32 product was, each product of two parts
exact in float32 and summed in float32. The terms left out (``am@bl``,
``al@bm``, ``al@bl``) are under 2**-24 of each product, float32's own
rounding of it, and the sums round as a float32 GEMM's do: against a float64 product, the error is
BLAS's sgemm's (tests/test_amx.py). Six products at 16 times the rate are
2.7 times float32's peak; with ``a``'s packing, a stage of LSTM(512)'s
projection (256 x 512 by 512 x 2048) runs in 1.7 ms against numpy's 3.0 on
one core (docs/speed-history.md). The parts are each the nearest bfloat16
to what the parts before leave (:func:`_store_split`), so that the terms
left out cancel on average. Two limits: a part under 2**-126 (of an ``x``
under about 2**-110) is a subnormal, which the unit reads as zero (an
absolute error under 1.2e-38 a product); and a row of ``a`` holding an
infinity or a NaN is computed in float32 instead, since its zero parts
would make NaNs of ``b``'s (``0 * inf``). Weights must be finite, as the
facades require.

How kernels reach it: a layer's input kernel has a third packed copy,
``wx_tiles`` (:func:`tiles_for`: its parts in tiles, packed once with the
weights; empty where the process does not project on tiles, or the kernel
is small). A float32 kernel whose tiles are not empty projects with them,
in every schedule and path that projects rows before its steps or a stage
at a time (not a one-row call's fused projection), through the C function
:data:`~codegen.cells.common.TILE_SYMBOL` that :func:`link` names to LLVM.

``NUMRNN_AMX``: ``auto`` (the default) uses the tiles where the CPU has
AMX-BF16, numba compiles for this CPU's features, and Linux grants the
process the tile state (``arch_prctl(ARCH_REQ_XCOMP_PERM)``); ``0`` never;
``1`` requires them, and raises where they cannot run.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
import threading
import traceback

import numba
import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from codegen.cells import aligned_zeros
from codegen.cells.common import TILE_MIN_OUTPUTS, TILE_SYMBOL, tiles_size

#: Bytes of ``a``'s rows packed at a time (three bytes of parts a byte of ``a``, k padded to 32), which stay
#: in L2 while every column tile of ``b`` passes; at most :data:`MAX_ROW_BLOCK` rows. One thread, 3200 x 512
#: by 512 x 2048 (``b`` packed before), blocks of 128 / 256 / 512 rows: 31.8 / 29.2 / 22.4 ms (numpy's
#: sgemm 37.0, 36.1, 32.3 in the same runs); of a 256-row stage: 2.18 / 1.71 / 1.73 ms.
ROW_BLOCK_BYTES, MAX_ROW_BLOCK = 3 << 19, 512

#: The smallest input kernel a layer projects with on tiles (:func:`tiles_for`): inputs, outputs (gates x
#: units). One thread, rows x inputs x outputs, tiles / numpy's sgemm: 256x512x2048 1.71 / 2.98 ms,
#: 800x256x512 0.74 / 1.09, 100x256x1024 0.23 / 0.35; below, packing the rows into tiles costs about what
#: the product saves: 896x128x768 1.11 / 1.01, 6272x120x360 3.59 / 3.25, 896x28x512 0.52 / 0.25.
MIN_INPUTS, MIN_OUTPUTS = 256, TILE_MIN_OUTPUTS

_TILE = 16  # a tile's rows (and float32 columns)
_PAIR = 32  # bfloat16 along k in a tile row: 64 bytes
_ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA, _SYS_ARCH_PRCTL = 0x1023, 18, 158

_i8, _i64 = ir.IntType(8), ir.IntType(64)
_bytes = ir.PointerType(_i8)


def _declare(builder, name: str, arguments: list):
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), arguments), name)


def _element(context, builder, array_type, array, offset):
    view = context.make_array(array_type)(context, builder, array)
    return builder.bitcast(builder.gep(view.data, [offset]), _bytes)


def _literal(value) -> bool:
    return isinstance(value, types.IntegerLiteral)


@intrinsic
def _load_config(typingctx, config):
    def codegen(context, builder, sig, args):
        address = _element(context, builder, sig.args[0], args[0], ir.Constant(_i64, 0))
        builder.call(_declare(builder, "llvm.x86.ldtilecfg", [_bytes]), [address])
        return context.get_dummy_value()
    return types.void(config), codegen


@intrinsic
def _release(typingctx):
    def codegen(context, builder, sig, args):
        builder.call(_declare(builder, "llvm.x86.tilerelease", []), [])
        return context.get_dummy_value()
    return types.void(), codegen


@intrinsic
def _zero(typingctx, tile):
    if not _literal(tile):
        return None

    def codegen(context, builder, sig, args):
        builder.call(_declare(builder, "llvm.x86.tilezero", [_i8]), [ir.Constant(_i8, tile.literal_value)])
        return context.get_dummy_value()
    return types.void(tile), codegen


def _tile_move(name: str):
    @intrinsic
    def move(typingctx, tile, array, offset, stride):
        """Tile ``tile`` from/to ``array`` at element ``offset``, rows ``stride`` bytes apart."""
        if not _literal(tile):
            return None

        def codegen(context, builder, sig, args):
            address = _element(context, builder, sig.args[1], args[1], args[2])
            builder.call(_declare(builder, name, [_i8, _bytes, _i64]),
                         [ir.Constant(_i8, tile.literal_value), address, args[3]])
            return context.get_dummy_value()
        return types.void(tile, array, types.int64, types.int64), codegen
    return move


_load = _tile_move("llvm.x86.tileloadd64")
_store = _tile_move("llvm.x86.tilestored64")


@intrinsic
def _product(typingctx, c, a, b):
    """Tile ``c`` += tile ``a`` (bfloat16 pairs along k) times tile ``b`` (k-pairs by columns)."""
    if not (_literal(c) and _literal(a) and _literal(b)):
        return None
    tiles = [c.literal_value, a.literal_value, b.literal_value]

    def codegen(context, builder, sig, args):
        builder.call(_declare(builder, "llvm.x86.tdpbf16ps", [_i8, _i8, _i8]), [ir.Constant(_i8, t) for t in tiles])
        return context.get_dummy_value()
    return types.void(c, a, b), codegen


@intrinsic
def _bits(typingctx, value):
    """The bits of a float32 as a uint32."""
    if value != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], ir.IntType(32))
    return types.uint32(value), codegen


@intrinsic
def _float(typingctx, bits):
    """The float32 of an integer's low 32 bits."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        low = args[0] if bits.bitwidth == 32 else builder.trunc(args[0], ir.IntType(32))
        return builder.bitcast(low, ir.FloatType())
    return types.float32(bits), codegen


_JIT = {"nogil": True, "cache": True, "error_model": "numpy", "boundscheck": False}


@njit(**_JIT)
def _aligned(count):
    """``count`` zeros of uint16 from a 64-byte line on (a tile row across two lines loads at a third the rate)."""
    raw = np.zeros(count + 32, np.uint16)
    start = ((64 - raw.ctypes.data % 64) % 64) // 2
    return raw[start:start + count]


@njit(**_JIT)
def _layout(depth, columns):
    """``(k blocks, column tiles)`` of the tile copy of a ``(depth, columns)`` matrix: k in 32s, columns in 16s
    by pairs (a block of outputs is two column tiles wide)."""
    return (depth + _PAIR - 1) // _PAIR, 2 * ((columns + 2 * _TILE - 1) // (2 * _TILE))


@njit(**_JIT, inline="always")
def _rounded(bits):
    """float32 ``bits`` rounded to the nearest bfloat16 (ties to even), as float32 bits."""
    return (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)


_EXPONENT = np.uint32(0x7F800000)


@njit(**_JIT, inline="always")
def _store_split(packed, parts, at, value):
    """The three bfloat16 parts whose sum is ``value`` exactly, at ``at``, ``parts`` apart; 1 if ``value`` is
    not finite (its first part is then itself, the others zeros), else 0.

    Each part is the nearest bfloat16 to what the parts before leave (8
    significant bits each, 24 in all), so a part is at most 2**-9 of the
    one before and of either sign: the products the tile product leaves out
    stay under 2**-24 of the whole and cancel on average, where parts cut
    short (the bytes of the significand) all pulled toward zero, by up to
    2**-21. A finite value past the largest bfloat16 takes its first part
    cut short instead of rounded (which would make it infinite).
    ``at`` and ``parts`` unsigned: a signed index costs numba's negative-index
    check, which keeps LLVM from vectorizing the packing loops (3.8 against
    1.4 ms for 3200 x 512).
    """
    bits = _bits(value)
    finite = (bits & _EXPONENT) != _EXPONENT
    high = _rounded(bits)
    if (high & _EXPONENT) == _EXPONENT:
        high = bits & np.uint32(0xFFFF0000)
        if not finite and bits & np.uint32(0x007FFFFF):
            high |= np.uint32(0x00400000)  # a NaN stays one
    rest = value - _float(high) if finite else np.float32(0.0)
    middle = _rounded(_bits(rest))
    low = _bits(rest - _float(middle))  # at most 8 significant bits: a bfloat16 exactly
    packed[at] = np.uint16(high >> np.uint32(16))
    packed[parts + at] = np.uint16(middle >> np.uint32(16))
    packed[parts + parts + at] = np.uint16(low >> np.uint32(16))
    return np.uint8(0) if finite else np.uint8(1)


_U = np.uint64


@njit(**_JIT)
def _pack_rows(a, leading, rows, depth, depth_blocks, packed, odd):
    """The flat ``a`` (``rows`` rows ``leading`` apart) as tiles: ``packed[part, row block, k block, row, k]``;
    ``odd[r]`` nonzero where row ``r`` holds a value that is not finite.

    Each tile (16 rows of 32 k) is 1 KiB in a line, as ``_load`` reads it;
    ``packed`` comes zeroed, and what lies past ``a`` stays so.
    """
    parts, tile, pair = _U(packed.size // 3), _U(_TILE * _PAIR), _U(_PAIR)
    for r in range(_U(rows)):
        base = (r // _U(_TILE)) * _U(depth_blocks) * tile + (r % _U(_TILE)) * pair
        flags = np.uint8(0)
        for kb in range(_U(depth_blocks)):
            at, k0 = base + kb * tile, r * _U(leading) + kb * pair
            for c in range(min(pair, _U(depth) - kb * pair)):
                flags |= _store_split(packed, parts, at + c, a[k0 + c])
        odd[r] = flags


@njit(**_JIT)
def _pack_columns(b, leading, depth, columns, column_blocks, depth_blocks, packed):
    """The flat ``b`` (``depth`` rows ``leading`` apart) as tiles of k-pairs.

    ``packed[part, column block, k block, k // 2, column, k % 2]``; ``packed``
    comes zeroed, and what lies past ``b`` stays so.
    """
    parts, tile, pair, width = _U(packed.size // 3), _U(_TILE * _PAIR), _U(_PAIR), _U(_TILE)
    for k in range(_U(depth)):
        row = (k // pair) * tile + ((k % pair) // _U(2)) * pair + k % _U(2)
        for jb in range(_U(column_blocks)):
            at, j0 = jb * _U(depth_blocks) * tile + row, k * _U(leading) + jb * width
            for c in range(min(width, _U(columns) - min(_U(columns), jb * width))):
                _store_split(packed, parts, at + _U(2) * c, b[j0 + c])  # weights are finite (the facades check)


@njit(**_JIT, inline="always")
def _rows(ap, first, second):
    """Tiles 4 and 5: two row tiles of ``a``'s parts, at ``first`` and ``second``."""
    _load(4, ap, first, 64)
    _load(5, ap, second, 64)


@njit(**_JIT, inline="always")
def _columns(bp, first, second):
    """Tiles 6 and 7: two column tiles of ``b``'s parts, at ``first`` and ``second``."""
    _load(6, bp, first, 64)
    _load(7, bp, second, 64)


@njit(**_JIT, inline="always")
def _products():
    """Tiles 0..3 (rows 4, 5 by columns 6, 7) += the products of the loaded row and column tiles."""
    _product(0, 4, 6)
    _product(1, 4, 7)
    _product(2, 5, 6)
    _product(3, 5, 7)


@njit(**_JIT)
def _block_products(ap, bp, a0, a1, b0, b1, parts_a, parts_b, depth_blocks):
    """Tiles 0..3 += rows (a0, a1) times columns (b0, b1), all six part products, over every k block.

    Per k block, in this order: high by high, middle by high, low by high,
    middle by middle, high by middle, high by low; 14 tile loads for 24
    products. Four sums in turn keep the unit busy (a product's latency is
    about three of its issue intervals; two sums ran at half the rate).
    """
    tile = _TILE * _PAIR
    for kb in range(depth_blocks):
        s = kb * tile
        _columns(bp, b0 + s, b1 + s)
        for part in range(3):
            _rows(ap, part * parts_a + a0 + s, part * parts_a + a1 + s)
            _products()
        _columns(bp, parts_b + b0 + s, parts_b + b1 + s)
        _rows(ap, parts_a + a0 + s, parts_a + a1 + s)
        _products()
        _rows(ap, a0 + s, a1 + s)
        _products()
        _columns(bp, 2 * parts_b + b0 + s, 2 * parts_b + b1 + s)
        _products()


@njit(**_JIT)
def _store_block(out, leading, rows, columns, row, column, edge):
    """Tiles 0..3 into the 32 x 32 block at (``row``, ``column``) of ``out`` (flat, rows ``leading`` apart).

    Through ``edge`` where the block passes the last row or column.
    """
    if row + 2 * _TILE <= rows and column + 2 * _TILE <= columns:
        at, stride = row * leading + column, 4 * leading
        _store(0, out, at, stride)
        _store(1, out, at + _TILE, stride)
        _store(2, out, at + _TILE * leading, stride)
        _store(3, out, at + _TILE * leading + _TILE, stride)
        return
    _store(0, edge, 0, 128)
    _store(1, edge, _TILE, 128)
    _store(2, edge, _TILE * 2 * _TILE, 128)
    _store(3, edge, _TILE * 2 * _TILE + _TILE, 128)
    for i in range(min(2 * _TILE, rows - row)):
        for j in range(min(2 * _TILE, columns - column)):
            out[(row + i) * leading + column + j] = edge[i * 2 * _TILE + j]


@njit(**_JIT)
def _config():
    """The tile configuration: palette 1, eight tiles of 16 rows of 64 bytes."""
    config = np.zeros(64, np.uint8)
    config[0] = 1
    for t in range(8):
        config[16 + 2 * t] = 64
        config[48 + t] = _TILE
    return config


def pack_tiles(matrix: np.ndarray) -> np.ndarray:
    """A float32 ``(k, n)`` matrix as :func:`tile_product` reads it: its three bfloat16 parts in tiles of k-pairs.

    Packed once, with the layer's other weights. Returned as float32 (two
    bfloat16 a value), so that a kernel passes it as it does its other
    arrays; 64-byte aligned.
    """
    depth, columns = matrix.shape
    depth_blocks, column_blocks = _layout(depth, columns)
    packed = _aligned(2 * tiles_size(depth, columns))
    _pack_columns(np.ascontiguousarray(matrix, dtype=np.float32).ravel(), columns, depth, columns, column_blocks,
                  depth_blocks, packed)
    return packed.view(np.float32)


def tile_product(a: np.ndarray, tiles: np.ndarray, out: np.ndarray) -> None:
    """``out = a @ b`` for C-contiguous float32 ``a`` (m, k) and ``out`` (m, n), ``b`` as :func:`pack_tiles` packs it.

    On AMX tiles; a ``RuntimeError`` where they cannot run (:func:`why_not`).
    """
    reason = why_not()
    if reason is not None:
        raise RuntimeError(f"tile_product: the AMX tile product cannot run here: {reason}")
    expected = tiles_size(a.shape[1], out.shape[1])
    if tiles.dtype != np.float32 or tiles.size != expected:
        raise ValueError(f"tile_product: tiles must be {expected} float32 values (pack_tiles of a "
                         f"{a.shape[1]} x {out.shape[1]} matrix); got {tiles.size} {tiles.dtype}")
    _tile_product_arrays(a, tiles, out)


@njit(**_JIT)
def _tile_product_arrays(a, tiles, out):
    _tile_product(a.ravel(), a.shape[1], a.shape[0], a.shape[1], tiles.view(np.uint16), out.ravel(), out.shape[1],
                  out.shape[1])


@njit(**_JIT)
def _tile_product(a, lda, rows, depth, bp, out, ldc, columns):
    """``out = a @ b`` on flat ``a`` and ``out`` whose rows are ``lda`` and ``ldc`` apart; ``bp``: ``b``'s tiles.

    :data:`ROW_BLOCK_BYTES` of ``a``'s rows packed at a time (in L2) while every
    column tile of ``b`` passes; blocks of 32 x 32 outputs, each summed over
    all of k in four tiles.
    """
    depth_blocks, column_blocks = _layout(depth, columns)
    tile = _TILE * _PAIR
    panel = depth_blocks * tile
    fitting = min(MAX_ROW_BLOCK, ROW_BLOCK_BYTES // (6 * _PAIR * depth_blocks))
    row_block = max(2 * _TILE, fitting // (2 * _TILE) * (2 * _TILE))
    row_block = min(row_block, (rows + 2 * _TILE - 1) // (2 * _TILE) * (2 * _TILE))  # a short call's rows
    parts_b, parts_a = column_blocks * panel, (row_block // _TILE) * panel
    ap = _aligned(3 * parts_a)
    odd = np.zeros(row_block, np.uint8)
    edge = _aligned(8 * _TILE * _TILE).view(np.float32)  # a 32 x 32 block of float32 outputs
    _load_config(_config())
    for r0 in range(0, rows, row_block):
        block_rows = min(row_block, rows - r0)
        _pack_rows(a[r0 * lda:], lda, block_rows, depth, depth_blocks, ap, odd)
        for cb in range(0, column_blocks, 2):
            for rb in range(0, (block_rows + _TILE - 1) // _TILE, 2):
                _zero(0)
                _zero(1)
                _zero(2)
                _zero(3)
                _block_products(ap, bp, rb * panel, (rb + 1) * panel, cb * panel, (cb + 1) * panel,
                                parts_a, parts_b, depth_blocks)
                _store_block(out, ldc, rows, columns, r0 + rb * _TILE, cb * _TILE, edge)
        for i in range(block_rows):
            if odd[i]:
                _row_in_float32(a[(r0 + i) * lda:], depth, bp, parts_b, depth_blocks, out[(r0 + i) * ldc:], columns)
    _release()


@njit(**_JIT)
def _row_in_float32(a, depth, bp, parts_b, depth_blocks, out, columns):
    """``out[:columns] = a[:depth] @ b`` in float32, ``b`` summed from its parts: a row with an infinity or a NaN.

    On tiles, an infinite value's zero parts would meet ``b``'s parts and
    make NaNs (0 * inf) where a float32 product gives infinities.
    """
    tile = _TILE * _PAIR
    for j in range(columns):
        total = np.float32(0.0)
        column = (j // _TILE) * depth_blocks * tile + (j % _TILE) * 2
        for k in range(depth):
            at = column + (k // _PAIR) * tile + ((k % _PAIR) // 2) * _PAIR + k % 2
            value = np.float32(0.0)
            for part in (2, 1, 0):
                value += _float(np.uint32(bp[part * parts_b + at]) << np.uint32(16))
            total += a[k] * value
        out[j] = total


_lock = threading.RLock()  # enabled() and the entry are asked for under it too


def _forget_in_child() -> None:
    """After ``fork``: a thread that held the lock (loading the entry) is not in the child."""
    global _lock
    _lock = threading.RLock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)
_state: dict = {}


def _policy() -> str:
    value = os.environ.get("NUMRNN_AMX", "auto").strip().lower()
    if value not in ("auto", "0", "1"):
        raise ValueError(f"NUMRNN_AMX must be 'auto', '0' or '1'; got {value!r}")
    return value


def why_not() -> str | None:
    """Why this process cannot run the tile GEMM (``None`` when it can), asking Linux for the tile state once."""
    with _lock:
        if "why_not" not in _state:
            _state["why_not"] = _find_why_not()
        return _state["why_not"]


def _find_why_not() -> str | None:
    if sys.platform != "linux" or platform.machine() not in ("x86_64", "AMD64"):
        return "not Linux on x86-64"
    import llvmlite.binding as llvm
    features = llvm.get_host_cpu_features()
    if not (features.get("amx-tile") and features.get("amx-bf16")):
        return "the CPU has no AMX-BF16"
    if numba.config.CPU_NAME or numba.config.CPU_FEATURES:
        return "numba compiles for a CPU other than this one (NUMBA_CPU_NAME / NUMBA_CPU_FEATURES)"
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) != 0:
        return f"Linux refused the tile state (arch_prctl: errno {ctypes.get_errno()})"
    return None


def enabled() -> bool:
    """Whether the kernels' float32 input projections run on the tiles in this process (``NUMRNN_AMX``)."""
    policy = _policy()
    if policy == "0":
        return False
    reason = why_not()
    if reason is None:
        return True
    if policy == "1":
        raise RuntimeError(f"NUMRNN_AMX=1, but the AMX tile product cannot run here: {reason}")
    return False


_F32 = types.CPointer(types.float32)
#: The entry's C signature: ``a``, ``tiles`` and ``out`` as data pointers with their shapes.
SIGNATURE = types.void(_F32, types.int64, types.int64, _F32, types.int64, _F32, types.int64, types.int64)


def _entry(a, a0, a1, tiles, t0, out, out0, out1):
    """:func:`tile_product` on C pointers and shapes."""
    _tile_product(numba.carray(a, (a0 * a1,)), a1, a0, a1, numba.carray(tiles, (t0,)).view(np.uint16),
                  numba.carray(out, (out0 * out1,)), out1, out1)


def _entry_address() -> int:
    """Address of :func:`tile_product`'s C entry, compiled (or loaded from numba's disk cache) on first use;
    the caller holds ``_lock``."""
    if "entry" not in _state:
        _state["entry"] = numba.cfunc(SIGNATURE, nopython=True, cache=True)(_entry)
    return _state["entry"].address


def tiles_for(matrix: np.ndarray, wanted: bool | None = None) -> np.ndarray:
    """A layer's input kernel ``(inputs, outputs)`` as its tiles, where this process projects with them; else empty.

    Tiles where :func:`enabled`, for float32 kernels of at least
    :data:`MIN_INPUTS` inputs and :data:`MIN_OUTPUTS` outputs; with
    ``wanted=True`` whatever the size or the process (a unit split worker's
    slice of a tiled kernel, which must sum as the whole kernel does, which
    a process without tiles computes from them in float32); never with
    ``wanted=False``. A kernel projects with
    the tiles when they are not empty; every schedule gets the same arrays
    (the unit split, tiles of its workers' columns), so that all sum alike.
    """
    inputs, outputs = matrix.shape
    if matrix.dtype != np.float32 or wanted is False:
        return aligned_zeros((0,), matrix.dtype)
    if wanted is None and not (inputs >= MIN_INPUTS and outputs >= MIN_OUTPUTS and enabled()):
        return aligned_zeros((0,), matrix.dtype)
    from numrnn.runtime import extern  # it imports this module

    extern.link_blas()  # names the forwarder, which _fill points at the product: not in a kernel's call
    _fill()
    return pack_tiles(matrix)


def untile(tiles: np.ndarray, inputs: int, outputs: int) -> np.ndarray:
    """The float32 matrix :func:`pack_tiles` packed into ``tiles``, exactly (its three parts summed)."""
    depth_blocks, column_blocks = _layout(inputs, outputs)
    bits = tiles.view(np.uint16).astype(np.uint32) << 16
    parts = bits.view(np.float32).reshape(3, column_blocks, depth_blocks, _PAIR // 2, _TILE, 2)
    total = parts[2] + parts[1] + parts[0]  # low + middle, exact; + high, exact (the parts of one float32)
    matrix = total.transpose(1, 2, 4, 0, 3).reshape(depth_blocks * _PAIR, column_blocks * _TILE)
    return np.ascontiguousarray(matrix[:inputs, :outputs])


_POINTER, _SIZE = ctypes.c_void_p, ctypes.c_int64
_CALLBACK = ctypes.CFUNCTYPE(None, _POINTER, _SIZE, _SIZE, _POINTER, _SIZE, _POINTER, _SIZE, _SIZE)


def _product_without_tiles(a, a0, a1, tiles, t0, out, out0, out1) -> None:
    """The C entry in a process without the tiles: ``out = a @ b`` in float32, ``b`` unpacked from its tiles.

    Reached only by tiles packed in another process (pickled with the rest
    of a pack): this process packs none.
    """
    def array(address, shape):
        count = int(np.prod(shape))
        return np.ctypeslib.as_array((ctypes.c_float * count).from_address(address)).reshape(shape)

    try:
        matrix = untile(array(tiles, (t0,)), a1, out1)
        np.dot(array(a, (a0, a1)), matrix, out=array(out, (out0, out1)))
    except BaseException:  # it cannot raise into the kernel, which would go on with outputs never written
        _abort("could not compute the tile product's stand-in")


def link() -> None:
    """Name the kernels' :data:`~codegen.cells.common.TILE_SYMBOL` to LLVM, once per process, before any kernel
    is compiled or loaded (``numrnn.runtime.extern.link_blas``).

    The name goes to a forwarder that jumps through a cell, which
    :func:`_fill` fills when the process first needs it (:func:`tiles_for`
    packing tiles, or else the forwarder's first call): loading the tile
    product from numba's disk cache (0.03 s of a first call, up to 0.3 s
    where it is the first thing numba loads) or compiling it (1-2 s) is for
    processes that pack tiles only.
    """
    from numrnn.runtime import extern  # it imports this module

    with _lock:
        if "cell" in _state:
            return
        engine, (address,), (cell,) = extern._forwarders([SIGNATURE], _FILL_SYMBOL, _FILL_CALLBACK)
        _state.update(forwarder=engine, cell=cell)  # the engine holds the forwarder's machine code
    import llvmlite.binding as llvm

    llvm.add_symbol(TILE_SYMBOL, address)


def _fill() -> None:
    """Point the forwarder at the tile product where :func:`enabled`, else at its float32 stand-in."""
    if "cell" not in _state:
        return  # not linked yet: link() comes before any kernel, whose calls fill it then
    with _lock:
        cell = ctypes.c_void_p.from_address(_state["cell"])
        if cell.value is None:  # NUMRNN_AMX=1 without the tiles raised when packing, not here
            on_tiles = os.environ.get("NUMRNN_AMX", "auto").strip() != "0" and why_not() is None
            cell.value = _entry_address() if on_tiles else _stand_in_address()


def _fill_from_kernel() -> None:
    """:func:`_fill` for a forwarder called before its cell was filled. An exception cannot reach the kernel
    that called it, and returning would jump to nowhere: it aborts."""
    try:
        _fill()
    except BaseException:
        _abort("could not link the tile product a running kernel called")


def _abort(what: str) -> None:
    try:
        traceback.print_exc()
        os.write(2, f"numrnn: {what}; aborting\n".encode())
    finally:
        os.abort()


_FILL_SYMBOL = "numrnn_fill_tile_product"
_FILL_CALLBACK = ctypes.CFUNCTYPE(None)(_fill_from_kernel)


def _stand_in_address() -> int:
    if "stand_in" not in _state:
        _state["stand_in"] = _CALLBACK(_product_without_tiles)
    return ctypes.cast(_state["stand_in"], ctypes.c_void_p).value
