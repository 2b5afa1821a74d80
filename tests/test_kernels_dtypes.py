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
