"""Code that kernels share instead of compiling it again: one function per kind of layer, one module of products.

Both exist for compile time (see ``codegen.targets.cpu.layers_of`` and
``generate_shared``); these tests pin what is shared and what must not be.
"""

from __future__ import annotations

import sys

import numpy as np
from reference import run_stack

from codegen import generate_source
from codegen.spec import BlockSpec, CellSpec, DirectionSpec, StackSpec, simple_stack
from codegen.targets.cpu import generate_shared, layers_of, shared_module_name
from numrnn.runtime import get_kernel, pack_weights


def _defined_layer_functions(source: str) -> list[str]:
    return [line.split("(")[0][4:] for line in source.splitlines() if line.startswith("def _layer")]


def test_equal_layers_share_one_function():
    spec = simple_stack([CellSpec("gru", 6)] * 3, 4, dtype="float32")
    source = generate_source(spec)
    assert _defined_layer_functions(source) == ["_layer0_gru6"]
    assert source.count("_layer0_gru6(xw.reshape(T, B, 18)") == 3


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
        assert f"from {name} import row_product{suffix} as _row_product, rows2_product{suffix} as _rows2_product" \
            in source
        assert "def _row_product" not in source
    shared = generate_shared()
    for function in ("row_product_fast", "rows2_product_fast", "row_product_exact", "rows2_product_exact"):
        assert f"def {function}(h, w, out, b):" in shared


def test_two_specs_run_on_one_shared_module():
    # small=2 makes both rows take the hand loop (the shared products), whatever BLAS this machine has.
    rng = np.random.default_rng(7)
    for cell in (CellSpec("lstm", 4), CellSpec("gru", 4)):
        spec = simple_stack([cell, CellSpec("lstm", 4)], 3, dtype="float64")
        weights = [{k: rng.uniform(-0.5, 0.5, s) for k, s in c.weight_shapes(n).items()}
                   for c, n in zip(spec.cells, spec.input_sizes())]
        x = rng.standard_normal((5, 2, 3))
        states = [np.zeros((2, n)) for c in spec.cells for n in c.state_sizes]
        y = np.empty((5, 2, 4))
        get_kernel(spec).function(x, *states, *pack_weights(spec, weights), y, 2)
        expected, _ = run_stack(spec, weights, x)
        np.testing.assert_allclose(y, expected, rtol=1e-10, atol=1e-12)
    assert shared_module_name() in sys.modules
