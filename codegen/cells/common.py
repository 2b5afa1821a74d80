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


def lit(value: float, dtype: str) -> str:
    """A float literal in ``dtype``: a bare Python float would promote float32 math to float64."""
    return f"np.float32({float(value)!r})" if dtype == "float32" else repr(float(value))


def activation_expr(name: str, v: str, dtype: str = "float64") -> str:
    """Scalar expression applying activation ``name`` to the variable ``v``.

    float64 uses libm (exact); float32 uses the module's ``_tanh``/``_sigmoid``
    (see :func:`emit_math_helpers`) and float32 constants, so the gate loop
    stays in float32 and vectorizes.
    """
    if dtype == "float32":
        return {
            "tanh": f"_tanh({v})",
            "sigmoid": f"_sigmoid({v})",
            "hard_sigmoid": f"min(max({v} / {lit(6, dtype)} + {lit(0.5, dtype)}, {lit(0, dtype)}), {lit(1, dtype)})",
            "relu": f"max({v}, {lit(0, dtype)})",
            "linear": v,
        }[name]
    return {
        "tanh": f"math.tanh({v})",
        # exp overflow for very negative v gives inf, and 1/inf = 0: no branch needed.
        "sigmoid": f"1.0 / (1.0 + math.exp(-{v}))",
        # Keras 3 definition (Keras 2 used 0.2 * v + 0.5).
        "hard_sigmoid": f"min(max({v} / 6.0 + 0.5, 0.0), 1.0)",
        "relu": f"max({v}, 0.0)",
        "linear": v,
    }[name]


#: Eigen's float32 tanh: x P(x^2) / Q(x^2) on x clamped to +-7.9988 (where tanh rounds to 1).
#: Max abs error 3.5e-7 over [-20, 20] (sigmoid through it: 2.3e-7); no libm call, so the gate
#: loop vectorizes (AVX2: 8 lanes). Replacing float64 libm exp/tanh made seed000 (3xGRU(120),
#: B128 T196) about 3x faster.
_TANH_P = (-2.76076847742355e-16, 2.00018790482477e-13, -8.60467152213735e-11, 5.12229709037114e-08,
           1.48572235717979e-05, 6.37261928875436e-04, 4.89352455891786e-03)
_TANH_Q = (1.19825839466702e-06, 1.18534705686654e-04, 2.26843463243900e-03, 4.89352518554385e-03)
_TANH_CLAMP = 7.99881172180175781


def _horner(prefix: str, count: int, var: str) -> str:
    """``((c0 * var + c1) * var + ...) + c{count-1}`` over the module constants ``<prefix>0..``."""
    expr = f"{prefix}0"
    for k in range(1, count):
        expr = f"({expr} * {var} + {prefix}{k})"
    return expr


def emit_math_helpers(em: Emitter, dtype: str, jit_options: str) -> None:
    """Module-level float32 ``_tanh`` and ``_sigmoid`` (nothing for float64, which uses libm).

    ``inline="always"``: inlined in numba IR, so they are not compiled and
    cached as functions of their own (seed000 cold compile 3.0 -> 2.7 s, warm
    disk-cache first call 0.61 -> 0.58 s).
    """
    if dtype != "float32":
        return
    for prefix, coefficients in (("TP", _TANH_P), ("TQ", _TANH_Q)):
        em(*(f"{prefix}{k} = np.float32({c!r})" for k, c in enumerate(coefficients)))
    em(f"TANH_CLAMP = np.float32({_TANH_CLAMP!r})", "HALF = np.float32(0.5)")
    em.blank()
    em.blank()
    em(f"@njit({jit_options}, inline=\"always\")")
    with em.block("def _tanh(x):"):
        em('"""float32 tanh, rational approximation (abs error < 4e-7)."""')
        em("x = min(max(x, -TANH_CLAMP), TANH_CLAMP)", "x2 = x * x")
        em(f"return x * {_horner('TP', len(_TANH_P), 'x2')} / {_horner('TQ', len(_TANH_Q), 'x2')}")
    em.blank()
    em.blank()
    em(f"@njit({jit_options}, inline=\"always\")")
    with em.block("def _sigmoid(x):"):
        em('"""float32 logistic sigmoid as 0.5 + 0.5 tanh(x / 2) (abs error < 3e-7)."""')
        em("return HALF + HALF * _tanh(HALF * x)")


def emit_recurrent_product(em: Emitter, ctx: LayerContext, h: str, w: str, out: str) -> None:
    """``out = h @ w`` for every row (``w`` packed ``(inputs, outputs)``) this step computes.

    Up to ``small`` rows (a runtime argument) a hand loop, two batch rows per
    pass over the weights: for four inputs ``k`` at a time, every output
    ``g`` gets ``(((o + h[k] w[k, g]) + h[k+1] w[k+1, g]) + ...)``, vectorized
    over ``g``. The sums run in input order, as a plain dot product and the
    BLAS kernels add them: an earlier hand loop (a vectorized dot product per
    output, its partial sums reassociated) drifted 2 ulp from PyTorch on the
    ``torch_rnn_relu_init`` fixture (|h| up to 68: 1.5e-5, over the 1e-5
    contract). Measured, one thread, OpenBLAS Haswell kernels (rows x inputs x
    outputs, this loop / the dot-product loop / BLAS): 2x64x256 2.9 / 3.7 /
    16.0 us, 4x128x512 21.8 / 25.2 / 65.1, 8x128x512 44.2 / 49.4 / 56.2,
    16x128x512 86.0 / 97.0 / 66.8. Above ``small`` rows, one BLAS GEMM.

    Rows that this step masks (padding past a length, a masked Keras step)
    keep their state, so the hand loop skips them (a pair when both are
    masked): their product would never be read.
    """
    masked = ctx.masked_condition
    with em.block("if B <= small:"):
        with em.block("for b in range(0, B - 1, 2):"):
            if masked() is not None:
                with em.block(f"if ({masked('b')}) and ({masked('b + 1')}):"):
                    em("continue")
            em(f"{ROWS_PRODUCT[2]}({h}, {w}, {out}, b)")
        last_row = "B % 2 == 1" + (f" and not ({masked('B - 1')})" if masked() is not None else "")
        with em.block(f"if {last_row}:"):
            em(f"{ROWS_PRODUCT[1]}({h}, {w}, {out}, B - 1)")
    with em.block("else:"):
        em(f"np.dot({h}, {w}, {out})")


#: The hand-loop functions, by rows per pass, as a kernel module names them. They live in the module
#: every CPU kernel shares (:func:`codegen.targets.cpu.generate_shared`), compiled once per machine
#: and not once per spec: inlined into every layer function the loops took 4 of the 9.5 s cold
#: compile of seed000; as functions of each kernel module, 1.0 of 4.6 s.
ROWS_PRODUCT = {1: "_row_product", 2: "_rows2_product"}


def emit_rows_product_functions(em: Emitter, jit_options: str, suffix: str) -> None:
    """``row_product{suffix}(h, w, out, b)`` and ``rows2_product{suffix}``: the hand loop for rows ``b[, b + 1]``."""
    for rows, name in ROWS_PRODUCT.items():
        em(f"@njit({jit_options})")
        with em.block(f"def {name[1:]}{suffix}(h, w, out, b):"):
            em(f'"""out[b:b + {rows}] = h[b:b + {rows}] @ w, the terms of each output added in input order."""')
            _emit_rows_product(em, "h", "w", "out", ("b", "b + 1")[:rows])
        em.blank()
        em.blank()


def _emit_rows_product(em: Emitter, h: str, w: str, out: str, rows: tuple[str, ...]) -> None:
    """The hand loop of :func:`emit_recurrent_product` for one or two rows (named ``o0, o1`` / ``h0, h1``)."""
    r = range(len(rows))
    em(*(f"o{i} = {out}[{row}]" for i, row in zip(r, rows)), *(f"h{i} = {h}[{row}]" for i, row in zip(r, rows)))
    em(f"K = {w}.shape[0]", f"wk0 = {w}[0]")
    with em.block(f"for g in range({w}.shape[1]):"):
        em(*(f"o{i}[g] = h{i}[0] * wk0[g]" for i in r))
    em("k = 1")
    with em.block("while k + 3 < K:"):
        em(*(f"wk{j} = {w}[k + {j}]" for j in range(4)))
        em(*(f"x{i}{j} = h{i}[k + {j}]" for i in r for j in range(4)))
        with em.block(f"for g in range({w}.shape[1]):"):
            for i in r:
                em(f"o{i}[g] = (((o{i}[g] + x{i}0 * wk0[g]) + x{i}1 * wk1[g]) + x{i}2 * wk2[g]) + x{i}3 * wk3[g]")
        em("k += 4")
    with em.block("while k < K:"):
        em(f"wk0 = {w}[k]", *(f"x{i}0 = h{i}[k]" for i in r))
        with em.block(f"for g in range({w}.shape[1]):"):
            em(*(f"o{i}[g] = o{i}[g] + x{i}0 * wk0[g]" for i in r))
        em("k += 1")


@dataclass(frozen=True)
class LayerContext:
    """What a cell emitter needs to know about the layer it is emitting.

    ``last_only``: the layer only keeps its final output (``return_sequences``
    is false and this is the last layer), stored at ``out[0]``.
    ``out_offset``: first output column (a bidirectional block writes both
    directions side by side).
    ``recurrent_input``: the array the step's recurrent product reads: ``h``
    itself, or under the unit split the whole previous ``h`` while ``h`` is
    the worker's own slice of the new one.
    """

    cell: CellSpec
    masking: str
    reverse: str
    last_only: bool
    out_offset: int
    dtype: str = "float64"
    recurrent_input: str = "h"

    @property
    def units(self) -> int:
        """Hidden units of the cell."""
        return self.cell.units

    def xw(self, column: str) -> str:
        """Row ``b``'s input projection at step time ``t``, column ``column``, with the input bias ``bx``.

        The bias is added here, in the gate loop that reads the projection
        anyway, rather than in a pass of its own over the whole ``(T * B,
        G * units)`` projection (seed000: 1.3 ms per layer and worker).
        """
        if self.cell.use_bias:
            return f"(xw[t, b, {column}] + bx[{column}])"
        return f"xw[t, b, {column}]"

    @property
    def width(self) -> int:
        """Output / ``h`` width of the cell."""
        return self.cell.output_size

    @property
    def carries_output(self) -> bool:
        """Keras carry masking repeats the previous output, kept in ``op``."""
        return self.masking == "carry"

    def masked_condition(self, row: str = "b") -> str | None:
        """Condition under which row ``row`` skips this step, or ``None`` when no step is skipped."""
        if self.masking in ("carry", "zero"):
            return f"not mask[t, {row}]"
        if self.masking == "lengths":
            return f"s >= lengths[{row}]" if self.reverse == "valid" else f"t >= lengths[{row}]"
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
        value = "op[b, j]" if ctx.carries_output else lit(0, ctx.dtype)
        em(f"out[{pos}, b, {off} + j] = {value}")


def emit_store_output(em: Emitter, ctx: LayerContext) -> None:
    """Write row ``b``'s new ``h`` to the output (and to the carried output)."""
    pos, off, w = ctx.out_position(masked=False), ctx.out_offset, ctx.width
    with em.block(f"for j in range({w}):"):
        em(f"out[{pos}, b, {off} + j] = h[b, j]")
        if ctx.carries_output:
            em("op[b, j] = h[b, j]")
