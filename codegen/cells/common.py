"""Pieces every cell emitter shares: activations, the per-row loop with masking, output stores.

Inside a generated layer function the names are fixed: ``s`` is the processing
step, ``t`` the input time it reads, ``b`` the batch row, ``xw`` the hoisted
input projection ``(T, B, G*units)`` (input bias included), ``h``/``c`` the
state arrays (updated in place), ``out`` the output ``(T_out, B, width)``.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

from codegen.emit import Emitter
from codegen.spec import CellSpec


def activation_expr(name: str, v: str) -> str:
    """Scalar expression applying activation ``name`` to the variable ``v``."""
    return {
        "tanh": f"math.tanh({v})",
        # exp overflow for very negative v gives inf, and 1/inf = 0: no branch needed.
        "sigmoid": f"1.0 / (1.0 + math.exp(-{v}))",
        # Keras 3 definition (Keras 2 used 0.2 * v + 0.5).
        "hard_sigmoid": f"min(max({v} / 6.0 + 0.5, 0.0), 1.0)",
        "relu": f"max({v}, 0.0)",
        "linear": v,
    }[name]


@dataclass(frozen=True)
class LayerContext:
    """What a cell emitter needs to know about the layer it is emitting.

    ``last_only``: the layer only keeps its final output (``return_sequences``
    is false and this is the last layer), stored at ``out[0]``.
    ``out_offset``: first output column (a bidirectional block writes both
    directions side by side).
    """

    cell: CellSpec
    masking: str
    reverse: str
    last_only: bool
    out_offset: int

    @property
    def units(self) -> int:
        """Hidden units of the cell."""
        return self.cell.units

    @property
    def width(self) -> int:
        """Output / ``h`` width of the cell."""
        return self.cell.output_size

    @property
    def carries_output(self) -> bool:
        """Keras carry masking repeats the previous output, kept in ``op``."""
        return self.masking == "carry"

    def masked_condition(self) -> str | None:
        """Condition under which row ``b`` skips this step, or ``None`` when no step is skipped."""
        if self.masking in ("carry", "zero"):
            return "not mask[t, b]"
        if self.masking == "lengths":
            return "s >= lengths[b]" if self.reverse == "valid" else "t >= lengths[b]"
        return None

    def out_position(self, masked: bool) -> str:
        """Output time index for row ``b``: the input time, or ``s`` for a padded step of a valid-prefix reversal."""
        if self.last_only:
            return "0"
        return "s" if masked and self.reverse == "valid" else "t"


def emit_step_times(em: Emitter, ctx: LayerContext) -> None:
    """Set ``t`` (the input time read at step ``s``) where it is the same for every row."""
    if ctx.reverse == "none":
        em("t = s")
    elif ctx.reverse == "full":
        em("t = T - 1 - s")


def emit_scratch_for_output(em: Emitter, ctx: LayerContext, dtype: str) -> None:
    """Allocate the carried previous output (Keras: zeros before the first valid step)."""
    if ctx.carries_output:
        em(f"op = np.zeros((B, {ctx.width}), dtype=np.{dtype})")


@contextmanager
def row_loop(em: Emitter, ctx: LayerContext, *, final: bool):
    """Emit ``for b in range(B):`` with the row's time index and its masking.

    In the ``final`` phase a masked row writes its masked output (the carried
    previous one, or zeros) before skipping; in earlier phases it just skips.
    """
    with em.block("for b in range(B):"):
        if ctx.reverse == "valid":
            em("t = lengths[b] - 1 - s")
        condition = ctx.masked_condition()
        if condition is not None:
            with em.block(f"if {condition}:"):
                if final:
                    _emit_masked_output(em, ctx)
                em("continue")
        yield


def _emit_masked_output(em: Emitter, ctx: LayerContext) -> None:
    pos, off, w = ctx.out_position(masked=True), ctx.out_offset, ctx.width
    with em.block(f"for j in range({w}):"):
        value = "op[b, j]" if ctx.carries_output else "0.0"
        em(f"out[{pos}, b, {off} + j] = {value}")


def emit_store_output(em: Emitter, ctx: LayerContext) -> None:
    """Write row ``b``'s new ``h`` to the output (and to the carried output)."""
    pos, off, w = ctx.out_position(masked=False), ctx.out_offset, ctx.width
    with em.block(f"for j in range({w}):"):
        em(f"out[{pos}, b, {off} + j] = h[b, j]")
        if ctx.carries_output:
            em("op[b, j] = h[b, j]")
