"""LSTM, gates ``i, f, c, o``; optional peepholes, cell clip, output projection, runtime forget bias."""

from __future__ import annotations

import numpy as np

from codegen.cells.common import (
    LayerContext,
    activation_expr,
    emit_recurrent_product,
    emit_store_output,
    lit,
    row_loop,
)
from codegen.emit import Emitter
from codegen.spec import CellSpec


def recurrent_names(cell: CellSpec) -> list[str]:
    """Packed arrays the time loop reads, in argument order."""
    return ["wh"] + (["wp"] if cell.peephole else []) + (["wr"] if cell.proj_units else [])


def pack_recurrent(cell: CellSpec, logical: dict) -> dict[str, np.ndarray]:
    """Recurrent arrays: ``U`` as ``(inputs, outputs)``; the projection transposed (a dot product per output)."""
    packed = {"wh": logical["recurrent_kernel"]}
    if cell.peephole:
        packed["wp"] = logical["peephole"]
    if cell.proj_units:
        packed["wr"] = logical["projection"].T
    return packed


def scratch_names(cell: CellSpec) -> list[str]:
    """Buffers :func:`emit_scratch` allocates, in the order a step function takes them."""
    return ["rh"] + (["hn"] if cell.proj_units else [])


def gathered_names(cell: CellSpec) -> list[str]:
    """Scratch buffers a step reads whole after computing them: none that the unit split runs.

    A projection's ``hn`` would be, but a projected cell cannot split
    (``CellSpec.unit_split_blocker``).
    """
    return []


def emit_scratch(em: Emitter, ctx: LayerContext, dtype: str) -> None:
    """Per-layer buffers, allocated once before the time loop."""
    em(f"rh = np.empty((B, {4 * ctx.units}), dtype=np.{dtype})")
    if ctx.cell.proj_units:
        em(f"hn = np.empty({ctx.units}, dtype=np.{dtype})")


def emit_step(em: Emitter, ctx: LayerContext) -> None:
    """One time step for every row."""
    cell, u = ctx.cell, ctx.units
    act = lambda v: activation_expr(cell.activation, v, ctx.dtype)  # noqa: E731
    ract = lambda v: activation_expr(cell.recurrent_activation, v, ctx.dtype)  # noqa: E731
    emit_recurrent_product(em, ctx, ctx.recurrent_input, "wh", "rh", 4 * u)
    with row_loop(em, ctx, final=True):
        with em.block(f"for j in range({u}):"):
            em("cp = c[b, j]")
            peep = (" + wp[0, j] * cp", " + wp[1, j] * cp") if cell.peephole else ("", "")
            forget_bias = f" + {lit(cell.forget_bias, ctx.dtype)}" if cell.forget_bias else ""
            em(
                f"ai = {ctx.xw('j')} + rh[b, j]{peep[0]}",
                f"af = {ctx.xw(f'{u} + j')} + rh[b, {u} + j]{forget_bias}{peep[1]}",
                f"ac = {ctx.xw(f'{2 * u} + j')} + rh[b, {2 * u} + j]",
                f"ao = {ctx.xw(f'{3 * u} + j')} + rh[b, {3 * u} + j]",
                f"cn = ({ract('af')}) * cp + ({ract('ai')}) * ({act('ac')})",
            )
            if cell.cell_clip is not None:
                em(f"cn = min(max(cn, {lit(-cell.cell_clip, ctx.dtype)}), {lit(cell.cell_clip, ctx.dtype)})")
            if cell.peephole:
                em("ao = ao + wp[2, j] * cn")
            em("c[b, j] = cn")
            target = "hn[j]" if cell.proj_units else "h[b, j]"
            em(f"{target} = ({ract('ao')}) * ({act('cn')})")
        if cell.proj_units:
            with em.block(f"for p in range({cell.proj_units}):"):
                em(f"acc = {lit(0, ctx.dtype)}")
                with em.block(f"for j in range({u}):"):
                    em("acc += hn[j] * wr[p, j]")
                em("h[b, p] = acc")
        emit_store_output(em, ctx)
