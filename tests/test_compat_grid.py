"""The spec variants the TF1 and PyTorch facades use, kernel (loop and static unroll) against the NumPy oracle.

Variants: LSTM peepholes, cell clip, output projection and run-time forget
bias; reset-before GRU; relu RNN; ``reverse="valid"`` under
``masking="lengths"`` (with zero lengths and full lengths); several blocks of
two directions (PyTorch multi-layer bidirectional, projected); two different
directions side by side (``merge=None``, TF1 ``bidirectional_dynamic_rnn``).
Few specs on purpose: each one is a Numba compile.
"""

from __future__ import annotations

import numpy as np
import pytest
from reference import run_stack

from codegen.spec import BlockSpec, CellSpec, DirectionSpec, StackSpec
from numrnn.runtime import get_kernel, pack_weights

T, B, D = 6, 4, 3
LENGTHS = np.array([6, 3, 0, 1])
TF1_LSTM = CellSpec("lstm", 5, peephole=True, cell_clip=0.8, proj_units=3, forget_bias=0.7)
TF1_GRU = CellSpec("gru", 4, reset_after=False)
TORCH_LSTM_PROJ = CellSpec("lstm", 4, proj_units=2)


def _tf1_stack(**kw):
    cells = (TF1_LSTM, TF1_GRU, CellSpec("simple", 3, activation="relu"))
    return StackSpec((BlockSpec((DirectionSpec(cells),)),), D, masking="lengths", **kw)


def _torch_bidir(**kw):
    block = BlockSpec((DirectionSpec((TORCH_LSTM_PROJ,)), DirectionSpec((TORCH_LSTM_PROJ,), reverse="valid")))
    return StackSpec((block, block, block), D, masking="lengths", **kw)


def _tf1_bidir(**kw):
    block = BlockSpec((DirectionSpec((TF1_LSTM,)), DirectionSpec((TF1_GRU, CellSpec("simple", 2)), reverse="full")),
                      merge=None)
    return StackSpec((block,), D, **kw)


SPECS = {"tf1_stack_lengths": _tf1_stack, "torch_3layer_bidir_proj_packed": _torch_bidir,
         "tf1_bidir_different_cells": _tf1_bidir}


def _weights(spec: StackSpec, rng) -> list[dict]:
    return [{k: rng.uniform(-0.6, 0.6, s) for k, s in cell.weight_shapes(n).items()}
            for cell, n in zip(spec.cells, spec.input_sizes())]


def _run_both(spec: StackSpec, seed: int = 0):
    rng = np.random.default_rng(seed)
    weights = _weights(spec, rng)
    x = rng.standard_normal((T, B, D)).astype(spec.dtype)
    init = [tuple(rng.standard_normal((B, n)).astype(spec.dtype) for n in cell.state_sizes) for cell in spec.cells]
    lengths = LENGTHS if spec.masking == "lengths" else None
    want, want_states = run_stack(spec, weights, x, lengths=lengths, initial_states=init)
    states = [np.array(s) for state in init for s in state]
    got = get_kernel(spec)(x, lengths, states, pack_weights(spec, weights))
    return (got, states), (want, [s for state in want_states for s in state])


@pytest.mark.parametrize("unroll", [None, T], ids=["loop", "unrolled"])
@pytest.mark.parametrize("name", list(SPECS))
def test_kernel_matches_reference(name, unroll):
    spec = SPECS[name](unroll=unroll)
    (got, states), (want, want_states) = _run_both(spec)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert len(states) == len(want_states)
    for k, (g, w) in enumerate(zip(states, want_states)):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-5, err_msg=f"state {k}")


def test_float64_tf1_stack_matches_reference_tightly():
    spec = _tf1_stack(dtype="float64")
    (got, states), (want, want_states) = _run_both(spec, seed=1)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)
    for g, w in zip(states, want_states):
        np.testing.assert_allclose(g, w, rtol=0, atol=1e-12)


def test_lengths_semantics_of_the_kernel():
    """Zero output past each length; a zero-length row keeps its initial state; the clip bounds c."""
    spec = _tf1_stack()
    (got, states), _ = _run_both(spec, seed=2)
    for b, n in enumerate(LENGTHS):
        assert np.all(got[n:, b] == 0)
    rng = np.random.default_rng(2)
    _weights(spec, rng)
    rng.standard_normal((T, B, D))
    h0, c0 = rng.standard_normal((B, 3)), rng.standard_normal((B, 5))
    np.testing.assert_allclose(states[0][2], h0[2].astype(np.float32))
    np.testing.assert_allclose(states[1][2], c0[2].astype(np.float32))
    assert np.all(np.abs(np.delete(states[1], 2, axis=0)) <= 0.8 + 1e-7)
