"""Pieces every cell emitter shares: activations, the per-row loop with masking, output stores.

Inside a generated layer function the names are fixed: ``s`` is the processing
step, ``t`` the input time it reads, ``b`` the batch row, ``xw`` the hoisted
input projection ``(T, B, G*units)`` (input bias included), ``h``/``c`` the
state arrays (updated in place), ``out`` the output ``(T_out, B, width)``.
"""

from __future__ import annotations

import functools
import os
import platform
import sys
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, replace

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


def shares_divisions(cell, dtype: str) -> bool:
    """Whether an LSTM's float32 gates put their activations over common denominators, dividing once per result.

    With ``sigmoid(a) = 0.5 + 0.5 tanh(a / 2)`` and ``tanh = p / q`` (the
    module's ``_tanh_num`` over ``_tanh_den``), ``sigmoid = (q + p) / 2q``,
    so ``c = sig(f) c' + sig(i) tanh(g)`` and ``h = sig(o) tanh(c)`` take
    one division each (two a unit, not five). The denominators lie in
    [0.0049, 0.95], so their products neither overflow nor lose precision;
    the error against float64 stays that of the activations (gates of 8x128
    random units: ``c`` 2.1e-7 -> 3.8e-7, ``h`` 2.5e-7 both ways). A
    division is the slowest operation of the gates: one thread, AVX-512, an
    8x128 step's gates 1.42 -> 1.06 us (0.89 with no division at all). A
    GRU's ``h = z h' + (1 - z) tanh(a)`` over one denominator (two
    divisions a unit, not three) gained 0-12 % of its gate loop (32x128 and
    128x120 units, two runs each) and nothing measurable on whole calls: its
    gates keep their activations.
    """
    return dtype == "float32" and cell.activation == "tanh" and cell.recurrent_activation == "sigmoid"


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
    helpers = (
        ("_tanh_clamp(x)", "x clamped to where float32 tanh rounds to +-1.",
         ["return min(max(x, -TANH_CLAMP), TANH_CLAMP)"]),
        ("_tanh_num(u)", "Numerator of _tanh's fraction at the clamped u.",
         ["x2 = u * u", f"return u * {_horner('TP', len(_TANH_P), 'x2')}"]),
        ("_tanh_den(u)", "Denominator of _tanh's fraction at the clamped u (0.0049 to 0.95).",
         ["x2 = u * u", f"return {_horner('TQ', len(_TANH_Q), 'x2')}"]),
        ("_tanh(x)", "float32 tanh, rational approximation (abs error < 4e-7).",
         ["u = _tanh_clamp(x)", "return _tanh_num(u) / _tanh_den(u)"]),
    )
    for signature, docstring, body in helpers:
        em(f"@njit({jit_options}, inline=\"always\")")
        with em.block(f"def {signature}:"):
            em(f'"""{docstring}"""', *body)
        em.blank()
        em.blank()
    em(f"@njit({jit_options}, inline=\"always\")")
    with em.block("def _sigmoid(x):"):
        em('"""float32 logistic sigmoid as 0.5 + 0.5 tanh(x / 2) (abs error < 3e-7)."""')
        em("return HALF + HALF * _tanh(HALF * x)")


#: Bytes of one vector the packed product can work in (``numrnn.runtime.simd``): AVX2's, AVX-512's.
VECTOR_WIDTHS = (32, 64)
#: Vectors per panel: the packed product's output block is :func:`panel_rows` rows by one panel.
PANEL_VECTORS = 2
#: Rows of the packed product's block where vectors are AVX2's (16 registers) and AVX-512's (32): see
#: :func:`panel_rows`. Of the rows left over from 8-row blocks, 4 to 7 take one block of them all, a block
#: shape each (products of that many rows by 128x512, one thread, 5 rows 5.35 -> 3.62 us, 6 4.94 -> 4.29,
#: 7 5.56 -> 4.39, against a 4-row block and the rest; bidir_masked, whose rows past the shortest length
#: are 5 to 7, direction split, before / after in alternating processes: 2.55 / 2.44, 2.95 / 2.77, 2.83 /
#: 2.61 ms). They cost compile time once a machine: seed000's first result on an empty cache (the helper process
#: compiling the shared module beside the kernel) 2.17-2.19 -> 2.50-2.53 s, alternating processes. Fewer than 4
#: rows left over as below.
PANEL_ROWS, WIDE_PANEL_ROWS = 4, 8
#: Panels per pass of the rows left over from the blocks of ``PANEL_ROWS`` (by their count; one if absent).
#: Three rows take one panel at a time: with two, 12 accumulators, 4 weight vectors and the
#: broadcast need 17 of AVX2's 16 registers, and the spills made 3 rows slower than 4 (128x512,
#: minimum of 15 interleaved repeats: 3 rows 9.5 -> 5.6 us, 7 rows 15.5 -> 11.4 us; 256x1024, 3 rows
#: 36 -> 23 us). Two rows keep two panels (3.1 against 5.3 us one at a time).
PANELS_PER_PASS = {1: 4, 2: 2}
#: The fused product (:func:`emit_fused_product`): recurrent panels per pass, input projection rows per block.
FUSED_PANELS = PANELS_PER_PASS[1]
FUSED_ROWS = 8
#: The smallest recurrent matrix (one worker's slice, bytes) whose layers fuse their projection into the
#: step's product: one thread, one row, a step's product and its share of the projection, separate / fused
#: (``fused_block``), medians of 9 x 4,000 steps with each step reading the last one's h: inputs x outputs
#: 64x128 (32 KiB, read from L1) 0.43 / 0.46 us; 64x256 0.93 / 0.82; 128x256 1.75 / 1.62; 256x512 7.2 / 7.0
#: (7.1-7.2 / 6.6-6.8 without reading h back).
FUSED_MIN_BYTES = 64 * 1024
#: The largest slice that fuses: past it the slice is read from L3, where the input kernel's stream beside it
#: costs more than the projection's own pass saves (and a layer's two matrices together can outgrow the 32 MiB
#: L3). One row, medians of 60-200 calls, processes in turns, fused / projected before the loop: LSTM(1024) on
#: 1024 inputs T50, unit split (8 MiB a worker) 13.6-15.3 / 8.6-9.5 ms, ONNX Runtime 11.6; on 256 inputs
#: 7.4-8.6 / 6.7-6.9 ms; LSTM(896), 6.1 MiB, 9.9-11.6 / 6.7-7.3 ms; LSTM(768), 4.5 MiB, 5.3-6.8 / 5.0-5.2 ms;
#: LSTM(640), 3.2 MiB, 2.7-5.1 / 2.8-5.5 ms; LSTM(512) serial, 4 MiB, 3.1-6.1 / 3.4-4.1 ms; LSTM(512) split,
#: 2 MiB, 1.7-3.1 / 2.0-3.6 ms; GRU(512) split, 1.5 MiB, 2.5-2.9 / 2.8-3.2 ms.
FUSED_MAX_BYTES = 2 * 1024 * 1024
#: CPUs (LLVM's names) on which no layer fuses its projection (:func:`fusion_pays`).
UNFUSED_CPUS = ("sapphirerapids", "emeraldrapids")


@functools.cache
def fusion_pays() -> bool:
    """Whether one-row layers fuse their input projection into the steps' products on this machine.

    The fused product fills the multiply-adds a one-row product leaves idle
    while its weights stream in. On the AVX-512 Zen 4 it won (see
    :data:`FUSED_MIN_BYTES` and :data:`FUSED_MAX_BYTES`); on an Emerald
    Rapids guest (full-width AVX-512, 2 MiB L2 a core), whose projection
    before the loop takes half the cycles, it lost at every size timed.
    One row, medians of 15 x 0.1 s, two processes each way in turns, fused
    / projected before the loop: LSTM(64) on 32 inputs T50 serial 36-38 /
    33-36 us; unit split T100, D=H: LSTM(128) 181-204 / 167-171 us,
    LSTM(192) 376-381 / 322-338, LSTM(256) 714-717 / 567-670, LSTM(384)
    1629-1710 / 1478-1489; LSTM(512) T50 2126-2137 / 1522-1615. So CPUs of
    that core (:data:`UNFUSED_CPUS`) project before the loop; other CPUs
    fuse, as measured on the Zen 4 (other Intel cores with AVX-512 were not
    measured). ``NUMRNN_FUSED_PROJECTION`` (1 or 0) overrides. The CPU is
    numba's target (:func:`_target_cpu_name`).
    """
    configured = os.environ.get("NUMRNN_FUSED_PROJECTION", "").strip()
    if configured:
        if configured not in ("0", "1"):
            raise ValueError(f"NUMRNN_FUSED_PROJECTION must be 0 or 1; got {configured!r}")
        return configured == "1"
    return _target_cpu_name() not in UNFUSED_CPUS


def _target_cpu_name() -> str:
    """The CPU numba compiles for, as LLVM names it: numba's setting (``NUMBA_CPU_NAME``), else the host's."""
    name = _numba_target_settings()[0]
    if name and name != "host":
        return name
    from llvmlite import binding  # numba imports it anyway; not at ``import numrnn``

    return binding.get_host_cpu_name()


#: The product's matrices, by packed name (every cell kind's ``recurrent_names`` that are one).
PRODUCT_MATRICES = ("wh", "whzr", "whh")
#: The packed-product function, as a kernel module names it (from the shared module).
PANEL_PRODUCT = "_panel_product"
#: The fused product function, as a kernel module names it (from the shared module).
FUSED_PRODUCT = "_fused_product"
#: ``out = a @ b`` by BLAS (``numrnn.runtime.extern.gemm``), as a kernel module names it (from the shared module).
DOT = "_dot"
#: ``out = a @ b`` from ``b``'s AMX tiles (``numrnn.runtime.amx``), as a float32 kernel module names it.
TILE_PRODUCT = "_tile_product"
#: LLVM's name for the C function behind :data:`TILE_PRODUCT`, which ``numrnn.runtime.amx.link`` names.
TILE_SYMBOL = "numrnn_tile_product_f32"


@functools.cache
def vector_bytes() -> int:
    """Bytes of one vector of the packed product: 64 where numba compiles for AVX-512, else 32.

    Zen 4 runs a 64-byte operation as two 32-byte halves, yet the wider
    vectors were faster there (fewer instructions and loads per multiply-add;
    ``numrnn bench``, alternating processes, 32 -> 64 bytes: seed002
    15.1-15.2 -> 14.4-14.5 ms, throughput512 277 -> 265 ms, seed000 71.5 ->
    68.9 ms, tiny64 46.1-46.8 against 46.5-47.4 us, latency256 within noise).
    Cores with full-width AVX-512 units can do twice the multiply-adds per
    cycle with them (not measured here). The target is numba's
    (:func:`_target_features`). ``NUMRNN_VECTOR_BYTES`` (32 or 64) overrides;
    either width computes the same sums on any machine, but 64-byte vectors
    where numba compiles without AVX-512 are split by LLVM and spill (the
    block shapes are sized for AVX2's 16 registers), so they run slower.
    Weights packed in one process fit only kernels of its width: the facades
    pack again after unpickling, and the kernels refuse other panels.
    """
    configured = os.environ.get("NUMRNN_VECTOR_BYTES", "").strip()
    if configured:
        if configured not in {str(width) for width in VECTOR_WIDTHS}:
            raise ValueError(f"NUMRNN_VECTOR_BYTES must be one of {', '.join(map(str, VECTOR_WIDTHS))}; "
                             f"got {configured!r}")
        return int(configured)
    return 64 if "+avx512f" in _target_features() else 32


def _target_features() -> set[str]:
    """The CPU features numba compiles for, as LLVM spells them (``+avx2``, ``-avx512f`` ...).

    numba's settings where numba is imported (they may come from its config
    file or be set in code); before that, its environment variables, read as
    numba reads them (``numba.core.config``, ``numba.core.codegen``): explicit
    features as given, none for the generic CPU, else the host's, without
    AVX where numba turns it off.
    """
    name, features, enable_avx = _numba_target_settings()
    if features is None and str(name).lower() == "generic":
        features = ""
    if features is None:
        from llvmlite import binding  # numba imports it anyway; not at ``import numrnn``

        try:
            host = binding.get_host_cpu_features()
        except RuntimeError:  # LLVM cannot read this host's features
            return set()
        if not (_numba_enables_avx(name or binding.get_host_cpu_name()) if enable_avx is None else enable_avx):
            host = {feature: enabled and not feature.startswith("avx") for feature, enabled in host.items()}
        return {("+" if enabled else "-") + feature for feature, enabled in host.items()}
    return {feature.strip() for feature in features.split(",")}


def _numba_target_settings() -> tuple[str | None, str | None, bool | None]:
    """numba's ``CPU_NAME``, ``CPU_FEATURES`` and ``ENABLE_AVX`` where numba is imported, else the first two's
    environment variables and ``None``."""
    config = sys.modules.get("numba.core.config")
    if config is not None:
        return config.CPU_NAME, config.CPU_FEATURES, config.ENABLE_AVX
    return os.environ.get("NUMBA_CPU_NAME"), os.environ.get("NUMBA_CPU_FEATURES"), None


def _numba_enables_avx(cpu_name: str) -> bool:
    """numba's ``ENABLE_AVX`` before numba is imported: ``NUMBA_ENABLE_AVX``, else its default for ``cpu_name``."""
    setting = os.environ.get("NUMBA_ENABLE_AVX")
    if setting is not None:
        try:
            return bool(int(setting))
        except ValueError:
            return True  # numba warns and keeps its default, the function that computes it: true
    if sys.platform.startswith("linux") and platform.machine() in ("i386", "i586", "i686", "x86_64"):
        try:
            with open("/proc/cpuinfo") as cpuinfo:
                flags = next((line.partition(":")[2].split() for line in cpuinfo
                              if line.partition(":")[0].strip() == "flags"), [])
        except OSError:
            flags = ["avx"]
        if "avx" not in flags:
            return False
    # AVX is off for CPUs where LLVM's AVX code was slow, and for a name that virtual machines report wrongly.
    return cpu_name not in {"corei7-avx", "core-avx-i", "sandybridge", "ivybridge", "nocona"}


def panel_rows() -> int:
    """Rows of the packed product's block: :data:`WIDE_PANEL_ROWS` where numba compiles AVX-512 vectors, else
    :data:`PANEL_ROWS`.

    A block keeps ``rows x PANEL_VECTORS`` sums in registers and loads its
    panel's vectors once per input for all its rows. AVX-512's 32 registers
    hold 8 rows' sums (16) beside the weights and the broadcast, and the
    panel, read from L2 when it outgrows L1 (512 inputs: 64 KiB), is read
    once per 8 rows rather than 4. On an Emerald Rapids guest (2 MiB L2,
    full-width AVX-512), one thread, medians of 15 x 50 ms, three alternating
    processes each, 4 -> 8 rows: LSTM(512) B32 T20 20.4-21.8 -> 18.0-19.8 ms,
    B64 T10 20.1-20.9 -> 18.2-18.9 ms, GRU(256) B64 T20 7.0-7.7 -> 5.7-6.9
    ms, LSTM(128) B128 T20 4.9-5.5 -> 4.2-5.2 ms, LSTM(256) B16 T50 5.9-6.2
    -> 5.3-6.0 ms; LSTM(128) B8 T100 (1.5-1.7 ms) and GRU(120) B64 T50
    (3.8-4.4 ms) within noise, and B4 (the same 4-row block) unchanged. Not
    measured on Zen 4, whose AVX-512 units are half width.
    """
    return WIDE_PANEL_ROWS if vector_bytes() == 64 and "+avx512f" in _target_features() else PANEL_ROWS


#: Bytes of one element, by the dtypes the kernels take.
ITEMSIZE = {"float32": 4, "float64": 8}


def vector_lanes(dtype: str) -> int:
    """Values of ``dtype`` in one vector (:func:`vector_bytes`)."""
    return vector_bytes() // ITEMSIZE[dtype]


def panel_width(dtype: str) -> int:
    """Output columns per panel of the packed recurrent matrix."""
    return PANEL_VECTORS * vector_lanes(dtype)


def recurrent_bytes(cell: CellSpec, dtype: str, units: int | None = None) -> int:
    """Bytes of ``cell``'s recurrent matrix, or of its columns for ``units`` units of every gate (a worker's slice)."""
    return cell.output_size * cell.gates * (cell.units if units is None else units) * ITEMSIZE[dtype]


def panels_name(matrix: str) -> str:
    """Packed name of ``matrix``'s panel copy (:func:`codegen.cells.to_panels`)."""
    return f"{matrix}_panels"


def tiles_name(matrix: str) -> str:
    """Packed name of ``matrix``'s AMX tile copy (``numrnn.runtime.amx.tiles_for``; empty where unused)."""
    return f"{matrix}_tiles"


#: The fewest outputs (gates x units) of an input kernel that may be tiled (``numrnn.runtime.amx``): cells
#: with fewer have no tile copy at all, so that their kernels take no argument for one (numba's dispatch
#: costs about 70 ns an argument, 3 % of a streaming step).
TILE_MIN_OUTPUTS = 512


def has_tiles(cell: CellSpec) -> bool:
    """Whether ``cell``'s input kernel has a tile copy among its packed arrays (empty where unused)."""
    return cell.gates * cell.units >= TILE_MIN_OUTPUTS


#: float32 values of a tile copy per 32 inputs and 32 outputs of its kernel: three parts of 32 x 32 bfloat16.
TILE_VALUES = 3 * 32 * 32 // 2


def tiles_size(inputs: int, outputs: int) -> int:
    """float32 values of the tile copy of an ``(inputs, outputs)`` kernel (``numrnn.runtime.amx.pack_tiles``)."""
    return TILE_VALUES * -(-inputs // 32) * -(-outputs // 32)


def emit_recurrent_product(em: Emitter, ctx: LayerContext, h: str, w: str, out: str, outputs: int) -> None:
    """``out = h @ w`` for every row (``w`` packed ``(inputs, outputs)``) this step computes.

    Up to ``small`` rows (a runtime argument) the packed product
    (:func:`emit_panel_product`) over ``w``'s panel copy; above, one BLAS GEMM.
    A layer with ``ctx.inline_one_row`` computes a one-row step's product
    in its own code instead (:func:`emit_one_row_product`).

    A layer that fuses its input projection (``ctx.fused_projection``)
    takes :func:`emit_fused_product` instead for the step's first product
    (the one that reads the previous ``h``) when its runtime flag ``fuse``
    is set: one row, the projection's rows (``xs``, ``wxp``, ``xwr``) not
    yet projected.

    Rows that this step masks (padding past a length, a masked Keras step)
    keep their state, so the product's output for them is never read: the
    packed product covers the rows from the first to the last unmasked one,
    and a step that masks every row skips it.
    """
    masked = ctx.masked_condition
    fused = ctx.fused_projection and h == ctx.recurrent_input
    if fused:
        with em.block("if fuse:"):
            em(f"short = T - s - {FUSED_ROWS}")
            with em.block(f"if s % {FUSED_ROWS} == 0 and 0 < short < {FUSED_ROWS}:"):  # the last block, short
                rows = "np.int64(0), short" if ctx.reverse == "full" else f"s + {FUSED_ROWS}, T"
                em(f"{PANEL_PRODUCT}(xs, wxp, xwr, {rows}, np.int64(0))")
            reverse = int(ctx.reverse == "full")
            em(f"{FUSED_PRODUCT}({h}, {panels_name(w)}, {out}, xs, wxp, xwr, s, T, np.int64({reverse}))")
    branch = "elif" if fused else "if"
    if ctx.inline_one_row and not fused:
        live = ctx.unmasked_condition("0")
        with em.block(f"if B == 1 and small > 0{'' if live is None else f' and {live}'}:"):
            emit_one_row_product(em, h, panels_name(w), out, outputs, ctx.dtype)
        branch = "elif"
    with em.block(f"{branch} B <= small:"):
        if masked() is None:
            # np.int64: a bare 0 would type as a literal, and numba would compile a second
            # panel product for it beside the masked layers' (int64) one.
            em(f"{PANEL_PRODUCT}({h}, {panels_name(w)}, {out}, np.int64(0), B, s % 2)")
        else:
            em("lo = 0", "hi = B")
            with em.block(f"while lo < B and ({masked('lo')}):"):
                em("lo += 1")
            with em.block(f"while hi > lo and ({masked('hi - 1')}):"):
                em("hi -= 1")
            with em.block("if lo < hi:"):
                em(f"{PANEL_PRODUCT}({h}, {panels_name(w)}, {out}, lo, hi, s % 2)")
    with em.block("else:"):
        em(f"{DOT}({h}, {w}, {out})")


def emit_one_row_product(em: Emitter, h: str, wp: str, out: str, outputs: int, dtype: str) -> None:
    """``out[0] = h[0] @ w`` from ``w``'s panels ``wp``, as the packed product computes it for one row, inline.

    The blocks of :func:`emit_panel_product` at one row, with the matrix's
    shape settled here: passes of ``PANELS_PER_PASS[1]`` panels (last to
    first on odd steps), then the panels left one at a time (in order: the
    shared entry takes them first and backward on odd steps, a walk that
    only a matrix larger than its cache notices). Each output adds the same
    terms in the same order as there. The panel and column counts are the
    spec's, as are the layer's panels and its ``out``: nothing is checked.

    The call of the shared module's entry cost a small slice's step more
    than the product saves by being compiled once: tiny64's unit split
    (LSTM(64), B1 T50, a 32 KiB slice a worker), 26.0 -> 24.1 us a call of
    the split kernel alone (a hand-edited copy, medians of 9 x 1,000 calls,
    the copies in turns), whole calls 29.7-30.1 -> 27.3-27.8 us (forced
    ``units``, medians of 5 x 2,000, old and new code in alternating
    processes, four pairs of five). The split kernel's cold compile did
    not measurably change (2.91-3.10 s before, 2.46-3.24 s after, three
    fresh modules each). A layer whose slice fuses its projection
    (``fused_projection``) calls the fused entry instead while it projects
    step by step (``fuse``), a step long enough (latency256's worker: 5.5
    us) not to notice a call, else the shared packed product. Serial
    kernels keep the call: a one-step LSTM(32) call with the packed
    product (``small`` 1; the streaming fast path itself keeps BLAS's gemv)
    took 1.51 us inline against 1.48 through the call. Longer one-row
    serial calls of layers too small to fuse were not measured.
    """
    width = panel_width(dtype)
    per_pass = PANELS_PER_PASS[1]
    passes = outputs // (per_pass * width)
    if passes == 1:
        em(f"panel_block({h}, {wp}, {out}, 0, 0, {width}, 1, {per_pass})")
    elif passes:
        with em.block(f"for i in range({passes}):"):
            em(f"p = {per_pass} * ({passes - 1} - i if s % 2 else i)")
            em(f"panel_block({h}, {wp}, {out}, 0, p, {width}, 1, {per_pass})")
    for p in range(passes * per_pass, -(-outputs // width)):
        em(f"panel_block({h}, {wp}, {out}, 0, {p}, {min(width, outputs - p * width)}, 1, 1)")


#: What the shared module's packed product needs from ``numrnn.runtime.simd``.
SIMD_NAMES = ("fused_block", "panel_block")


def emit_panel_product(em: Emitter) -> None:
    """Body of a C entry: ``out[b0:b1] = h[b0:b1] @ w`` from ``w``'s panels ``wp``, last panel first if ``backward``.

    ``wp`` is ``(panels, inputs, P)``: column block ``p`` of ``w``, zero-padded
    to ``P`` columns (:func:`codegen.cells.to_panels`). A micro-kernel keeps a
    block of outputs in vector registers over the whole input loop. Blocks of
    :func:`panel_rows` rows take one panel at a time, panel by panel, so a
    panel (a few KiB) stays in L1 from one row block to the next; from
    :data:`PANEL_ROWS` rows left over, one block of them all. Fewer rows
    left over take :data:`PANELS_PER_PASS` panels at a time: every vector
    register adds one term per input, and with fewer than about 8 of them a
    product waits on the multiply-add latency (1x256x512: 13.2 us one panel
    at a time, against 7.8 us for OpenBLAS's gemv).

    The layers pass ``backward = s % 2`` (any nonzero value is backward):
    odd steps walk the panels last to first. A recurrent matrix a little
    larger than the cache that holds it (LSTM(256) split over two cores: 512
    KiB each, the whole of a Zen 3 L2) read in the same order every step
    misses on every line, since each line is evicted just before it is
    needed again; read back and forth, a step starts with the lines the last
    one read most recently.

    ``h`` has ``inputs`` columns and ``out`` the matrix's ``outputs``, as
    the layer functions allocate them: nothing is bounds-checked.

    Every output adds its terms in input order, one (fused, float32)
    multiply-add each, as a dot product and the BLAS kernels do. An earlier
    hand loop that reassociated the sums drifted 2 ulp from PyTorch on the
    ``torch_rnn_relu_init`` fixture (|h| up to 68: 1.5e-5, over the 1e-5
    contract).

    Each block is one call of the intrinsic
    :func:`numrnn.runtime.simd.panel_block`, written out in this one function
    (the C entry) rather than called from ``@njit`` functions: numba compiles
    each function on its own (typing, lowering, LLVM's optimization and code
    generation), then links and optimizes it again inside its caller, and
    again inside the C entry. The seven functions of the earlier shared
    module (a micro-kernel per block shape, from about 400 calls of smaller
    intrinsics, then the loops over the panels) compiled in 5.1 s on a cold
    machine; this entry, with the same loops, in 1.1-1.3 s.
    """
    block = panel_rows()
    em("P = wp.shape[2]", "G = out.shape[1]", "n = wp.shape[0]", f"b = b0 + (b1 - b0) // {block} * {block}",
       "back = backward != 0")
    with em.block("for i in range(n):"):
        em("p = n - 1 - i if back else i", "cols = min(P, G - p * P)")
        with em.block(f"for r in range(b0, b, {block}):"):
            _emit_micro_kernel(em, "r", block, 1)
    for rows in range(block - 1, PANEL_ROWS - 1, -1):  # from PANEL_ROWS rows left over, a block of them all
        with em.block(f"{'if' if rows == block - 1 else 'elif'} b1 - b == {rows}:"):
            with em.block("for i in range(n):"):
                em("p = n - 1 - i if back else i", "cols = min(P, G - p * P)")
                _emit_micro_kernel(em, "b", rows, 1)
            em(f"b += {rows}")
    for rows in range(1, PANEL_ROWS):
        with em.block(f"{'if' if rows == 1 else 'elif'} b1 - b == {rows}:"):
            _emit_leftover_rows(em, rows)


def _emit_leftover_rows(em: Emitter, rows: int) -> None:
    """Rows ``b..b+rows-1``: passes of :data:`PANELS_PER_PASS` panels, then the panels left one at a time.

    Backward, the same passes in the opposite order. Each micro-kernel is
    written once: a loop over two phases, one of each kind of pass.
    """
    panels = PANELS_PER_PASS.get(rows, 1)
    if panels == 1:
        with em.block("for i in range(n):"):
            em("p = n - 1 - i if back else i", "cols = min(P, G - p * P)")
            _emit_micro_kernel(em, "b", rows, 1)
        return
    # the panels that the multi-panel passes cover; forward they come first, backward last
    em(f"full = G // ({panels} * P) * {panels}")
    with em.block("for phase in range(2):"):
        with em.block("if (phase == 0) != back:"):
            with em.block(f"for j in range(full // {panels}):"):
                em(f"p = full - {panels} * (j + 1) if back else {panels} * j")
                _emit_micro_kernel(em, "b", rows, panels)
        with em.block("else:"):
            with em.block("for j in range(n - full):"):
                em("p = n - 1 - j if back else full + j", "cols = min(P, G - p * P)")
                _emit_micro_kernel(em, "b", rows, 1)


def emit_fused_product(em: Emitter) -> None:
    """Body of a C entry: step ``s``'s recurrent product (one row) and its share of a later block's input projection.

    ``out[0] = h[0] @ up`` as :func:`emit_panel_product` computes it for one
    row, and, in the same passes (``numrnn.runtime.simd.fused_block``), a
    slice of ``xw = x @ wp`` (``wp`` the input kernel's panels): while steps
    ``FUSED_ROWS * j`` to ``FUSED_ROWS * j + FUSED_ROWS - 1`` run, each one
    projects ``1 / FUSED_ROWS`` of the vectors of the next block of rows
    (those of steps ``FUSED_ROWS * (j + 1)`` on: counted from the first
    row, or from the last when ``reverse``), so every row is ready a step
    before the step that reads it. The layer projects the first block
    before its loop, and a last block of fewer rows whole, in the first step
    of the block before it (:func:`emit_recurrent_product`), by the packed
    product: each block shape here would be one more loop for LLVM to
    compile (the shared module's float32 entries compile cold in 0.9 s
    without this one, 1.3 s with it, 1.6 s with those shapes in it). Odd
    steps run the recurrent passes last to first, as the packed product
    does.

    At one row the product multiplies each weight it loads once, and a
    recurrent matrix read from L2 keeps it at half the multiply-add rate;
    the projection's slice loads one weight vector per ``FUSED_ROWS``
    multiply-adds. LSTM(256) at one row, one of two workers (a 512 KiB
    slice), a step 7.2 us as product then projection, 6.6-7.0 us fused
    (``FUSED_MIN_BYTES``).
    """
    em("P = up.shape[2]", "G = out.shape[1]", "n = up.shape[0]", "Gx = xw.shape[1]",
       f"vectors = {PANEL_VECTORS} * wp.shape[0]", f"lanes = P // {PANEL_VECTORS}", "back = s % 2 != 0",
       f"first = (s // {FUSED_ROWS} + 1) * {FUSED_ROWS}",
       f"row = steps - first - {FUSED_ROWS} if reverse != 0 else first",
       f"per_step = -(-vectors // {FUSED_ROWS})", f"u0 = (s % {FUSED_ROWS}) * per_step",
       # a block of fewer rows is the layer's to project
       f"units = max(0, min(per_step, vectors - u0)) if steps - first >= {FUSED_ROWS} else 0",
       f"passes = G // ({FUSED_PANELS} * P)")
    with em.block("for phase in range(2):"):
        with em.block("if (phase == 0) != back:"):
            with em.block("for i in range(passes):"):
                em(f"p = {FUSED_PANELS} * (passes - 1 - i if back else i)")
                _emit_projection_unit(em, "u0 + i")
                with em.block("if i < units and valid > 0:"):
                    em(f"fused_block(h, up, out, x, wp, xw, p, row, q, v, valid, {FUSED_PANELS})")
                with em.block("else:"):
                    _emit_micro_kernel(em, "0", 1, FUSED_PANELS, "up")
        with em.block("else:"):
            with em.block(f"for j in range(n - passes * {FUSED_PANELS}):"):
                em(f"p = n - 1 - j if back else passes * {FUSED_PANELS} + j", "cols = min(P, G - p * P)")
                _emit_micro_kernel(em, "0", 1, 1, "up")
    with em.block("for i in range(passes, units):"):  # more projection vectors a step than recurrent passes
        _emit_projection_unit(em, "u0 + i")
        with em.block("if valid > 0:"):
            em("fused_block(h, up, out, x, wp, xw, 0, row, q, v, valid, 0)")


def _emit_projection_unit(em: Emitter, unit: str) -> None:
    """``q``, ``v``, ``valid``: the panel, vector and stored lanes of the block's projection vector ``unit``."""
    em(f"q = ({unit}) // {PANEL_VECTORS}", f"v = ({unit}) % {PANEL_VECTORS}", "valid = min(P, Gx - q * P) - v * lanes")


def _emit_micro_kernel(em: Emitter, row: str, rows: int, panels: int, matrix: str = "wp") -> None:
    """Rows ``row..row+rows-1`` times panels ``p..p+panels-1`` of ``matrix`` (full ones, or one of ``cols`` columns)."""
    em(f"panel_block(h, {matrix}, out, {row}, p, {'cols' if panels == 1 else 'P'}, {rows}, {panels})")


#: The C functions of the shared module (``numrnn.runtime.extern``), by the name kernels call them:
#: (what the function computes, its arrays with their dimensions, its int64 scalars, what emits its body).
EXTERN_FUNCTIONS = {
    PANEL_PRODUCT: ("The packed product", (("h", 2), ("wp", 3), ("out", 2)), ("b0", "b1", "backward"),
                    emit_panel_product),
    FUSED_PRODUCT: ("The fused product", (("h", 2), ("up", 3), ("out", 2), ("x", 2), ("wp", 3), ("xw", 2)),
                    ("s", "steps", "reverse"), emit_fused_product),
    DOT: ("out = a @ b by BLAS", (("a", 2), ("b", 2), ("out", 2)), (), lambda em: em("gemm(a, b, out)")),
}


def extern_name(call: str, suffix: str) -> str:
    """Name of the shared module's function behind ``call`` (a key of :data:`EXTERN_FUNCTIONS`) in a dtype flavor."""
    return f"{call[1:]}{suffix}"


def emit_extern_functions(em: Emitter, dtype: str, suffix: str, options: str) -> None:
    """The C entries of :data:`EXTERN_FUNCTIONS`, the intrinsics that call them, and ``link{suffix}()``.

    Kernels call the products through these intrinsics (``numrnn.runtime.extern``)
    rather than as ``@njit`` functions or ``np.dot``, so that numba does not
    compile a copy of them into every kernel; a kernel module calls
    ``link{suffix}()`` when imported. Each entry takes its arrays as data
    pointers and shapes (``h_data, h0, h1``), views them as arrays
    (``numba.carray``) and computes on those; ``options`` are the jit options
    of the entries beside those :func:`numrnn.runtime.extern.link_group` sets.
    """
    links = []
    for call, (what, arrays, scalars, emit_body) in EXTERN_FUNCTIONS.items():
        name = extern_name(call, suffix)
        args = [a for array, ndim in arrays for a in (f"{array}_data", *(f"{array}{i}" for i in range(ndim)))]
        ndims = tuple(ndim for _, ndim in arrays)
        with em.block(f"def {name}_c({', '.join(args + list(scalars))}):"):
            em(f'"""{what} ({dtype}) on C pointers and shapes (numrnn.runtime.extern)."""',
               *(f"{array} = carray({array}_data, ({', '.join(f'{array}{i}' for i in range(ndim))}))"
                 for array, ndim in arrays))
            emit_body(em)
        em.blank()
        em.blank()
        em(f"{name.upper()} = (f\"{{__name__}}.{name}\", {ndims!r}, {len(scalars)})",
           f"{name}_call = extern_call(*{name.upper()})")
        em.blank()
        em.blank()
        links.append(f"({name.upper()}, {name}_c)")
    with em.block(f"def link{suffix}():"):
        em(f'"""Compile or load the {dtype} C entries and name them to LLVM, once per process (before any kernel)."""',
           "link_blas()",
           f'link_group(f"{{__name__}}.link{suffix}", ({", ".join(links)}), {dtype}{options})')


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
    ``fused_projection``: the layer may project its input as it goes, in the
    step's product (:func:`emit_fused_product`).
    ``staged_projection``: the layer may project its input a few steps at a
    time into the first rows of ``xw``, which it then reads at ``tx``
    (``codegen.targets.cpu.emit_stage``).
    ``defer_output``: the step leaves the outputs to :func:`emit_output_pass`,
    which the layer emits where it chooses (the unit split: after sending
    the step's ``h``).
    ``inline_one_row``: a one-row step's product is the layer's own code
    (:func:`emit_one_row_product`), not a call of the shared module's; the
    module imports ``panel_block``.
    ``gather``: under the unit split, ``gather(em, name)`` emits the
    exchange that fills a buffer of every worker's units from each worker's
    scratch ``name`` (one of the cell's ``gathered_names``) and returns the
    whole buffer's name, which the step reads in place of ``name``.
    """

    cell: CellSpec
    masking: str
    reverse: str
    last_only: bool
    out_offset: int
    dtype: str = "float64"
    recurrent_input: str = "h"
    fused_projection: bool = False
    staged_projection: bool = False
    defer_output: bool = False
    inline_one_row: bool = False
    gather: Callable[[Emitter, str], str] | None = None

    @property
    def units(self) -> int:
        """Hidden units of the cell."""
        return self.cell.units

    def xw(self, column: str) -> str:
        """Row ``b``'s input projection at step time ``t``, column ``column``, with the input bias ``bx``.

        The bias is added here, in the gate loop that reads the projection
        anyway, rather than in a pass of its own over the whole ``(T * B,
        G * units)`` projection (seed000: 1.3 ms per layer and worker).
        A layer that stages its projection reads the stage's row ``tx``.
        """
        time = "tx" if self.staged_projection else "t"
        if self.cell.use_bias:
            return f"(xw[{time}, b, {column}] + bx[{column}])"
        return f"xw[{time}, b, {column}]"

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
        return self._row_condition(row, live=False)

    def unmasked_condition(self, row: str = "b") -> str | None:
        """Condition under which row ``row`` runs this step (:meth:`masked_condition`'s negation), or ``None``."""
        return self._row_condition(row, live=True)

    def _row_condition(self, row: str, *, live: bool) -> str | None:
        if self.masking in ("carry", "zero"):
            return f"mask[t, {row}]" if live else f"not mask[t, {row}]"
        if self.masking == "lengths":
            step = "s" if self.reverse == "valid" else "t"  # a valid-prefix reversal counts steps, not times
            return f"{step} {'<' if live else '>='} lengths[{row}]"
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
    previous one, or zeros) before skipping, unless the layer defers its
    outputs; in earlier phases it just skips.
    """
    with em.block("for b in range(B):"):
        if ctx.reverse == "valid":
            em("t = lengths[b] - 1 - s")
        condition = ctx.masked_condition()
        if condition is not None:
            with em.block(f"if {condition}:"):
                if final and not ctx.defer_output:
                    _emit_masked_output(em, ctx)
                em("continue")
        yield


def _emit_masked_output(em: Emitter, ctx: LayerContext) -> None:
    pos, off, w = ctx.out_position(masked=True), ctx.out_offset, ctx.width
    with em.block(f"for j in range({w}):"):
        value = "op[b, j]" if ctx.carries_output else lit(0, ctx.dtype)
        em(f"out[{pos}, b, {off} + j] = {value}")


def emit_store_output(em: Emitter, ctx: LayerContext) -> None:
    """Write row ``b``'s new ``h`` to the output (and to the carried output), unless the layer defers its outputs."""
    if ctx.defer_output:
        return
    pos, off, w = ctx.out_position(masked=False), ctx.out_offset, ctx.width
    with em.block(f"for j in range({w}):"):
        em(f"out[{pos}, b, {off} + j] = h[b, j]")
        if ctx.carries_output:
            em("op[b, j] = h[b, j]")


def emit_output_pass(em: Emitter, ctx: LayerContext) -> None:
    """The outputs of a step whose layer defers them (``ctx.defer_output``): each row's, as its step would write it."""
    ctx = replace(ctx, defer_output=False)
    with row_loop(em, ctx, final=True):
        emit_store_output(em, ctx)
