"""One emitter module per cell kind, each with the same six functions.

``recurrent_names(cell)`` / ``pack_recurrent(cell, logical)``: the packed arrays
the time loop reads; ``scratch_names(cell)`` / ``emit_scratch(em, ctx, dtype)``:
buffers allocated once per layer; ``gathered_names(cell)``: the scratch
buffers whose every unit a step reads after computing them, which the unit
split gathers from its workers within the step (``LayerContext.gather``);
``emit_step(em, ctx)``: one time step over every batch row.
The input side (``kernel`` and ``bias``) is the same for every kind and is
handled by the target as one hoisted product per layer; the kernel is kept
three times: as is for a BLAS GEMM, in panels for the packed product of a
short call, and as AMX tiles where the runtime makes them (empty elsewhere).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from codegen.cells import gru, lstm, simple
from codegen.cells.common import PRODUCT_MATRICES, has_tiles, panel_width, panels_name, tiles_name
from codegen.spec import CellSpec

EMITTERS = {"simple": simple, "lstm": lstm, "gru": gru}


def emitter_for(cell: CellSpec):
    """The emitter module for ``cell.kind``."""
    return EMITTERS[cell.kind]


def _product_matrices(cell: CellSpec) -> list[str]:
    """The cell kind's recurrent arrays that the per-step product reads, each with a panel copy."""
    return [name for name in emitter_for(cell).recurrent_names(cell) if name in PRODUCT_MATRICES]


def _panel_sources(cell: CellSpec) -> list[str]:
    """Every packed array with a panel copy: the input kernel (a short projection) and the product matrices."""
    return ["wx", *_product_matrices(cell)]


def recurrent_names(cell: CellSpec) -> list[str]:
    """Packed arrays the time loop reads: the cell kind's, then each product matrix's panel copy."""
    return emitter_for(cell).recurrent_names(cell) + [panels_name(name) for name in _product_matrices(cell)]


def packed_names(cell: CellSpec) -> list[str]:
    """All packed arrays of one cell in kernel-argument order: input side, then recurrent."""
    tiles = [tiles_name("wx")] if has_tiles(cell) else []
    return ["wx", panels_name("wx"), *tiles] + (["b"] if cell.use_bias else []) + recurrent_names(cell)


#: Byte alignment of every packed array (a cache line). The packed product loads its vectors from panel
#: rows of two; measured with 32-byte vectors (64-byte panel rows), 16 or 48 bytes off a line, every other
#: load straddles two lines. One thread,
#: rows x inputs x outputs, panels aligned / 16, 32, 48 bytes off: 1x64x256 0.68 / 1.11, 0.97, 1.07 us;
#: 32x512x2048 800 / 798, 868, 849 us. numpy's own arrays of this size start 16 bytes into a page.
ALIGNMENT = 64


def aligned_empty(shape: tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialized C-contiguous array whose data starts on an :data:`ALIGNMENT`-byte boundary."""
    dtype = np.dtype(dtype)
    size = math.prod(shape)
    flat = np.empty(size + ALIGNMENT // dtype.itemsize, dtype=dtype)
    start = (-flat.ctypes.data % ALIGNMENT) // dtype.itemsize
    return flat[start:start + size].reshape(shape)


def aligned_zeros(shape: tuple[int, ...], dtype) -> np.ndarray:
    """A zeroed C-contiguous array whose data starts on an :data:`ALIGNMENT`-byte boundary."""
    out = aligned_empty(shape, dtype)
    out.fill(0)
    return out


def aligned_copy(array: np.ndarray) -> np.ndarray:
    """A C-contiguous copy of ``array`` whose data starts on an :data:`ALIGNMENT`-byte boundary."""
    out = aligned_empty(array.shape, array.dtype)
    out[...] = array
    return out


def to_panels(matrix: np.ndarray) -> np.ndarray:
    """``(inputs, outputs)`` -> ``(panels, inputs, P)``: column blocks of ``P`` (zero-padded), each contiguous.

    The layout of the packed recurrent product
    (``codegen.cells.common.emit_panel_product``): it reads one panel row
    by row, so a panel is a short contiguous stream rather than ``inputs``
    cache lines a row of ``matrix`` apart (8x128x512: 13.1 us from panels,
    25.8 us from the row-major matrix).
    """
    inputs, outputs = matrix.shape
    width = panel_width(matrix.dtype.name)
    count = -(-outputs // width)
    padded = np.zeros((inputs, count * width), dtype=matrix.dtype)
    padded[:, :outputs] = matrix
    return aligned_copy(padded.reshape(inputs, count, width).transpose(1, 0, 2))


def no_tiles(matrix: np.ndarray, wanted: bool | None = None) -> np.ndarray:
    """The tile copy of an input kernel where there is none: empty (the kernels project without tiles)."""
    return aligned_zeros((0,), matrix.dtype)


#: ``tiles(matrix, wanted)``: an input kernel's tile copy, or an empty array (:func:`no_tiles`); ``wanted``
#: ``None`` leaves it to the function, ``True`` asks for tiles whatever the size (numrnn.runtime.amx.tiles_for).
Tiler = Callable[[np.ndarray, "bool | None"], np.ndarray]


def _with_panels(cell: CellSpec, arrays: dict[str, np.ndarray], tiles: Tiler,
                 wanted: bool | None = None) -> list[np.ndarray]:
    """``arrays`` (every packed name but the copies) in :func:`packed_names` order, the panels and the input
    kernel's tiles (``tiles(wx, wanted)``) added, all aligned."""
    copies = {panels_name(name): to_panels(arrays[name]) for name in _panel_sources(cell)}  # aligned already
    if has_tiles(cell):
        copies[tiles_name("wx")] = tiles(arrays["wx"], wanted)
    return [copies[name] if name in copies else aligned_copy(arrays[name]) for name in packed_names(cell)]


#: How each packed array is cut for one worker of the unit split: along which axis, how many blocks that
#: axis holds side by side (``None``: one per gate), and whether a block is ``units`` wide or, for an LSTM's
#: projection ``wr`` (``(proj_units, units)``, cut by the worker's slice of ``h``), ``output_size``. A GRU
#: that resets before its product keeps ``z, r`` in ``whzr`` and ``h`` in ``whh``.
_SPLIT_AXES = {"wx": (1, None, False), "b": (0, None, False), "wh": (1, None, False), "bh": (0, None, False),
               "whzr": (1, 2, False), "whh": (1, 1, False), "wp": (1, 1, False), "wr": (0, 1, True)}


def split_packed(cell: CellSpec, arrays: list[np.ndarray], part: int, parts: int,
                 tiles: Tiler = no_tiles) -> list[np.ndarray]:
    """Worker ``part`` of ``parts``'s copy of one cell's packed arrays (:func:`packed_names` order).

    The worker owns units ``[part * n, (part + 1) * n)`` with ``n = units / parts``:
    it keeps those columns of every gate block, and whole rows where a matrix
    is indexed by the previous ``h`` (every worker reads all of it). A
    projection's rows are cut by the outputs instead, ``output_size / parts``
    of them a worker.
    """
    out, copies, tiled = {}, {tiles_name("wx"), *(panels_name(name) for name in _panel_sources(cell))}, False
    for name, array in zip(packed_names(cell), arrays):
        if name in copies:
            tiled |= name == tiles_name("wx") and array.size > 0
            continue  # made again from the worker's slice (tiles where the whole kernel has them)
        axis, blocks, by_output = _SPLIT_AXES[name]
        blocks = cell.gates if blocks is None else blocks
        width = cell.output_size if by_output else cell.units
        n = width // parts
        index = np.concatenate([np.arange(g * width + part * n, g * width + (part + 1) * n) for g in range(blocks)])
        out[name] = np.take(array, index, axis=axis)
    if tiled and tiles is no_tiles:
        raise ValueError("split_packed: the cell's input kernel has tiles; pass the tiling function that made "
                         "them (numrnn.runtime.amx.tiles_for) to tile the worker's slice")
    return _with_panels(cell, out, tiles, tiled)


def pack(cell: CellSpec, logical: dict, dtype: str, tiles: Tiler = no_tiles) -> list[np.ndarray]:
    """Logical (Keras-layout) weights -> contiguous arrays in :func:`packed_names` order.

    ``tiles`` makes the input kernel's tile copy (:data:`Tiler`); numrnn
    passes its process's (``numrnn.runtime.kernels.pack_cell``).
    """
    packed = {"wx": logical["kernel"]}
    if cell.use_bias:
        packed["b"] = logical["bias"]
    packed.update(emitter_for(cell).pack_recurrent(cell, logical))
    # No copy here: _with_panels copies every array once, aligned.
    return _with_panels(cell, {name: np.asarray(array, dtype=dtype) for name, array in packed.items()}, tiles)
