"""SimpleRNN: ``h = act(x W + b + h U)``."""

from __future__ import annotations

import numpy as np

from codegen.cells.common import (
    LayerContext,
    activation_expr,
    emit_recurrent_product,
    emit_store_output,
    row_loop,
)
from codegen.emit import Emitter
from codegen.spec import CellSpec


def recurrent_names(cell: CellSpec) -> list[str]:
    """Packed arrays the time loop reads, in argument order."""
    return ["wh"]


def pack_recurrent(cell: CellSpec, logical: dict) -> dict[str, np.ndarray]:
    """Recurrent arrays: ``U`` as ``(inputs, outputs)`` (BLAS reads it; the packed product a panel copy)."""
    return {"wh": logical["recurrent_kernel"]}


def scratch_names(cell: CellSpec) -> list[str]:
    """Buffers :func:`emit_scratch` allocates, in the order a step function takes them."""
    return ["rh"]


def gathered_names(cell: CellSpec) -> list[str]:
    """Scratch buffers a step reads whole after computing them: none (each unit reads only its own gates)."""
    return []


def emit_scratch(em: Emitter, ctx: LayerContext, dtype: str) -> None:
    """Per-layer buffers, allocated once before the time loop."""
    em(f"rh = np.empty((B, {ctx.units}), dtype=np.{dtype})")


def emit_step(em: Emitter, ctx: LayerContext) -> None:
    """One time step for every row."""
    emit_recurrent_product(em, ctx, ctx.recurrent_input, "wh", "rh", ctx.units)
    with row_loop(em, ctx, final=True):
        with em.block(f"for j in range({ctx.units}):"):
            em(f"a = {ctx.xw('j')} + rh[b, j]")
            em(f"h[b, j] = {activation_expr(ctx.cell.activation, 'a', ctx.dtype)}")
        emit_store_output(em, ctx)
