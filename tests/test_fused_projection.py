"""The fused product: unit-split layers at one row project their input inside the steps' products.

``codegen.cells.common.emit_fused_product``: a layer whose slice of the
recurrent matrix is read from L2 projects the next block of rows a slice per
step, in the same passes as its recurrent product. Each case runs forced
through the unit split and through one thread, at step counts around the
block size (a short block alone, one block, a block and a short one, many,
and past the packed projection's 128 rows, where it projects up front
again), and at two rows (never fused). Not at four steps or fewer: one-row
calls that short take the streaming path, one thread and BLAS. Split and serial must agree to the bit (every sum is the
packed product's, in input order), and both must match the oracle.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from reference import run_stack
from test_grid import _run_kernel, assert_matches_reference

from codegen.cells.common import FUSED_ROWS
from codegen.spec import BlockSpec, CellSpec, DirectionSpec, StackSpec, simple_stack
from codegen.targets.cpu import layers_of
from codegen.targets.cpu_split import fuses_projection
from numrnn.runtime import get_kernel

LSTM128 = CellSpec("lstm", 128)
CASES = {
    # Forward and reversed LSTM(128) (128 KiB a worker) on 40 inputs, fewer than the product's 128; then a
    # GRU(136) on 256 inputs, more than its 136, whose worker's 204 columns end in a partial panel.
    "bidir_lstm_then_gru": StackSpec(
        blocks=(BlockSpec((DirectionSpec((LSTM128,)), DirectionSpec((LSTM128,), "full")), "concat"),
                BlockSpec((DirectionSpec((CellSpec("gru", 136),)),))),
        input_size=40),
    "float64_simple": simple_stack([CellSpec("simple", 256)], 20, dtype="float64"),
}


def _split(spec: StackSpec) -> StackSpec:
    return dataclasses.replace(spec, unit_split=2)


@pytest.mark.parametrize("name", sorted(CASES))
def test_layers_whose_slice_is_read_from_l2_fuse_their_projection(name):
    split = _split(CASES[name])
    assert all(fuses_projection(split, layer) for layer in layers_of(split))


@pytest.mark.parametrize("spec, reason", [
    (simple_stack([CellSpec("lstm", 64)], 32), "a 32 KiB slice, read from L1"),
    (simple_stack([LSTM128], 40, masking="carry"), "masked steps skip the product"),
    (StackSpec(blocks=(BlockSpec((DirectionSpec((LSTM128,)), DirectionSpec((LSTM128,), "valid")), "concat"),),
               input_size=40, masking="lengths"), "each row's own reversal"),
    (simple_stack([LSTM128], 4), "a loop projection of four inputs"),
])
def test_layers_the_fused_product_cannot_serve_do_not_fuse(spec, reason):
    split = _split(spec)
    assert not any(fuses_projection(split, layer) for layer in layers_of(split)), reason


def _scaled_weights(spec: StackSpec, rng) -> list[dict]:
    # 1 / sqrt(fan-in): a hundred or more units at the grid's scale would saturate every gate.
    return [{k: (rng.standard_normal(s) / np.sqrt(s[0])).astype(spec.dtype) for k, s in cell.weight_shapes(n).items()}
            for cell, n in zip(spec.cells, spec.input_sizes())]


def _run(spec, weights, x, initial, schedule, monkeypatch):
    monkeypatch.setenv("NUMRNN_SCHEDULE", schedule)
    return _run_kernel(spec, weights, x, None, None, initial)


@pytest.mark.parametrize("steps, batch", [(5, 1), (FUSED_ROWS, 1), (FUSED_ROWS + 5, 1), (100, 1), (129, 1), (13, 2)])
@pytest.mark.parametrize("name", sorted(CASES))
def test_fused_split_equals_the_serial_kernel_bit_for_bit_and_the_oracle(name, steps, batch, monkeypatch):
    spec = CASES[name]
    rng = np.random.default_rng(steps)
    weights = _scaled_weights(spec, rng)
    x = rng.standard_normal((steps, batch, spec.input_size)).astype(spec.dtype)
    initial = [tuple(rng.standard_normal((batch, n)).astype(spec.dtype) for n in c.state_sizes) for c in spec.cells]
    split, split_states = _run(spec, weights, x, initial, "units", monkeypatch)
    assert get_kernel(_split(spec)).compile_seconds is not None  # it really ran split
    serial, serial_states = _run(spec, weights, x, initial, "serial", monkeypatch)
    np.testing.assert_array_equal(split, serial)
    for split_cell, serial_cell in zip(split_states, serial_states):
        for a, b in zip(split_cell, serial_cell):
            np.testing.assert_array_equal(a, b)
    expected, expected_states = run_stack(spec, weights, x, initial_states=initial)
    assert_matches_reference(spec, split, split_states, expected, expected_states)
