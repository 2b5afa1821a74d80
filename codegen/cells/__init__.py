"""One emitter module per cell kind, each with the same five functions.

``recurrent_names(cell)`` / ``pack_recurrent(cell, logical)``: the packed arrays
the time loop reads; ``scratch_names(cell)`` / ``emit_scratch(em, ctx, dtype)``:
buffers allocated once per layer; ``emit_step(em, ctx)``: one time step over
every batch row.
The input side (``kernel`` and ``bias``) is the same for every kind and is
handled by the target as one hoisted product per layer.
"""

from __future__ import annotations

import numpy as np

from codegen.cells import gru, lstm, simple
from codegen.spec import CellSpec

EMITTERS = {"simple": simple, "lstm": lstm, "gru": gru}


def emitter_for(cell: CellSpec):
    """The emitter module for ``cell.kind``."""
    return EMITTERS[cell.kind]


def packed_names(cell: CellSpec) -> list[str]:
    """All packed arrays of one cell in kernel-argument order: input side, then recurrent."""
    return ["wx"] + (["b"] if cell.use_bias else []) + emitter_for(cell).recurrent_names(cell)


#: How each packed array is cut for one worker of the unit split: along which axis, and whether that
#: axis holds the gate blocks side by side (``G`` blocks of ``units``) or the units once.
_SPLIT_AXES = {"wx": (1, True), "b": (0, True), "wh": (1, True), "bh": (0, True),
               "wp": (1, False)}


def split_packed(cell: CellSpec, arrays: list[np.ndarray], part: int, parts: int) -> list[np.ndarray]:
    """Worker ``part`` of ``parts``'s copy of one cell's packed arrays (:func:`packed_names` order).

    The worker owns units ``[part * n, (part + 1) * n)`` with ``n = units / parts``:
    it keeps those columns of every gate block, and whole rows where a matrix
    is indexed by the previous ``h`` (every worker reads all of it).
    """
    n = cell.units // parts
    lo, hi = part * n, (part + 1) * n
    out = []
    for name, array in zip(packed_names(cell), arrays):
        axis, gated = _SPLIT_AXES[name]
        blocks = cell.gates if gated else 1
        index = np.concatenate([np.arange(g * cell.units + lo, g * cell.units + hi) for g in range(blocks)])
        out.append(np.ascontiguousarray(np.take(array, index, axis=axis)))
    return out


def pack(cell: CellSpec, logical: dict, dtype: str) -> list[np.ndarray]:
    """Logical (Keras-layout) weights -> contiguous arrays in :func:`packed_names` order."""
    packed = {"wx": logical["kernel"]}
    if cell.use_bias:
        packed["b"] = logical["bias"]
    packed.update(emitter_for(cell).pack_recurrent(cell, logical))
    return [np.ascontiguousarray(packed[name], dtype=dtype) for name in packed_names(cell)]
