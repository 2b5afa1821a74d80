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
    shares_divisions,
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
    """Scratch buffers a step reads whole after computing them: a projection's ``hn = o * tanh(c)``."""
    return ["hn"] if cell.proj_units else []


def emit_scratch(em: Emitter, ctx: LayerContext, dtype: str) -> None:
    """Per-layer buffers, allocated once before the time loop.

    A projection's ``hn``: one row's, projected in the row's loop; every
    row's where the unit split gathers it between the gates and the
    projection.
    """
    em(f"rh = np.empty((B, {4 * ctx.units}), dtype=np.{dtype})")
    if ctx.cell.proj_units:
        shape = f"(B, {ctx.units})" if ctx.gather else str(ctx.units)
        em(f"hn = np.empty({shape}, dtype=np.{dtype})")


def emit_step(em: Emitter, ctx: LayerContext) -> None:
    """One time step for every row.

    A projection under the unit split runs in a second pass over the rows,
    once the workers have gathered every row's ``hn``
    (``LayerContext.gather``): each projects its slice of ``h`` from all of it.
    """
    cell, u = ctx.cell, ctx.units
    act = lambda v: activation_expr(cell.activation, v, ctx.dtype)  # noqa: E731
    ract = lambda v: activation_expr(cell.recurrent_activation, v, ctx.dtype)  # noqa: E731
    emit_recurrent_product(em, ctx, ctx.recurrent_input, "wh", "rh", 4 * u)
    if cell.proj_units and ctx.gather:
        with row_loop(em, ctx, final=False):
            _emit_gates(em, ctx, act, ract, "hn[b, j]")
        whole = ctx.gather(em, "hn")
        with row_loop(em, ctx, final=True):
            _emit_projection(em, ctx, f"{whole}[b, j]", f"{whole}.shape[1]")
            emit_store_output(em, ctx)
        return
    with row_loop(em, ctx, final=True):
        _emit_gates(em, ctx, act, ract, "hn[j]" if cell.proj_units else "h[b, j]")
        if cell.proj_units:
            _emit_projection(em, ctx, "hn[j]", str(u))
        emit_store_output(em, ctx)


def _emit_gates(em: Emitter, ctx: LayerContext, act, ract, target: str) -> None:
    """Row ``b``'s gates, its new ``c`` and ``target = o * act(c)`` (``h``, or ``hn`` to project)."""
    cell, u = ctx.cell, ctx.units
    fractions, two = shares_divisions(cell, ctx.dtype), lit(2, ctx.dtype)
    with em.block(f"for j in range({u}):"):
        em("cp = c[b, j]")
        peep = (" + wp[0, j] * cp", " + wp[1, j] * cp") if cell.peephole else ("", "")
        forget_bias = f" + {lit(cell.forget_bias, ctx.dtype)}" if cell.forget_bias else ""
        em(
            f"ai = {ctx.xw('j')} + rh[b, j]{peep[0]}",
            f"af = {ctx.xw(f'{u} + j')} + rh[b, {u} + j]{forget_bias}{peep[1]}",
            f"ac = {ctx.xw(f'{2 * u} + j')} + rh[b, {2 * u} + j]",
            f"ao = {ctx.xw(f'{3 * u} + j')} + rh[b, {3 * u} + j]",
        )
        if fractions:
            em("ui = _tanh_clamp(HALF * ai)", "uf = _tanh_clamp(HALF * af)", "uc = _tanh_clamp(ac)",
               "qi = _tanh_den(ui)", "qf = _tanh_den(uf)", "qc = _tanh_den(uc)",
               "cn = ((qf + _tanh_num(uf)) * cp * qi * qc + (qi + _tanh_num(ui)) * _tanh_num(uc) * qf) "
               f"/ ({two} * qf * qi * qc)")
        else:
            em(f"cn = ({ract('af')}) * cp + ({ract('ai')}) * ({act('ac')})")
        if cell.cell_clip is not None:
            em(f"cn = min(max(cn, {lit(-cell.cell_clip, ctx.dtype)}), {lit(cell.cell_clip, ctx.dtype)})")
        if cell.peephole:
            em("ao = ao + wp[2, j] * cn")
        em("c[b, j] = cn")
        if fractions:
            em("uo = _tanh_clamp(HALF * ao)", "un = _tanh_clamp(cn)", "qo = _tanh_den(uo)",
               f"{target} = (qo + _tanh_num(uo)) * _tanh_num(un) / ({two} * qo * _tanh_den(un))")
        else:
            em(f"{target} = ({ract('ao')}) * ({act('cn')})")


def _emit_projection(em: Emitter, ctx: LayerContext, hn: str, units: str) -> None:
    """Row ``b``'s ``h`` (its ``proj_units`` columns) as dot products of ``hn`` (``units`` of them) with ``wr``."""
    with em.block(f"for p in range({ctx.cell.proj_units}):"):
        em(f"acc = {lit(0, ctx.dtype)}")
        with em.block(f"for j in range({units}):"):
            em(f"acc += {hn} * wr[p, j]")
        em("h[b, p] = acc")
