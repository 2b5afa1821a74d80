"""CPU target: one ``@njit`` module per spec.

The module holds one function per kind of layer (a cell run over time in one
direction: its recurrence, dynamic loop or static unroll; layers of equal
cells and contexts share it) and the kernel, which runs the blocks and
directions layer by layer. The packed recurrent products come from a module that
every kernel shares (:func:`generate_shared`), which also holds the GEMM; kernels
call both as C functions (``numrnn.runtime.extern``), so that numba does not
compile them again into each kernel, and carve their buffers from the workspace
with ``numrnn.runtime.views.view`` rather than numba's reshape. Executing a stack layer
by layer rather than step by step is exact for every masking mode, because a
masked step keeps the state of every cell of the stack; it lets each layer's
input projection be one product over all ``T * B`` rows, hoisted out of the loop
(a BLAS GEMM, or the packed product for a short call: :func:`emit_input_projection`),
or, in a long unmasked call, packed products of a few steps' rows at a time
inside the loop or a static unroll's steps (:func:`stages_projection`). Where
the runtime tiled a float32 layer's input kernel for AMX (its ``wx_tiles``,
``numrnn.runtime.amx``), those products are tile products instead, in calls
of :data:`TILE_MIN_STEPS` steps or more (:func:`projects_on_tiles`).

Kernel signature (all arrays C-contiguous, time-major)::

    kernel(x (T, B, D), [mask (T, B) bool | lengths (B,) int64],
           <states: per cell h[, c], updated in place>,
           <weights: per cell, codegen.cells.packed_names order>,
           y (T or 1, B, output_size), ws (workspace_size(T, T_out, B),), small)

``ws``: scratch the kernel carves its ``T * B``-sized buffers from (the input
projections, the sequences between layers and blocks); the module's
``workspace_size(T, T_out, B)`` says how many elements it needs
(:class:`Workspace`).

``small``: up to this many batch rows, a step's recurrent product is the
packed product (``codegen.cells.common.emit_panel_product``, over the
``*_panels`` weights) instead of a BLAS call (see
``numrnn.runtime.schedule.packed_product_rows``); where it is
positive, input projections of up to :func:`packed_projection_rows` rows
are the packed product too. At one row, a layer whose recurrent matrix is
read from L2 (or just past it) projects its input inside its steps'
products instead (:func:`fuses_projection`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import lru_cache, partial

from codegen.cells import emitter_for, packed_names, recurrent_names
from codegen.cells.common import (
    DOT,
    EXTERN_FUNCTIONS,
    FUSED_MAX_BYTES,
    FUSED_MIN_BYTES,
    FUSED_ROWS,
    ITEMSIZE,
    PANEL_PRODUCT,
    PANEL_VECTORS,
    SIMD_NAMES,
    TILE_PRODUCT,
    TILE_SYMBOL,
    TILE_VALUES,
    WIDE_PANEL_ROWS,
    LayerContext,
    emit_extern_functions,
    emit_math_helpers,
    emit_scratch_for_output,
    emit_step_times,
    extern_name,
    fusion_pays,
    has_tiles,
    panel_rows,
    panel_width,
    panels_name,
    recurrent_bytes,
    tiles_name,
    vector_bytes,
)
from codegen.emit import Emitter
from codegen.spec import CODEGEN_VERSION, CellSpec, StackSpec

#: error_model="numpy": a float division by zero gives inf/nan instead of raising ZeroDivisionError.
#: The check numba emits for Python semantics is a branch inside every division, which keeps LLVM
#: from vectorizing the gate loops: the GRU(120) gate loop at B=64 took 16.8 ms over 196 steps with
#: it and 1.4 ms without it.
JIT_OPTIONS = 'cache=True, nogil=True, error_model="numpy"'
#: float32 kernels may reassociate and contract (FMA): that lets LLVM vectorize the reductions of the
#: hand-written recurrent product and the gate loops. NaN/inf semantics are kept (no nnan/ninf).
#: float64 kernels stay exact.
FAST_MATH = 'fastmath={"nsz", "arcp", "contract", "reassoc", "afn"}'


#: ``numrnn.runtime.views.view``, as kernel modules name it.
VIEW = "_view"
#: ``numrnn.runtime.simd.full_width_vectors``, as kernel modules name it.
FULL_WIDTH = "_full_width_vectors"


def jit_options(dtype: str) -> str:
    """Arguments of every ``@njit`` of a module computing in ``dtype``."""
    return f"{JIT_OPTIONS}, {FAST_MATH}" if dtype == "float32" else JIT_OPTIONS


def full_width(dtype: str, gate_width: int | None = None) -> bool:
    """Whether a generated function asks LLVM for full-width vectors (:data:`FULL_WIDTH`).

    Where numba compiles AVX-512, and for a layer's function only where its
    gate loops (``gate_width`` columns: the units, or a worker's slice of
    them) fill whole vectors. LLVM's remainder of the wider loops was slower
    at some widths: GRU gates at 32 rows (one thread, ns a unit, 32-byte ->
    64-byte vectors) 120 units 1.30 -> 1.48, 104 4.69 -> 5.69 us a step, 88
    3.67 -> 4.74, against 64 1.57 -> 1.11 ns, 256 1.34 -> 1.01 (and 136,
    152, 200 faster too, 8-56 within noise); at 128 rows, 128 units 1.43-1.53
    -> 1.09-1.18 ns, 120 units 1.47-1.57 -> 1.84-1.91.
    """
    width = vector_bytes()
    return width == 64 and (gate_width is None or gate_width % (width // ITEMSIZE[dtype]) == 0)


@contextmanager
def njit_function(em: Emitter, dtype: str, signature: str, docstring: str | None = None,
                  gate_width: int | None = None):
    """Emit ``@njit`` and ``def signature:``, its docstring, then :data:`FULL_WIDTH`'s call where it applies.

    ``gate_width``: a layer function's gate columns (:func:`full_width`).
    Yields inside the body, for the caller's statements.
    """
    em(f"@njit({jit_options(dtype)})")
    with em.block(f"def {signature}:"):
        if docstring is not None:
            em(f'"""{docstring}"""')
        if full_width(dtype, gate_width):
            em(f"{FULL_WIDTH}()")
        yield


@dataclass(frozen=True)
class Layer:
    """One cell of the spec placed in its block and direction, with generated names."""

    index: int
    block: int
    direction: int
    cell: CellSpec
    input_size: int
    context: LayerContext
    #: Index of the first layer with the same cell and context, whose function this layer calls.
    owner: int

    @property
    def function(self) -> str:
        """Name of the generated layer function (shared by every layer with the same cell and context)."""
        return f"_layer{self.owner}_{self.cell.short_name()}"

    @property
    def owns_function(self) -> bool:
        """Whether this layer's function is emitted for it (it is the first layer of its kind)."""
        return self.owner == self.index

    def state_args(self) -> list[str]:
        """Kernel argument names of this cell's states."""
        return [f"s{self.index}_{name}" for name in self.cell.state_names]

    def weight_args(self) -> list[str]:
        """Kernel argument names of this cell's packed weights."""
        return [f"w{self.index}_{name}" for name in packed_names(self.cell)]


def condition_args(spec: StackSpec) -> list[str]:
    """The masking argument of the kernel and layer functions, if any."""
    return {"none": [], "carry": ["mask"], "zero": ["mask"], "lengths": ["lengths"]}[spec.masking]


def live_condition(spec: StackSpec) -> str | None:
    """When a step reads row ``b``'s input projection at time ``t`` (``None``: always).

    Every masking mode skips a masked step before it reads ``xw[t, b]``
    (:meth:`codegen.cells.common.LayerContext.masked_condition`): Keras masks
    at ``mask[t, b]``, lengths past ``lengths[b]`` in every direction (a
    valid-prefix reversal reads ``t = lengths[b] - 1 - s``).
    """
    return {"none": None, "carry": "mask[t, b]", "zero": "mask[t, b]", "lengths": "t < lengths[b]"}[spec.masking]


def emit_live_projection(em: Emitter, spec: StackSpec) -> None:
    """``_project_live``, a masked spec's input projection over the rows some step reads.

    A masked call's input projection need only cover the ``(t, b)`` rows some
    step reads (:func:`live_condition`): ``_project_live`` copies them to the
    front of a buffer, multiplies those, and moves the products back to their
    rows of ``xw``, in place, last row first (a row moves only to a later
    one); a call with no masked row multiplies its rows where they are.
    bidir_masked's stack (2xBiLSTM(128) B8 T100, lengths 50-100: a fifth of
    the rows padding), unsplit, one thread, medians of 20 interleaved calls:
    11.95 -> 10.62 ms. It costs compile time: that stack's first call (the
    shared module cached, fresh processes alternating) took 3.9-4.4 s,
    against 3.1-3.8 s without it and 4.8-5.4 s with a function each for the
    count, the gather and the scatter.
    """
    live = live_condition(spec)
    if live is None:
        return
    condition = condition_args(spec)[0]
    with njit_function(em, spec.dtype, f"_project_live(xs, {condition}, B, wx, wxp, wxt, xw, xc, packed_rows)",
                       "xw = xs @ wx for the rows of xs ((T * B, D)) a step reads; xc: a buffer as large as xs. "
                       "From wx's tiles wxt where they are not empty; else up to packed_rows of them the packed "
                       "product over wx's panels wxp, else BLAS."):
        em("T = xs.shape[0] // B", "n = 0")
        with _each_live_row(em, live):
            em("n += 1")
        with em.block("if n == T * B:"):
            _emit_live_product(em, spec.dtype, "xs", "xw")
            em("return")
        em("n = 0")
        with _each_live_row(em, live):
            em("r = t * B + b")
            with em.block("for k in range(xs.shape[1]):"):
                em("xc[n, k] = xs[r, k]")
            em("n += 1")
        with em.block("if n == 0:"):
            em("return")
        em(f"gathered = {VIEW}(xc, 0, (n, xs.shape[1]))", f"projected = {VIEW}(xw, 0, (n, xw.shape[1]))")
        _emit_live_product(em, spec.dtype, "gathered", "projected")
        with em.block("for r in range(T * B - 1, -1, -1):"):
            em("t = r // B", "b = r - t * B")
            with em.block(f"if {live}:"):
                em("n -= 1")
                with em.block("if n == r:"):
                    em("break  # the rows before are in place")
                with em.block("for k in range(xw.shape[1]):"):
                    em("xw[r, k] = xw[n, k]")


def _emit_live_product(em: Emitter, dtype: str, rows: str, out: str) -> None:
    """``_project_live``'s ``out = rows @ wx`` over ``n`` rows: from the tiles where there are (float32), else the
    packed product up to ``packed_rows``, else BLAS."""
    branch = "if"
    if dtype == "float32":
        with em.block(f"if {projects_on_tiles('wxt')}:"):
            em(f"{TILE_PRODUCT}({rows}, wxt, {out})")
        branch = "elif"
    with em.block(f"{branch} n <= packed_rows:"):
        em(f"{PANEL_PRODUCT}({rows}, wxp, {out}, np.int64(0), n, np.int64(0))")
    with em.block("else:"):
        em(f"{DOT}({rows}, wx, {out})")


@contextmanager
def _each_live_row(em: Emitter, live: str):
    """``for t in range(T): for b in range(B): if live:``, the body in the ``with`` block."""
    with em.block("for t in range(T):"), em.block("for b in range(B):"), em.block(f"if {live}:"):
        yield


def layers_of(spec: StackSpec) -> list[Layer]:
    """Every cell of the spec as a :class:`Layer`, in weight order.

    Layers with equal cells and contexts share one generated function: its
    body depends on nothing else (the input size only enters the projection,
    which the kernel does before the call). seed000's three GRU(120) layers,
    cold compile in fresh processes: 7.3-10.2 s as three functions, 5.2-7.8 s
    as one, same run time.
    """
    layers, input_sizes, owners = [], spec.input_sizes(), {}
    for bi, block in enumerate(spec.blocks):
        last_block = bi == len(spec.blocks) - 1
        offset = 0
        for di, direction in enumerate(block.directions):
            for ci, cell in enumerate(direction.cells):
                last_cell = ci == len(direction.cells) - 1
                index = len(layers)
                ctx = LayerContext(
                    cell=cell,
                    masking=spec.masking,
                    reverse=direction.reverse,
                    last_only=last_block and last_cell and not spec.return_sequences,
                    out_offset=offset if last_cell and _writes_side_by_side(block) else 0,
                    dtype=spec.dtype,
                )
                owner = owners.setdefault((cell, ctx), index)
                layers.append(Layer(index, bi, di, cell, input_sizes[index], ctx, owner))
            offset += direction.output_size
    return layers


def input_bias_args(cell: CellSpec) -> list[str]:
    """The layer function's input-bias parameter (``bx``, added in the gate loop), if the cell has a bias."""
    return ["bx"] if cell.use_bias else []


def kernel_arguments(spec: StackSpec, *, workspace: bool = True) -> list[str]:
    """The kernel's parameter names, in order (without ``ws`` for the split kernels, which take buffers)."""
    layers = layers_of(spec)
    states = [a for layer in layers for a in layer.state_args()]
    weights = [a for layer in layers for a in layer.weight_args()]
    return ["x", *condition_args(spec), *states, *weights, "y", *(["ws"] if workspace else []), "small"]


class NewArrays:
    """The buffers of a layer call as new arrays (the unit split: its rows are few); see :class:`Workspace`."""

    def __init__(self, dtype: str):
        self.dtype = dtype

    def projection(self, wx: str) -> str:
        """A new ``(T * B, wx.shape[1])`` projection buffer, an expression."""
        return f"np.empty((T * B, {wx}.shape[1]), dtype=np.{self.dtype})"

    def gathered(self, inputs: int) -> str:
        """A new ``(T * B, inputs)`` buffer for the rows the projection covers (:func:`emit_live_projection`)."""
        return f"np.empty((T * B, {inputs}), dtype=np.{self.dtype})"

    def emit_buffer(self, em: Emitter, name: str, rows: str, width: int) -> None:
        """``name = `` a new ``(rows, B, width)`` array."""
        em(f"{name} = np.empty(({rows}, B, {width}), dtype=np.{self.dtype})")


class Workspace:
    """The kernel's ``T * B``-sized buffers, carved from its ``ws`` argument, and the size they add up to.

    A fresh buffer of many MiB is mapped from the OS by malloc and returned to
    it on free, so every call faulted its pages in again: seed000 (B=128,
    T=196) ran 145 ms against 114 ms with malloc told to keep its memory
    (``MALLOC_MMAP_THRESHOLD_``), throughput512 447 against 355 ms. The
    runtime keeps a workspace per concurrent call instead.

    Every layer's input projection takes the region at offset 0: the layer's
    recurrence consumes it before the next projection writes it; so does the
    region after it, where a masked spec gathers the rows its projection
    covers (:func:`emit_live_projection`). Every other buffer (a sequence
    between layers, a block's output, a merge) gets a region of its own, in
    the order of the code.
    """

    def __init__(self, spec: StackSpec):
        self.projection_width = max(cell.gates * cell.units for cell in spec.cells)
        self.gather_width = max(spec.input_sizes()) if live_condition(spec) else 0
        self.terms: list[tuple[str, int]] = [("T", self.projection_width)]
        if self.gather_width:
            self.terms.append(("T", self.gather_width))

    def emit_start(self, em: Emitter) -> None:
        """``top``: the first element after the projection region (and the gather region)."""
        em(f"top = T * B * {self.projection_width + self.gather_width}")

    def projection(self, wx: str) -> str:
        """The ``(T * B, wx.shape[1])`` projection buffer, an expression."""
        return f"{VIEW}(ws, 0, (T * B, {wx}.shape[1]))"

    def gathered(self, inputs: int) -> str:
        """The ``(T * B, inputs)`` buffer for the rows the projection covers, an expression."""
        return f"{VIEW}(ws, T * B * {self.projection_width}, (T * B, {inputs}))"

    def emit_buffer(self, em: Emitter, name: str, rows: str, width: int) -> None:
        """``name = `` the next ``(rows, B, width)`` region (``rows``: ``"T"`` or ``"T_out"``)."""
        size = f"{rows} * B * {width}"
        em(f"{name} = {VIEW}(ws, top, ({rows}, B, {width}))", f"top += {size}")
        self.terms.append((rows, width))

    def size_expression(self) -> str:
        """Elements of ``ws`` the buffers emitted so far take, in ``T``, ``T_out`` and ``B``."""
        return f"B * ({' + '.join(f'{rows} * {width}' for rows, width in self.terms)})"

    def emit_check(self, em: Emitter) -> None:
        """Raise unless ``ws`` holds every buffer emitted so far (the views are not checked)."""
        with em.block(f"if ws.shape[0] < {self.size_expression()}:"):
            em('raise ValueError("ws: smaller than the module\'s workspace_size(T, T_out, B)")')

    def emit_size_function(self, em: Emitter) -> None:
        """The module's ``workspace_size(T, T_out, B)``: elements of ``ws`` the kernel carves."""
        with em.block("def workspace_size(T, T_out, B):"):
            em('"""Elements of the kernel\'s ``ws`` argument for a call on T steps (T_out output rows), B rows."""')
            em(f"return {self.size_expression()}")
        em.blank()
        em.blank()


def _writes_side_by_side(block) -> bool:
    return len(block.directions) == 2


def _needs_merge(block) -> bool:
    return len(block.directions) == 2 and block.merge in ("sum", "mul", "ave")


def generate(spec: StackSpec) -> str:
    """Python source of the module for ``spec``."""
    em = Emitter()
    em(
        f'"""numrnn kernel {spec.kernel_name()} (codegen v{CODEGEN_VERSION}, key {spec.cache_key()}).',
        "",
        "Generated from this spec; do not edit:",
        f"{spec.to_json()}",
        '"""',
        "",
        "import math",
        "",
        "import numpy as np",
        "from numba import njit",
        "",
        f"from numrnn.runtime.views import view as {VIEW}",
        *([f"from numrnn.runtime.simd import full_width_vectors as {FULL_WIDTH}"] if full_width(spec.dtype) else []),
    )
    if spec.unit_split > 1 or spec.direction_split:
        from codegen.targets.cpu_split import ALIGNED_EMPTY, ALIGNED_ZEROS, SYNC_IMPORTS

        em("", f"from codegen.cells import aligned_empty as {ALIGNED_EMPTY}, aligned_zeros as {ALIGNED_ZEROS}",
           *(["from numrnn.runtime.simd import panel_block"] if spec.unit_split > 1 else []),
           f"from numrnn.runtime.sync import {SYNC_IMPORTS}")
    layers = layers_of(spec)
    em.blank()
    emit_math_helpers(em, spec.dtype, jit_options(spec.dtype))
    _emit_shared_imports(em, spec)
    emit_live_projection(em, spec)
    if spec.unit_split > 1:
        from codegen.targets.cpu_split import emit_split_module_body

        emit_split_module_body(em, spec)
        return em.source()
    if spec.direction_split:
        from codegen.targets.cpu_dirsplit import emit_dirsplit_module_body

        emit_dirsplit_module_body(em, spec)
        return em.source()
    emit_each_layer(em, spec, layers, _emit_layer_function)
    workspace = Workspace(spec)
    _emit_kernel(em, spec, layers, workspace)
    em.blank()
    em.blank()
    workspace.emit_size_function(em)
    return em.source()


#: Suffix of the shared functions compiled with each dtype's options (:func:`jit_options`).
SHARED_SUFFIX = {"float32": "_fast", "float64": "_exact"}


@lru_cache(maxsize=1)
def generate_shared() -> str:
    """Source of the module every CPU kernel imports its packed recurrent products from.

    One module for all specs, so its functions are compiled (and cached on
    disk) once per machine rather than once per spec; a flavor per dtype, as
    the kernels' jit options differ. Kernels import it by
    :func:`shared_module_name`, which hashes this source: a change here changes
    every kernel's source, and so invalidates their disk caches too.
    """
    em = Emitter()
    em('"""numrnn: the functions every CPU kernel shares. Generated; do not edit."""', "",
       *(f"# numrnn.runtime.{name} sha1 {_runtime_source_hash(name)}" for name in ("simd", "extern", "views")),
       # numrnn.runtime.simd builds its vectors from these: a new width must change the module's name.
       f"# panel_block: {vector_bytes()}-byte vectors, {PANEL_VECTORS} per panel",
       "from numba import carray, float32, float64", "",
       "from numrnn.runtime.extern import extern_call, gemm, link_blas, link_group",
       f"from numrnn.runtime.simd import {', '.join(SIMD_NAMES)}")
    for dtype, suffix in SHARED_SUFFIX.items():
        em.blank()
        em.blank()
        emit_extern_functions(em, dtype, suffix, f", {FAST_MATH}" if dtype == "float32" else "")
    em.blank()
    em.blank()
    em("# out = a @ b from b's AMX tiles: named to LLVM by numrnn.runtime.amx.link (through link_blas).",
       f'tile_product_call = extern_call("{TILE_SYMBOL}", (2, 1, 2), 0)')
    return em.source()


def _runtime_source_hash(module: str) -> str:
    """Hash of ``numrnn.runtime.<module>``'s source: the shared module's name changes with it, and so its disk cache.

    The intrinsics of ``simd``, ``extern`` and ``views`` are compiled into
    the shared module's and the kernels' machine code.
    """
    package = importlib.util.find_spec("numrnn")  # finds the package without importing it (or numba)
    with open(os.path.join(package.submodule_search_locations[0], "runtime", f"{module}.py"), "rb") as f:
        return hashlib.sha1(f.read()).hexdigest()[:16]


@lru_cache(maxsize=1)
def shared_module_name() -> str:
    """Importable name of :func:`generate_shared`'s module, from a hash of its source."""
    return f"numrnn_shared_{hashlib.sha1(generate_shared().encode()).hexdigest()[:16]}"


def _emit_shared_imports(em: Emitter, spec: StackSpec) -> None:
    suffix = SHARED_SUFFIX[spec.dtype]
    names = ", ".join(f"{extern_name(call, suffix)}_call as {call}" for call in EXTERN_FUNCTIONS)
    if spec.dtype == "float32":
        names += f", tile_product_call as {TILE_PRODUCT}"
    em("", "# The numrnn runtime imports this module before the kernel's (numrnn.runtime.kernels).",
       f"from {shared_module_name()} import {names}, link{suffix}",
       "", f"link{suffix}()")
    em.blank()
    em.blank()


def emit_each_layer(em: Emitter, spec: StackSpec, layers: list[Layer], emit_layer) -> None:
    """``emit_layer(em, spec, layer)`` for every layer that owns its function, two blank lines around each."""
    for layer in layers:
        if not layer.owns_function:
            continue
        em.blank()
        em.blank()
        emit_layer(em, spec, layer)
    em.blank()
    em.blank()


def _emit_layer_function(em: Emitter, spec: StackSpec, layer: Layer) -> None:
    """The layer's recurrence: a dynamic ``for s`` loop, a partially unrolled loop, or a static unroll.

    A static unroll is straight-line code: one call of the layer's step
    function per step, with constant step indices (a staged projection's
    stage starts in the step that reaches it, as in the loop). Measured on GRU(120), B=128:
    inlining the step body T times compiled in 2.8 s at T=8 and 7.2 s at T=32
    (about 0.18 s per step and layer, so minutes for 3 layers at T=196) for no
    gain in run time; the step calls compile in 1.8 s and 2.0 s. The index is
    passed as ``np.int64(k)``: a bare literal makes numba compile one
    specialization of the step function per step.

    A partial unroll (``spec.unroll_steps = k > 1``) does inline the body: k
    copies per iteration of a loop over ``T - T % k`` steps, then one copy in a
    plain loop over the remainder, so it accepts any T and its compile cost is
    bounded by k, not T.
    """
    cell, ctx = layer.cell, layer.context
    emitter = emitter_for(cell)
    fused = fuses_projection(ctx, cell.units)
    staged = stages_projection(spec, ctx)
    ctx = replace(ctx, fused_projection=fused, staged_projection=staged)
    params = ["xw", *input_bias_args(cell), *recurrent_names(cell), *cell.state_names, *condition_args(spec),
              "out", "small", *projection_params(fused, staged, has_tiles(cell))]
    scratch = emitter.scratch_names(cell) + (["op"] if ctx.carries_output else [])
    step_params = ["s", "T", "B", *params, *scratch, *(STAGE_NAMES if staged else [])]
    if spec.unroll is not None:
        with njit_function(em, spec.dtype, f"{layer.function}_step({', '.join(step_params)})",
                           gate_width=cell.units):
            _emit_step(em, ctx, emitter)
        em.blank()
        em.blank()
    with njit_function(em, spec.dtype, f"{layer.function}({', '.join(params)})", gate_width=cell.units):
        em(f"T = {spec.unroll}" if spec.unroll is not None else "T = xw.shape[0]", "B = xw.shape[1]")
        emitter.emit_scratch(em, ctx, spec.dtype)
        emit_scratch_for_output(em, ctx, spec.dtype)
        if fused:
            emit_first_projection_block(em, ctx)
        if staged:
            emit_stage_setup(em)
        if spec.unroll is not None:
            rest = ", ".join(step_params[1:])
            for step in range(spec.unroll):
                em(f"{layer.function}_step(np.int64({step}), {rest})")
        elif spec.unroll_steps > 1:
            _emit_partial_unroll(em, ctx, emitter, spec.unroll_steps)
        else:
            with em.block("for s in range(T):"):
                _emit_step(em, ctx, emitter)


def _emit_partial_unroll(em: Emitter, ctx: LayerContext, emitter, k: int) -> None:
    em(f"T_main = T - T % {k}")
    with em.block(f"for s0 in range(0, T_main, {k}):"):
        for j in range(k):
            em(f"# step s0 + {j}", f"s = s0 + {j}" if j else "s = s0")
            _emit_step(em, ctx, emitter)
    with em.block("for s in range(T_main, T):"):
        _emit_step(em, ctx, emitter)


def _emit_step(em: Emitter, ctx: LayerContext, emitter) -> None:
    """Step ``s`` of a layer's loop: its input time, its stage of the projection if it starts one, the step."""
    emit_step_times(em, ctx)
    if ctx.staged_projection:
        emit_stage(em, ctx)
    emitter.emit_step(em, ctx)


def _emit_kernel(em: Emitter, spec: StackSpec, layers: list[Layer], workspace: Workspace) -> None:
    with njit_function(em, spec.dtype, f"{spec.kernel_name()}({', '.join(kernel_arguments(spec))})"):
        em("T = x.shape[0]", "B = x.shape[1]", "T_out = y.shape[0]", "inp = x")
        workspace.emit_start(em)
        body = Emitter()  # written first: the check below needs every buffer's size
        for bi, block in enumerate(spec.blocks):
            last_block = bi == len(spec.blocks) - 1
            body(f"# block {bi}")
            if _needs_merge(block):
                width = sum(d.output_size for d in block.directions)
                workspace.emit_buffer(body, "dest", "T_out" if last_block else "T", width)
            elif last_block:
                body("dest = y")
            else:
                workspace.emit_buffer(body, "dest", "T", block.output_size)
            for di, direction in enumerate(block.directions):
                body(f"# block {bi}, direction {di} ({direction.reverse})", "src = inp")
                emit_chain_calls(body, spec, chain_of(layers, bi, di), partial(emit_layer_call, buffers=workspace))
            if _needs_merge(block):
                _emit_merge(body, block, "y" if last_block else "merged", workspace)
                if not last_block:
                    body("inp = merged")
            elif not last_block:
                body("inp = dest")
        workspace.emit_check(em)
        emit_panel_checks(em, spec)
        em.extend(body)


def emit_panel_checks(em: Emitter, spec: StackSpec) -> None:
    """Raise unless every panel argument is as wide as this process packs them.

    The packed product's C entry cannot check what it reads, and panels that
    another process packed (pickled, saved) may be for other vectors
    (``codegen.cells.common.vector_bytes``): narrower ones would leave outputs
    unwritten, wider ones would be written past their rows.
    """
    width = panel_width(spec.dtype)
    for argument in kernel_arguments(spec):
        if argument.endswith(panels_name("")):
            with em.block(f"if {argument}.shape[2] != {width}:"):
                em(f'raise ValueError("{wrong_panels_message(argument, width)}")')
        if argument.endswith(tiles_name("wx")) and spec.dtype == "float32":
            # A pack of another kernel's tiles would have its loads read past them.
            kernel = argument[:-len(tiles_name("wx"))] + "wx"
            size = f"{TILE_VALUES} * (({kernel}.shape[0] + 31) // 32) * (({kernel}.shape[1] + 31) // 32)"
            with em.block(f"if {argument}.size != 0 and {argument}.size != {size}:"):
                em(f'raise ValueError("{argument}: not the tiles of {kernel} '
                   '(pack the weights again with numrnn.runtime.pack_weights)")')


def wrong_panels_message(argument: str, width: int) -> str:
    """What a kernel says of an ``argument`` whose panels are not ``width`` columns wide (split calls say it too)."""
    return (f"{argument}: panels of {width} columns expected, as this process packs them "
            "(weights packed by another process or machine: pack them again in this one)")


def chain_of(layers: list[Layer], block: int, direction: int) -> list[Layer]:
    """The layers of one direction of one block, input side first."""
    return [layer for layer in layers if layer.block == block and layer.direction == direction]


def emit_chain_calls(em: Emitter, spec: StackSpec, chain: list[Layer], emit_call) -> None:
    """``emit_call(em, spec, layer, is_last=...)`` for each layer of a chain; the last one writes the block output."""
    for k, layer in enumerate(chain):
        emit_call(em, spec, layer, is_last=k == len(chain) - 1)


def emit_layer_call(em: Emitter, spec: StackSpec, layer: Layer, *, is_last: bool,
                    buffers: Workspace | NewArrays) -> None:
    """The layer's input projection and its call, their buffers from ``buffers``."""
    cell = layer.cell
    gu = cell.gates * cell.units
    weights = dict(zip(packed_names(cell), layer.weight_args()))
    fused = fuses_projection(layer.context, cell.units)
    staged = stages_projection(spec, layer.context)
    flags = [emit_fuse_flag(em, layer, spec.dtype) if fused else None,
             emit_stage_flag(em, spec, layer, fused) if staged else None]
    deferred = " or ".join(flag for flag in flags if flag) or None
    emit_input_projection(em, spec, layer, weights, buffers, deferred)
    out = "dest" if is_last else "seq"
    if not is_last:
        buffers.emit_buffer(em, "seq", "T", cell.output_size)
    recurrent = [weights[name] for name in recurrent_names(cell)]
    bias = [weights["b"]] if cell.use_bias else []
    args = [f"{VIEW}(xw, 0, (T, B, {gu}))", *bias, *recurrent, *layer.state_args(), *condition_args(spec), out, "small",
            *projection_arguments(weights, fused, staged)]
    em(f"{layer.function}({', '.join(args)})")
    if not is_last:
        em("src = seq")


#: Up to this many input features the input projection is a loop, not a BLAS GEMM: OpenBLAS packs
#: its operands for a K of 2 as for any other (seed000's first layer, 12544x2 by 2x360: 3.2 ms).
LOOP_PROJECTION_MAX_INPUTS = 4
#: Rows (T * B) up to which the input projection is the packed product on any machine
#: (:func:`packed_projection_rows`).
PACKED_PROJECTION_MAX_ROWS = 128
#: Where the packed product has 8-row blocks (AVX-512): bytes of input rows, and of the input kernel, up to which the
#: projection is the packed product at any row count (:func:`packed_projection_rows`).
PACKED_PROJECTION_MAX_INPUT_BYTES = 1 << 20
PACKED_PROJECTION_MAX_WEIGHT_BYTES = 1 << 20


def packed_projection_rows(cell: CellSpec, inputs: int, dtype: str) -> int:
    """Rows (T * B) up to which the input projection of ``cell`` on ``inputs`` features is the packed product.

    :data:`PACKED_PROJECTION_MAX_ROWS` where the packed product has 4-row
    blocks (AVX2: BLAS was ahead from about 400 rows; :func:`emit_input_projection`).
    With 8-row blocks it stayed ahead of OpenBLAS (which packs the input
    kernel again on every call) while the input rows and the kernel fit L2:
    one thread, Emerald Rapids (2 MiB L2), rows x inputs x outputs, packed /
    OpenBLAS us: 624x64x512 197 / 255, 800x64x512 250 / 336, 3200x64x512
    1213 / 1505, 624x256x512 785 / 913, 1200x256x512 1584 / 1971,
    1600x256x512 2516 / 2742, 1792x28x512 410 / 542, 1792x128x768 1899 /
    2140, 1600x120x360 743 / 823; BLAS ahead at 3200x256x512 5020 / 4270,
    3584x128x768 4441 / 4184, 12544x120x360 7260 / 6159 and 6400x512x2048
    86.3 / 74.0 ms. Hence up to :data:`PACKED_PROJECTION_MAX_INPUT_BYTES` of
    input rows with a kernel of up to :data:`PACKED_PROJECTION_MAX_WEIGHT_BYTES`,
    in float32 only: the float64 packed product multiplies, then adds (exact,
    no fused multiply-add), at 54-82 % of OpenBLAS's rate (one thread, ms,
    packed / OpenBLAS: 512x64x256 0.34 / 0.28, 2048x64x256 1.50 / 1.23,
    128x256x1024 1.44 / 0.86, in 256-row calls 3200x512x2048 173 / 93.7).
    """
    if (dtype != "float32" or panel_rows() < WIDE_PANEL_ROWS
            or input_kernel_bytes(cell, inputs, dtype) > PACKED_PROJECTION_MAX_WEIGHT_BYTES):
        return PACKED_PROJECTION_MAX_ROWS
    return max(PACKED_PROJECTION_MAX_ROWS, PACKED_PROJECTION_MAX_INPUT_BYTES // (inputs * ITEMSIZE[dtype]))


def input_kernel_bytes(cell: CellSpec, inputs: int, dtype: str) -> int:
    """Bytes of ``cell``'s input kernel on ``inputs`` features."""
    return inputs * cell.gates * cell.units * ITEMSIZE[dtype]


def projections_packed_up_to(spec: StackSpec) -> int:
    """Rows (T * B) up to which every input projection of ``spec`` is the packed product (when ``small > 0``).

    A masked spec's longer calls project their live rows (:func:`emit_live_projection`), whose count the kernel
    knows only inside: :data:`PACKED_PROJECTION_MAX_ROWS`.
    """
    if live_condition(spec) is not None:
        return PACKED_PROJECTION_MAX_ROWS
    return min((packed_projection_rows(layer.cell, layer.input_size, spec.dtype) for layer in layers_of(spec)
                if layer.input_size > LOOP_PROJECTION_MAX_INPUTS), default=PACKED_PROJECTION_MAX_ROWS)


def emit_input_projection(em: Emitter, spec: StackSpec, layer: Layer, weights: dict[str, str],
                          buffers: Workspace | NewArrays, deferred: str | None = None) -> None:
    """``xw = src.reshape(T * B, inputs) @ wx``: one product over every step, or a loop for a few inputs.

    ``weights``: the layer's packed names -> argument names; ``buffers``:
    where ``xw`` and a masked spec's gathered rows live. Up to
    :func:`packed_projection_rows` rows the packed product over ``wx``'s
    panels (when the call takes the packed product at all, ``small > 0``),
    beyond them one BLAS GEMM, which repacks ``wx`` on every call: on Zen 3
    (AVX2), one thread, rows x inputs x outputs, packed / OpenBLAS,
    50x256x512 154 / 226 us, 100x256x512 309 / 361 us, 50x32x256 16 / 19
    us, even at about 200 rows, BLAS ahead from 400. A masked spec projects
    the rows steps read only (:func:`emit_live_projection`), beyond
    :data:`PACKED_PROJECTION_MAX_ROWS` rows: a short call's are not worth
    gathering.
    The GEMM writes into ``xw`` (called through the shared module's C entry
    ``_dot``, as the layers' recurrent products are: ``numrnn.runtime.extern``).
    Where the runtime condition ``deferred`` holds, nothing is projected
    here: the layer does it in its steps (its fused product, or its stages:
    :func:`stages_projection`, which takes the calls that BLAS would). Else a
    float32 layer whose input kernel has tiles projects on them
    (:func:`projects_on_tiles`), a masked one its live rows.
    """
    inputs, wx, panels = layer.input_size, weights["wx"], weights[panels_name("wx")]
    # No tiles: an empty array stands in for _project_live's, of the type of the kernels' arguments.
    tiles = weights.get(tiles_name("wx"), f"np.empty(0, np.{spec.dtype})")
    rows = packed_projection_rows(layer.cell, inputs, spec.dtype)
    em(f"xw = {buffers.projection(wx)}", f"xs = {VIEW}(src, 0, (T * B, {inputs}))")
    if inputs > LOOP_PROJECTION_MAX_INPUTS:
        masked = live_condition(spec) is not None
        whole = (f"_project_live(xs, {condition_args(spec)[0]}, B, {wx}, {panels}, {tiles}, xw, "
                 f"{buffers.gathered(inputs)}, np.int64({rows} if small > 0 else 0))" if masked
                 else f"{DOT}(xs, {wx}, xw)")
        branches = []  # (condition, statement), the first that holds runs
        if deferred is not None:
            branches.append((deferred, "pass  # projected by the layer, in its steps"))
        if spec.dtype == "float32" and has_tiles(layer.cell):  # _project_live tiles itself, short calls too
            branches.append((projects_on_tiles(tiles), whole if masked else f"{TILE_PRODUCT}(xs, {tiles}, xw)"))
        branches.append((f"T * B <= {PACKED_PROJECTION_MAX_ROWS if masked else rows} and small > 0",
                         f"{PANEL_PRODUCT}(xs, {panels}, xw, np.int64(0), T * B, np.int64(0))"))
        for k, (condition, statement) in enumerate(branches):
            with em.block(f"{'el' if k else ''}if {condition}:"):
                em(statement)
        with em.block("else:"):
            em(whole)
        return
    with em.block("for r in range(T * B):"):
        em(*(f"x{k} = xs[r, {k}]" for k in range(inputs)), "xr = xw[r]")
        with em.block(f"for g in range({wx}.shape[1]):"):
            em(f"xr[g] = {' + '.join(f'x{k} * {wx}[{k}, g]' for k in range(inputs))}")


#: When a layer function that fuses its projection takes the fused product: one row, any number of steps. Up to
#: 128 steps at first (the packed projection's rows; BLAS projected longer inputs up front): fusing them too,
#: one row, alternating processes, before / after: LSTM(256) on 256 inputs (unit split) T=129 1270 / 940 us,
#: T=256 2451 / 1752, T=300 2701-2966 / 2005-2110; at T=300 LSTM(128) on 128 inputs 673-824 / 581-685,
#: GRU(256) on 64 1489-2800 / 1309-1623, 2xBiLSTM(128) on 64 1062-1200 / 935-1140.
FUSE_CONDITION = "B == 1 and small > 0"
#: The fewest time steps a call projects with on tiles (:func:`projects_on_tiles`): a tile's rows at one row a step.
TILE_MIN_STEPS = 16
#: The fusing layer function's extra parameters: the input rows, the input kernel's panels, the projection, the flag.
FUSED_PARAMS = ["xs", "wxp", "xwr", "fuse"]


def fuses_projection(ctx: LayerContext, units: int) -> bool:
    """Whether a layer function of ``ctx`` over ``units`` units projects its input in its steps' products.

    At one row (``codegen.cells.common.emit_fused_product``), where the
    step's recurrent matrix (its ``units`` columns of every gate) is read
    from L2 or near it (``FUSED_MIN_BYTES`` to ``FUSED_MAX_BYTES``) and
    every step runs the product: no masking, and rows in step order or
    reversed (not each row's own valid prefix); on a machine where fusing
    pays (``codegen.cells.common.fusion_pays``). Layers that share the
    function share the answer; a layer whose input side is a loop (a few
    inputs) calls it with ``fuse`` false.
    """
    return (fusion_pays() and ctx.masked_condition() is None and ctx.reverse in ("none", "full")
            and FUSED_MIN_BYTES <= recurrent_bytes(ctx.cell, ctx.dtype, units) <= FUSED_MAX_BYTES)


def emit_fuse_flag(em: Emitter, layer: Layer, dtype: str) -> str | None:
    """Set ``fuse`` before a fusing layer's call; the condition that defers its projection (``None`` if never).

    Never where the call projects on tiles (:func:`projects_on_tiles`): every
    schedule of it must sum alike, and a worker of one row would fuse.
    """
    if layer.input_size <= LOOP_PROJECTION_MAX_INPUTS:
        return _emit_flag(em, "fuse", None)
    condition = FUSE_CONDITION
    if dtype == "float32" and has_tiles(layer.cell):
        tiles = dict(zip(packed_names(layer.cell), layer.weight_args()))[tiles_name("wx")]
        condition += f" and not ({projects_on_tiles(tiles)})"
    return _emit_flag(em, "fuse", condition)


def projects_on_tiles(tiles: str) -> str:
    """The runtime condition under which a float32 layer projects with its input kernel's tiles ``tiles``.

    Where the tiles are not empty (``numrnn.runtime.amx.tiles_for``) and the
    call has :data:`TILE_MIN_STEPS` steps or more: its time steps, not its
    rows, which differ between the batch split's workers, so that every
    schedule of a call projects alike, to the bit. A tile product computes
    32 rows at least, and packs each call's rows: a short call of one row
    (a streaming step) keeps the packed product.
    """
    return f"{tiles}.size > 0 and T >= {TILE_MIN_STEPS}"


def _emit_flag(em: Emitter, flag: str, condition: str | None) -> str | None:
    """Set a layer call's runtime ``flag`` to ``condition``, or to false where it is ``None``; ``flag`` if it may hold.

    A layer function that takes the flag is compiled once for both values.
    """
    if condition is None:
        em(f"{flag} = np.bool_(False)")  # a bare False types as a literal: a second compile of the layer function
        return None
    em(f"{flag} = {condition}")
    return flag


def fused_arguments(weights: dict[str, str]) -> list[str]:
    """What a fusing layer's call passes for :data:`FUSED_PARAMS` (``weights``: its packed names -> arguments)."""
    return projection_arguments(weights, fused=True, staged=False)


def emit_first_projection_block(em: Emitter, ctx: LayerContext) -> None:
    """In a fusing layer function, before its loop: project the first block's rows (the steps project the rest)."""
    with em.block("if fuse:"):
        em(f"first = min({FUSED_ROWS}, T)")
        rows = "T - first, T" if ctx.reverse == "full" else "np.int64(0), first"
        em(f"{PANEL_PRODUCT}(xs, wxp, xwr, {rows}, np.int64(0))")


#: Rows (steps times batch rows) a staged projection projects at a time (:func:`stages_projection`), at least a
#: step's. Stages of 128, 256 and 512 rows all beat the GEMM before the loop on throughput512 (one worker: 32
#: rows, stages of 4, 8 and 16 steps); between them the host's noise decided (alternating processes, ms:
#: 172 / 170 / 165, 168 / 167 / 157, 145 / 151 / 146, against the GEMM's 192, 182, 162).
STAGE_ROWS = 256
#: The largest input kernel whose projection stages: each stage reads it again (from L3, or memory past it),
#: where one GEMM packs it once a call. Alternating processes, B64 T50 (32 rows a worker), GEMM / stages:
#: LSTM(512) on 512 inputs (throughput512's 4 MiB) gains (above); LSTM(1024) on 512 inputs, 8 MiB, 147.6-148.8 /
#: 148.5-151.0 ms; on 1024 inputs, 16 MiB, 176.6-183.6 / 189.5-205.2 ms.
STAGE_MAX_WEIGHT_BYTES = 4 << 20
#: The staging layer function's extra parameters: the input rows, the input kernel's panels and tiles, the flag.
STAGED_PARAMS = ["xs", "wxp", "wxt", "stage"]
#: What a staging layer function sets before its steps (:func:`emit_stage_setup`), passed on to a static
#: unroll's step function.
STAGE_NAMES = ["C", "xws"]
#: What a layer call passes for each parameter of :data:`FUSED_PARAMS` and :data:`STAGED_PARAMS`, in their order
#: (``wxp``, ``wxt``: the input kernel's panels and tiles, filled in by :func:`projection_arguments`).
PROJECTION_ARGUMENTS = {"xs": "xs", "wxp": None, "wxt": None, "xwr": "xw", "fuse": "fuse", "stage": "stage"}


def stages_projection(spec: StackSpec, ctx: LayerContext) -> bool:
    """Whether a layer function of ``ctx`` may project its input a stage of steps at a time.

    A call whose projection is too long for one packed product, of an input
    kernel of up to :data:`STAGE_MAX_WEIGHT_BYTES` (:func:`stages_past`),
    projects :data:`STAGE_ROWS` rows' worth of steps at a time with it, as
    its steps reach them, into the first rows of ``xw`` (:func:`emit_stage`),
    rather than all of them by one BLAS GEMM before the loop. The packed
    product over a few hundred rows keeps them in L2 (over all of them at
    once, each panel streamed the whole input from memory), and matched or
    beat OpenBLAS, which packs the kernel again on every call: one thread,
    Emerald Rapids, rows x inputs x outputs, 256-row calls / one OpenBLAS
    call, ms: 3200x512x2048 37.1-39.9 / 38.1-39.1, 12544x120x360 5.88 /
    7.04, 6400x128x512 4.09 / 5.03. A stage's products are then read from L2
    rather than memory, and the projection is never written out whole. Whole
    calls, alternating processes, GEMM / stages: throughput512 157-166 /
    151-161 ms (three pairs), lstm128_b256 10.7-11.3 / 9.9-10.2 ms, GRU(120)
    on 120 inputs B128 T196 20.2-24.7 / 18.6-22.6 ms; seed000 (its first
    layer a loop over two inputs, its others staged) within the host's noise
    (39.1-43.2 / 39.8-43.6 ms, ten pairs). Where the packed product has
    8-row blocks (AVX-512); float32 (float64's packed product runs at 54-82 %
    of BLAS's rate: :func:`packed_projection_rows`); unmasked layers in
    step order or reversed, in any loop mode (a static unroll's GRU(120) on
    120 inputs, B128 T196, batch split, ran 10 % slower than the loop, 24.7
    against 22.3 ms, while only the loop staged). A layer that may also fuse
    its projection (:func:`fuses_projection`) does that where it can (one
    row) and stages other long calls.
    """
    return (spec.dtype == "float32" and panel_rows() == WIDE_PANEL_ROWS
            and ctx.masked_condition() is None and ctx.reverse in ("none", "full"))


def stages_past(layer: Layer, dtype: str) -> int | None:
    """Rows (T * B) past which a call of a staging layer function stages ``layer``'s projection (``None``: never).

    Past :func:`packed_projection_rows`, for an input kernel of up to
    :data:`STAGE_MAX_WEIGHT_BYTES` (a loop over a few inputs never stages).
    """
    if (layer.input_size <= LOOP_PROJECTION_MAX_INPUTS
            or input_kernel_bytes(layer.cell, layer.input_size, dtype) > STAGE_MAX_WEIGHT_BYTES):
        return None
    return packed_projection_rows(layer.cell, layer.input_size, dtype)


def emit_stage_flag(em: Emitter, spec: StackSpec, layer: Layer, fused: bool) -> str | None:
    """Set ``stage`` before a staging layer's call (after ``fuse``, if ``fused``); the condition that defers its
    projection (``None`` if never)."""
    rows = stages_past(layer, spec.dtype)
    condition = None if rows is None else f"T * B > {rows} and small > 0{' and not fuse' if fused else ''}"
    return _emit_flag(em, "stage", condition)


def projection_params(fused: bool, staged: bool, tiled: bool = False) -> list[str]:
    """A layer function's parameters for projecting in its steps: :data:`FUSED_PARAMS`, :data:`STAGED_PARAMS`, both
    (``wxt``, the tiles, where its cell has them: ``tiled``)."""
    wanted = {*(FUSED_PARAMS if fused else []), *(STAGED_PARAMS if staged else [])} - (set() if tiled else {"wxt"})
    return [name for name in PROJECTION_ARGUMENTS if name in wanted]


def projection_arguments(weights: dict[str, str], fused: bool, staged: bool) -> list[str]:
    """What a layer call passes for :func:`projection_params` (``weights``: its packed names -> arguments)."""
    values = {**PROJECTION_ARGUMENTS, "wxp": weights[panels_name("wx")], "wxt": weights.get(tiles_name("wx"))}
    return [values[name] for name in projection_params(fused, staged, tiles_name("wx") in weights)]


def emit_stage_setup(em: Emitter) -> None:
    """In a staging layer function, before its steps: ``C``, the steps of a stage, and ``xws``, their rows of ``xw``.

    Without ``stage`` a stage is the whole call (projected before the call).
    """
    em(f"C = min(T, max(1, {STAGE_ROWS} // B)) if stage else T", f"xws = {VIEW}(xw, 0, (C * B, xw.shape[2]))")


def emit_stage(em: Emitter, ctx: LayerContext) -> None:
    """At step time ``t``: ``tx``, its row of the stage, and where a stage starts, its projection.

    Stages are aligned to multiples of ``C`` in time, so that in either
    direction a stage's times ``lo..lo + C - 1`` sit at rows ``t % C``.
    """
    em("tx = t % C")
    starts = "(s == 0 or tx == C - 1)" if ctx.reverse == "full" else "tx == 0"
    with em.block(f"if stage and {starts}:"):
        em("lo = t - tx", "n = (min(T, lo + C) - lo) * B",
           f"stage_rows = {VIEW}(xs, lo * B * xs.shape[1], (n, xs.shape[1]))")
        packed = f"{PANEL_PRODUCT}(stage_rows, wxp, xws, np.int64(0), n, np.int64(0))"
        if ctx.dtype != "float32" or not has_tiles(ctx.cell):
            em(packed)
            return
        with em.block(f"if {projects_on_tiles('wxt')}:"):
            em(f"{TILE_PRODUCT}(stage_rows, wxt, {VIEW}(xws, 0, (n, xws.shape[1])))")
        with em.block("else:"):
            em(packed)


def merge_expression(merge: str, forward: str, backward: str) -> str:
    """The ``sum``/``mul``/``ave`` merge of two direction outputs (expressions of the same shape)."""
    return {"sum": f"{forward} + {backward}", "mul": f"{forward} * {backward}",
            "ave": f"({forward} + {backward}) * 0.5"}[merge]


def _emit_merge(em: Emitter, block, target: str, workspace: Workspace) -> None:
    w = block.directions[0].output_size
    fw, bw = f"dest[:, :, :{w}]", f"dest[:, :, {w}:]"
    expr = merge_expression(block.merge, fw, bw)
    if target != "y":
        workspace.emit_buffer(em, target, "T", w)
    em(f"{target}[:, :, :] = {expr}")
