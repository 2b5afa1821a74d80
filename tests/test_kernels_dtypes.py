"""float64 kernels are exact (libm, no fastmath); float32 ones (approximate tanh/sigmoid) stay close.

Batch sizes 1, 3 and 9 go through the recurrent-product paths (the packed
product for one row and for a 4-row block with leftovers, GEMM: the kernel
takes the packed product up to 4 rows here, whatever this machine's BLAS);
each is compared with the NumPy oracle.
"""

from __future__ import annotations

import numpy as np
import pytest
from reference import run_stack

from codegen import generate_source
from codegen.spec import CellSpec, simple_stack
from numrnn.runtime import get_kernel, pack_weights

CELLS = {
    "lstm_peephole_proj": CellSpec("lstm", 7, peephole=True, proj_units=5, cell_clip=2.0, forget_bias=1.0),
    "gru_reset_before": CellSpec("gru", 6, reset_after=False),
    "gru_reset_after": CellSpec("gru", 6),
    "simple_relu": CellSpec("simple", 5, activation="relu"),
    "lstm_hard_sigmoid": CellSpec("lstm", 4, recurrent_activation="hard_sigmoid"),
}
TOLERANCE = {"float64": 1e-12, "float32": 1e-6}


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("cell", list(CELLS))
def test_kernel_matches_reference(cell, dtype, monkeypatch):
    rng = np.random.default_rng(0)
    spec = simple_stack([CELLS[cell], CELLS[cell]], 4, dtype=dtype)
    weights = [
        {name: rng.uniform(-0.5, 0.5, shape).astype(dtype) for name, shape in c.weight_shapes(n).items()}
        for c, n in zip(spec.cells, spec.input_sizes())
    ]
    kernel, packed = get_kernel(spec), pack_weights(spec, weights)
    monkeypatch.setattr(kernel, "_small", 4)
    for batch in (1, 3, 9):
        x = rng.standard_normal((11, batch, 4)).astype(dtype)
        states = [np.zeros((batch, n), dtype) for c in spec.cells for n in c.state_sizes]
        y = kernel(x, None, states, packed)
        expected, _ = run_stack(spec, weights, x)
        assert y.dtype == np.dtype(dtype)
        assert float(np.max(np.abs(y - expected))) <= TOLERANCE[dtype], f"batch {batch}"


def test_saturated_float32_lstm_gates_stay_close():
    # The default float32 LSTM puts its activations over common denominators (codegen.cells.common.shares_divisions):
    # with inputs and weights that pin most gates at either end of their clamps, it stays as close to the oracle as
    # the activations one by one did (1.9e-6 then, 1.6e-6 since, on this case).
    rng = np.random.default_rng(7)
    spec = simple_stack([CellSpec("lstm", 40)], 5)  # the kernel test_shared_code compiles too
    assert "_tanh_den(" in generate_source(spec)
    weights = [{name: rng.uniform(-2, 2, shape).astype(np.float32) for name, shape in c.weight_shapes(n).items()}
               for c, n in zip(spec.cells, spec.input_sizes())]
    kernel, packed = get_kernel(spec), pack_weights(spec, weights)
    x = (40 * rng.standard_normal((30, 3, 5))).astype(np.float32)
    h0 = rng.uniform(-1, 1, (3, 40)).astype(np.float32)
    c0 = (3 * rng.standard_normal((3, 40))).astype(np.float32)
    states = [h0.copy(), c0.copy()]
    y = kernel(x, None, states, packed)
    expected, (expected_states,) = run_stack(spec, weights, x, initial_states=[(h0, c0)])
    assert np.mean((np.abs(y) < 1e-4) | (np.abs(y) > 0.76)) > 0.5  # gates at 0 or 1: h near 0 or tanh(+-1)
    np.testing.assert_allclose(y, expected, rtol=0, atol=5e-6)
    c = expected_states[1]
    assert np.all(np.abs(states[1] - c) <= 2e-6 * np.maximum(1, np.abs(c)))
