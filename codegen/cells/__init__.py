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


def pack(cell: CellSpec, logical: dict, dtype: str) -> list[np.ndarray]:
    """Logical (Keras-layout) weights -> contiguous arrays in :func:`packed_names` order."""
    packed = {"wx": logical["kernel"]}
    if cell.use_bias:
        packed["b"] = logical["bias"]
    packed.update(emitter_for(cell).pack_recurrent(cell, logical))
    return [np.ascontiguousarray(packed[name], dtype=dtype) for name in packed_names(cell)]
