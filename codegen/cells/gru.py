"""GRU, gates ``z, r, h``; ``reset_after`` (Keras 3 / PyTorch) or before (Keras ``reset_after=False`` / TF1)."""

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
    if not cell.reset_after:
        return ["whzr", "whh"]
    return ["wh"] + (["bh"] if cell.has_recurrent_bias else [])


def pack_recurrent(cell: CellSpec, logical: dict) -> dict[str, np.ndarray]:
    """Recurrent arrays, each product's matrix as ``(inputs, outputs)``.

    Reset-before splits ``U`` so ``(r * h) U_h`` is its own product.
    """
    u, rk = cell.units, logical["recurrent_kernel"]
    if not cell.reset_after:
        return {"whzr": rk[:, : 2 * u], "whh": rk[:, 2 * u :]}
    packed = {"wh": rk}
    if cell.has_recurrent_bias:
        packed["bh"] = logical["recurrent_bias"]
    return packed


def scratch_names(cell: CellSpec) -> list[str]:
    """Buffers :func:`emit_scratch` allocates, in the order a step function takes them."""
    return ["rh"] if cell.reset_after else ["rzr", "zs", "rhs", "rhh"]


def gathered_names(cell: CellSpec) -> list[str]:
    """Scratch buffers a step reads whole after computing them: reset-before's ``r * h``, which ``U_h`` multiplies."""
    return [] if cell.reset_after else ["rhs"]


def emit_scratch(em: Emitter, ctx: LayerContext, dtype: str) -> None:
    """Per-layer buffers, allocated once before the time loop."""
    u = ctx.units
    if ctx.cell.reset_after:
        em(f"rh = np.empty((B, {3 * u}), dtype=np.{dtype})")
    else:
        em(
            f"rzr = np.empty((B, {2 * u}), dtype=np.{dtype})",
            f"zs = np.zeros((B, {u}), dtype=np.{dtype})",
            f"rhs = np.zeros((B, {u}), dtype=np.{dtype})",
            f"rhh = np.empty((B, {u}), dtype=np.{dtype})",
        )


def emit_step(em: Emitter, ctx: LayerContext) -> None:
    """One time step for every row."""
    if ctx.cell.reset_after:
        _emit_reset_after(em, ctx)
    else:
        _emit_reset_before(em, ctx)


def _emit_reset_after(em: Emitter, ctx: LayerContext) -> None:
    cell, u, one = ctx.cell, ctx.units, lit(1, ctx.dtype)
    bias = (lambda k: f" + bh[{k}]") if cell.has_recurrent_bias else (lambda k: "")
    emit_recurrent_product(em, ctx, ctx.recurrent_input, "wh", "rh", 3 * u)
    with row_loop(em, ctx, final=True):
        with em.block(f"for j in range({u}):"):
            em(
                f"az = {ctx.xw('j')} + rh[b, j]{bias('j')}",
                f"ar = {ctx.xw(f'{u} + j')} + rh[b, {u} + j]{bias(f'{u} + j')}",
                f"z = {activation_expr(cell.recurrent_activation, 'az', ctx.dtype)}",
                f"r = {activation_expr(cell.recurrent_activation, 'ar', ctx.dtype)}",
                f"ah = {ctx.xw(f'{2 * u} + j')} + r * (rh[b, {2 * u} + j]{bias(f'{2 * u} + j')})",
                f"h[b, j] = z * h[b, j] + ({one} - z) * ({activation_expr(cell.activation, 'ah', ctx.dtype)})",
            )
        emit_store_output(em, ctx)


def _emit_reset_before(em: Emitter, ctx: LayerContext) -> None:
    cell, u, one = ctx.cell, ctx.units, lit(1, ctx.dtype)
    emit_recurrent_product(em, ctx, ctx.recurrent_input, "whzr", "rzr", 2 * u)
    with row_loop(em, ctx, final=False):
        with em.block(f"for j in range({u}):"):
            em(
                f"az = {ctx.xw('j')} + rzr[b, j]",
                f"ar = {ctx.xw(f'{u} + j')} + rzr[b, {u} + j]",
                f"zs[b, j] = {activation_expr(cell.recurrent_activation, 'az', ctx.dtype)}",
                f"rhs[b, j] = ({activation_expr(cell.recurrent_activation, 'ar', ctx.dtype)}) * h[b, j]",
            )
    rhs = ctx.gather(em, "rhs") if ctx.gather else "rhs"
    emit_recurrent_product(em, ctx, rhs, "whh", "rhh", u)
    with row_loop(em, ctx, final=True):
        with em.block(f"for j in range({u}):"):
            em(
                f"ah = {ctx.xw(f'{2 * u} + j')} + rhh[b, j]",
                "z = zs[b, j]",
                f"h[b, j] = z * h[b, j] + ({one} - z) * ({activation_expr(cell.activation, 'ah', ctx.dtype)})",
            )
        emit_store_output(em, ctx)
