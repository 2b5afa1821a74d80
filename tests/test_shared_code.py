"""Code that kernels share instead of compiling it again: one function per kind of layer, one module of products.

Both exist for compile time (see ``codegen.targets.cpu.layers_of`` and
``generate_shared``); these tests pin what is shared and what must not be.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from numba import njit
from reference import run_stack

import codegen.targets.cpu
from codegen import generate_source
from codegen.cells import ALIGNMENT, packed_names, split_packed, to_panels
from codegen.cells.common import panel_width, vector_bytes
from codegen.spec import BlockSpec, CellSpec, DirectionSpec, StackSpec, simple_stack
from codegen.targets.cpu import generate_shared, layers_of, shared_module_name
from numrnn.runtime import extern, get_kernel, pack_weights
from numrnn.runtime.extern import linked


def _defined_layer_functions(source: str) -> list[str]:
    return [line.split("(")[0][4:] for line in source.splitlines() if line.startswith("def _layer")]


def test_equal_layers_share_one_function():
    spec = simple_stack([CellSpec("gru", 6)] * 3, 4, dtype="float32")
    source = generate_source(spec)
    assert _defined_layer_functions(source) == ["_layer0_gru6"]
    assert source.count("_layer0_gru6(_view(xw, 0, (T, B, 18))") == 3


def test_layers_that_differ_keep_their_own_functions():
    # The reverse direction (which also writes at column 5) and the last-output-only GRU need their own
    # bodies; the forward LSTM of block 0 and both LSTMs of block 1 are one function.
    spec = StackSpec(
        (BlockSpec((DirectionSpec((CellSpec("lstm", 5),)), DirectionSpec((CellSpec("lstm", 5),), reverse="full"))),
         BlockSpec((DirectionSpec((CellSpec("lstm", 5), CellSpec("lstm", 5), CellSpec("gru", 5))),))),
        3, dtype="float64", return_sequences=False)
    assert [layer.owner for layer in layers_of(spec)] == [0, 1, 0, 0, 4]
    assert _defined_layer_functions(generate_source(spec)) == ["_layer0_lstm5", "_layer1_lstm5", "_layer4_gru5"]


def test_kernels_import_the_shared_module_by_the_hash_of_its_source():
    name = shared_module_name()
    assert name.startswith("numrnn_shared_") and len(name) == len("numrnn_shared_") + 16
    for dtype, suffix in (("float32", "_fast"), ("float64", "_exact")):
        source = generate_source(simple_stack([CellSpec("lstm", 3)], 2, dtype=dtype))
        tiles = ", tile_product_call as _tile_product" if dtype == "float32" else ""  # float32 kernels only
        assert (f"from {name} import panel_product{suffix}_call as _panel_product, "
                f"fused_product{suffix}_call as _fused_product, dot{suffix}_call as _dot{tiles}, "
                f"link{suffix}") in source
        assert f"\nlink{suffix}()\n" in source
        assert "def _panel_product" not in source and "np.dot(" not in source
    shared = generate_shared()
    for suffix in ("_fast", "_exact"):
        entry = (f"def panel_product{suffix}_c(h_data, h0, h1, wp_data, wp0, wp1, wp2, out_data, out0, out1, "
                 "b0, b1, backward):")
        assert entry in shared
        assert f"def dot{suffix}_c(a_data, a0, a1, b_data, b0, b1, out_data, out0, out1):" in shared
    # No np.dot: numba would compile its checks and its own BLAS call into the entry.
    assert "np.dot" not in shared and "gemm(a, b, out)" in shared
    # The micro-kernels are calls of one intrinsic inside the entries, not functions numba compiles on their own.
    assert "@njit" not in shared and "def rows" not in shared


def test_the_shared_module_is_renamed_when_its_vectors_change(monkeypatch):
    # numrnn.runtime.simd builds the blocks from these, which the generated calls do not show:
    # the source must, or a cached entry of the old width would run on panels of the new one.
    before = generate_shared()
    other_width = {32: 64, 64: 32}[vector_bytes()]
    for constant, value in (("vector_bytes", lambda: other_width), ("PANEL_VECTORS", 3)):
        with monkeypatch.context() as patched:
            patched.setattr(codegen.targets.cpu, constant, value)
            generate_shared.cache_clear()
            try:
                assert generate_shared() != before
            finally:
                generate_shared.cache_clear()
    assert generate_shared() == before


def test_two_specs_run_on_one_shared_module():
    # small=2 makes both rows take the packed product (the shared module), whatever BLAS this machine has.
    rng = np.random.default_rng(7)
    for cell in (CellSpec("lstm", 4), CellSpec("gru", 4)):
        spec = simple_stack([cell, CellSpec("lstm", 4)], 3, dtype="float64")
        weights = [{k: rng.uniform(-0.5, 0.5, s) for k, s in c.weight_shapes(n).items()}
                   for c, n in zip(spec.cells, spec.input_sizes())]
        x = rng.standard_normal((5, 2, 3))
        states = [np.zeros((2, n)) for c in spec.cells for n in c.state_sizes]
        y = np.empty((5, 2, 4))
        kernel = get_kernel(spec)
        ws = np.empty(kernel.workspace_size(5, 5, 2))
        kernel.function(x, *states, *pack_weights(spec, weights), y, ws, 2)
        expected, _ = run_stack(spec, weights, x)
        np.testing.assert_allclose(y, expected, rtol=1e-10, atol=1e-12)
    assert shared_module_name() in sys.modules


def _shared_module():
    get_kernel(simple_stack([CellSpec("lstm", 3)], 2, dtype="float64"))  # imports the shared module
    return sys.modules[shared_module_name()]


def _input_order_product(h: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Sums in input order: float64 a rounded product then a sum; float32 one fused multiply-add per term."""
    out = np.zeros((h.shape[0], w.shape[1]), dtype=h.dtype)
    for k in range(h.shape[1]):
        if h.dtype == np.float32:  # float32 products are exact in float64: one rounding to float32 after the sum
            out = (h[:, k:k + 1].astype(np.float64) * w[k] + out).astype(np.float32)
        else:
            out = out + h[:, k:k + 1] * w[k]
    return out


def _c_entry(shared, name: str, suffix: str):
    """The shared module's C entry ``name`` (``PANEL_PRODUCT``, ``DOT``) in ``suffix``'s flavor, called on arrays and
    integers through ctypes (each array as its data pointer and shape)."""
    getattr(shared, f"link{suffix}")()
    entry = linked(getattr(shared, f"{name}{suffix.upper()}")[0]).ctypes
    pointer = entry.argtypes[0]

    def call(*arguments):
        flat = []
        for value in arguments:
            flat += [value.ctypes.data_as(pointer), *value.shape] if isinstance(value, np.ndarray) else [value]
        entry(*flat)
    return call


@njit
def _numba_dot(a, b, out):
    np.dot(a, b, out)


def test_gemm_entry_is_numbas_np_dot_bit_for_bit():
    # Each of np.dot's BLAS calls: a dot product (one row, one column), a matrix-vector product (one row or one
    # column), a GEMM; zeros where the inner size is 0, nothing to write without rows or columns.
    shared = _shared_module()
    rng = np.random.default_rng(13)
    for dtype, suffix in (("float64", "_exact"), ("float32", "_fast")):
        dot = _c_entry(shared, "DOT", suffix)
        for m, k, n in ((1, 1, 1), (1, 37, 1), (1, 9, 300), (5, 7, 1), (3, 5, 7), (50, 32, 256), (129, 64, 33),
                        (4, 0, 5), (0, 3, 4), (3, 4, 0)):
            a = rng.standard_normal((m, k)).astype(dtype)
            b = rng.standard_normal((k, n)).astype(dtype)
            out, expected = np.full((m, n), np.nan, dtype=dtype), np.full((m, n), np.nan, dtype=dtype)
            dot(a, b, out)
            _numba_dot(a, b, expected)
            np.testing.assert_array_equal(out, expected)
            np.testing.assert_allclose(out, a.astype(np.float64) @ b, rtol=1e-5, atol=1e-5)


def test_blas_symbols_are_all_linked_or_none(monkeypatch):
    # A scipy without one of the functions: an error, and no symbol named (an entry calling one that was left
    # out would jump to nowhere); the next call tries again.
    extern.link_blas()
    capsules = extern._BLAS.__pyx_capi__

    class Partial:
        __pyx_capi__ = {name: capsule for name, capsule in capsules.items() if name != "sgemv"}

    monkeypatch.setattr(extern, "_BLAS", None)
    monkeypatch.setattr(extern.importlib, "import_module", lambda name: Partial)
    added = []
    monkeypatch.setattr(extern.llvm, "add_symbol", lambda symbol, address: added.append(symbol))
    with pytest.raises(KeyError, match="sgemv"):
        extern.link_blas()
    assert added == [] and extern._BLAS is None


def test_panel_product_covers_its_rows_and_every_column():
    # Every row-block size (none, 1-4, 5-7, 8 and beyond: AVX-512's 8-row blocks leave 4-7 rows to one block; 1-3
    # leftover rows take 2 or 4 panels a pass when there are that many full ones), a last panel partial or full,
    # panels walked forward and backward (any nonzero ``backward``), bit for bit against the sums in input order
    # (float32: fused multiply-adds), rows outside b0..b1 untouched.
    shared = _shared_module()
    rng = np.random.default_rng(3)
    for dtype, product in (("float64", _c_entry(shared, "PANEL_PRODUCT", "_exact")),
                           ("float32", _c_entry(shared, "PANEL_PRODUCT", "_fast"))):
        width = panel_width(dtype)
        for inputs, outputs in ((1, 1), (5, 7), (9, width), (3, 2 * width + 3), (17, 3 * width - 1),
                                (7, 4 * width + 5), (4, 2 * width), (6, 4 * width), (5, 8 * width + 1)):
            h = rng.standard_normal((16, inputs)).astype(dtype)
            w = rng.standard_normal((inputs, outputs)).astype(dtype)
            panels = to_panels(w)
            assert panels.shape == (-(-outputs // width), inputs, width)
            expected = _input_order_product(h, w)
            for b0, b1 in ((0, 11), (0, 1), (2, 4), (3, 6), (1, 8), (5, 10), (0, 4), (2, 10), (3, 3), (11, 11),
                           (0, 16), (1, 15), (0, 13), (3, 16)):
                for backward in (0, 1, 2):
                    out = np.full((16, outputs), np.nan, dtype=dtype)
                    product(h, panels, out, b0, b1, backward)
                    assert np.isnan(out[:b0]).all() and np.isnan(out[b1:]).all()
                    np.testing.assert_array_equal(out[b0:b1], expected[b0:b1])


def test_packed_weights_start_on_a_cache_line_and_keep_their_values():
    rng = np.random.default_rng(11)
    spec = simple_stack([CellSpec("lstm", 6), CellSpec("gru", 5)], 3, dtype="float32")
    weights = [{k: rng.uniform(-0.5, 0.5, s) for k, s in c.weight_shapes(n).items()}
               for c, n in zip(spec.cells, spec.input_sizes())]
    packed = pack_weights(spec, weights)
    # (an empty array, the tiles of a kernel that has none, holds no data to align)
    assert all((a.size == 0 or a.ctypes.data % ALIGNMENT == 0) and a.flags.c_contiguous for a in packed)
    lstm = spec.cells[0]
    names = packed_names(lstm)
    wx, wx_panels = packed[names.index("wx")], packed[names.index("wx_panels")]
    np.testing.assert_array_equal(wx, weights[0]["kernel"].astype(np.float32))
    np.testing.assert_array_equal(wx_panels, to_panels(wx))
    for part in range(2):
        sliced = split_packed(lstm, packed[:len(names)], part, 2)
        assert all((a.size == 0 or a.ctypes.data % ALIGNMENT == 0) and a.flags.c_contiguous for a in sliced)


@pytest.mark.parametrize("environment, width", [
    ({"NUMBA_CPU_FEATURES": "+avx2,+fma,+avx512f"}, 64),
    ({"NUMBA_CPU_FEATURES": "+avx2,+fma,-avx512f"}, 32),
    ({"NUMBA_CPU_FEATURES": "+avx2,+avx512f", "NUMBA_ENABLE_AVX": "0"}, 64),  # numba takes given features as given
    ({"NUMBA_CPU_NAME": "generic"}, 32),  # numba compiles for no features then
    ({"NUMBA_ENABLE_AVX": "0"}, 32),  # the host's features without AVX
    ({"NUMBA_CPU_NAME": "nocona"}, 32),  # numba turns AVX off for it (virtual machines report it wrongly)
    ({"NUMBA_CPU_FEATURES": "+avx512f", "NUMRNN_VECTOR_BYTES": "32"}, 32),
    ({"NUMBA_CPU_FEATURES": "", "NUMRNN_VECTOR_BYTES": "64"}, 64),
])
def test_the_vector_width_follows_numbas_environment_before_numba_is_imported(environment, width, monkeypatch):
    monkeypatch.delitem(sys.modules, "numba.core.config")  # as before numba's import: its environment is read
    for name in ("NUMBA_CPU_FEATURES", "NUMBA_CPU_NAME", "NUMBA_ENABLE_AVX", "NUMRNN_VECTOR_BYTES"):
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert vector_bytes.__wrapped__() == width


def test_the_vector_width_follows_numbas_settings_once_it_is_imported(monkeypatch):
    # Read from numba.core.config, which its config file or the caller may have set; not from the environment.
    from numba.core import config

    monkeypatch.delenv("NUMRNN_VECTOR_BYTES", raising=False)
    monkeypatch.setenv("NUMBA_CPU_FEATURES", "+avx512f")
    for name, features, enable_avx, width in (("generic", "", True, 32), (None, "+avx2,+avx512f", True, 64),
                                              (None, "+avx2,-avx512f", True, 32), (None, None, False, 32)):
        monkeypatch.setattr(config, "CPU_NAME", name)
        monkeypatch.setattr(config, "CPU_FEATURES", features)
        monkeypatch.setattr(config, "ENABLE_AVX", enable_avx)
        assert vector_bytes.__wrapped__() == width


def test_a_vector_width_other_than_32_or_64_is_refused(monkeypatch):
    monkeypatch.setenv("NUMRNN_VECTOR_BYTES", "48")
    with pytest.raises(ValueError, match="NUMRNN_VECTOR_BYTES must be one of 32, 64; got '48'"):
        vector_bytes.__wrapped__()


#: Runs the packed product on every row count (1 to 7: every block shape below 8 and each leftover pass, one
#: row's four panels a pass) and partial panels, both dtypes, at this process's vector width (the LSTM's 16
#: units fill whole vectors: at 64 bytes its gate loop is vectorized that wide); ``outputs()`` returns the results.
_WIDTH_SCRIPT = """
import numpy as np
from codegen.spec import CellSpec, simple_stack
from numrnn.runtime import get_kernel, pack_weights


def outputs():
    rng = np.random.default_rng(3)
    results = []
    for dtype, cells in (("float32", [CellSpec("gru", 43), CellSpec("lstm", 16)]), ("float64", [CellSpec("lstm", 21)])):
        spec = simple_stack(cells, 5, dtype=dtype)
        weights = [{k: rng.uniform(-0.5, 0.5, s) for k, s in c.weight_shapes(n).items()}
                   for c, n in zip(spec.cells, spec.input_sizes())]
        kernel = get_kernel(spec)
        for rows in range(1, 8):
            x = rng.standard_normal((6, rows, 5)).astype(dtype)
            states = [np.zeros((rows, n), dtype) for c in spec.cells for n in c.state_sizes]
            y = np.empty((6, rows, spec.output_size), dtype)
            ws = np.empty(kernel.workspace_size(6, 6, rows), dtype)
            kernel.function(x, *states, *pack_weights(spec, weights), y, ws, 128)
            results.append((spec, weights, x, y))
    return results
"""


def test_the_other_vector_width_computes_the_same_sums_and_packs_again(tmp_path):
    # A machine's tests run its own width; the other one runs in a fresh process. Each output adds its terms in
    # input order, one multiply-add each, at either width: the results are equal bit for bit. A layer pickled
    # here packs its weights again there; weights packed here are refused there, by name.
    import pickle

    import numrnn

    namespace = {}
    exec(_WIDTH_SCRIPT, namespace)
    here = namespace["outputs"]()
    for spec, weights, x, y in here:
        expected, _ = run_stack(spec, weights, x)
        tolerance = 2e-5 if spec.dtype == "float32" else 1e-10
        np.testing.assert_allclose(y, expected, rtol=tolerance, atol=tolerance)
    layer = numrnn.LSTM(40, return_sequences=True)
    x = np.random.default_rng(4).standard_normal((3, 6, 5)).astype(np.float32)
    lstm40 = simple_stack([CellSpec("lstm", 40)], 5)
    stale = pack_weights(lstm40, [{k: np.ones(s) for k, s in lstm40.cells[0].weight_shapes(5).items()}])
    with open(tmp_path / "here.pickle", "wb") as file:
        pickle.dump(([y for *_, y in here], layer, layer(x), x, stale), file)
    script = _WIDTH_SCRIPT + """
import pickle, sys
import numpy as np
import pytest
from codegen.cells.common import panel_width
from codegen.spec import CellSpec, simple_stack

with open(sys.argv[1], "rb") as file:
    ys, layer, layer_y, x, stale = pickle.load(file)
for y, (*_, there) in zip(ys, outputs(), strict=True):
    np.testing.assert_array_equal(there, y)
np.testing.assert_array_equal(layer(x), layer_y)
spec = simple_stack([CellSpec("lstm", 40)], 5)
kernel = get_kernel(spec)
states = [np.zeros((3, 40), np.float32) for _ in range(2)]
with pytest.raises(ValueError, match=f"w0_wx_panels: panels of {panel_width('float32')} columns expected"):
    kernel(np.ascontiguousarray(x.transpose(1, 0, 2)), None, states, stale)
print("panel width", panel_width("float32"))
"""
    other = {32: 64, 64: 32}[vector_bytes()]
    tests = str(Path(__file__).parent)
    env = {**os.environ, "NUMRNN_VECTOR_BYTES": str(other),
           "PYTHONPATH": os.pathsep.join(filter(None, [tests, str(Path(tests).parent), os.environ.get("PYTHONPATH")]))}
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "here.pickle")], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert f"panel width {2 * other // 4}" in result.stdout


def test_kernels_refuse_panels_of_another_width(monkeypatch):
    # Panels packed for other vectors (another process's): the unsplit kernel checks them in its generated code,
    # a split call in Python before it cuts them into the workers' slices.
    spec = simple_stack([CellSpec("lstm", 4)], 3, dtype="float64")
    rng = np.random.default_rng(2)
    weights = [{k: rng.uniform(-0.5, 0.5, s) for k, s in c.weight_shapes(n).items()}
               for c, n in zip(spec.cells, spec.input_sizes())]
    packed = pack_weights(spec, weights)
    names = packed_names(spec.cells[0])
    index = names.index("wh_panels")
    wide = packed[index]
    packed[index] = np.zeros(wide.shape[:2] + (2 * wide.shape[2],))
    kernel = get_kernel(spec)
    x, states = np.zeros((5, 2, 3)), [np.zeros((2, 4)), np.zeros((2, 4))]
    width = panel_width("float64")
    with pytest.raises(ValueError, match=f"w0_wh_panels: panels of {width} columns expected, as this process"):
        kernel(x, None, states, packed)
    monkeypatch.setenv("NUMRNN_SCHEDULE", "units")
    with pytest.raises(ValueError, match=rf"weights\[{index}\] \(cell 0 wh_panels\): panels of {width} columns"):
        kernel(x, None, states, packed)


def _functions_asking_full_width(source: str) -> list[str]:
    """Names of the generated functions whose body calls full_width_vectors."""
    names, current = [], None
    for line in source.splitlines():
        if line.startswith("def "):
            current = line[4:].split("(")[0]
        elif line.strip() == "_full_width_vectors()":
            names.append(current)
    return names


@pytest.mark.parametrize("width", [32, 64])
def test_full_width_vectors_where_avx512_and_the_gates_fill_them(width, monkeypatch):
    # GRU(120)'s gate loop leaves half a vector over at 64 bytes, which ran slower than 32-byte vectors; LSTM(128)'s
    # fills 8 of them. The kernel (copies and calls, no gates) asks wherever the machine has AVX-512.
    monkeypatch.setattr(codegen.targets.cpu, "vector_bytes", lambda: width)
    spec = StackSpec((BlockSpec((DirectionSpec((CellSpec("gru", 120), CellSpec("lstm", 128))),)),), 3)
    source = generate_source(spec)
    asked = _functions_asking_full_width(source)
    if width == 32:
        assert asked == [] and "full_width_vectors" not in source
        return
    assert "from numrnn.runtime.simd import full_width_vectors as _full_width_vectors" in source
    assert asked == ["_layer1_lstm128", spec.kernel_name()]
    exact = generate_source(simple_stack([CellSpec("lstm", 8), CellSpec("lstm", 12)], 3, dtype="float64"))
    assert _functions_asking_full_width(exact)[0] == "_layer0_lstm8"  # 8 float64 lanes a vector
    assert "_layer1_lstm12" not in _functions_asking_full_width(exact)


def test_a_split_layer_asks_full_width_by_its_workers_slice(monkeypatch):
    monkeypatch.setattr(codegen.targets.cpu, "vector_bytes", lambda: 64)
    for units, asks in ((64, True), (40, False)):  # 32 units a worker fill two vectors, 20 do not
        spec = dataclasses.replace(simple_stack([CellSpec("lstm", units)], 3), unit_split=2)
        layer = f"_layer0_lstm{units}"
        asked = _functions_asking_full_width(generate_source(spec))
        assert (layer in asked) == asks and spec.kernel_name() in asked


def test_full_width_vectors_sets_llvms_preferred_width_of_its_caller():
    from numrnn.runtime.simd import full_width_vectors

    @njit(fastmath=True, error_model="numpy")
    def scale(a):
        full_width_vectors()
        for i in range(a.shape[0]):
            a[i] = a[i] * np.float32(3.0) + np.float32(1.0)

    a = np.arange(64, dtype=np.float32)
    scale(a)
    assert np.array_equal(a, np.arange(64, dtype=np.float32) * 3 + 1)
    ir = next(iter(scale.inspect_llvm().values()))
    assert f'"prefer-vector-width"="{vector_bytes() * 8}"' in ir
    if vector_bytes() == 64:
        assert "zmm" in next(iter(scale.inspect_asm().values()))
