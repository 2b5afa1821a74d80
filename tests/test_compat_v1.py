"""The TF1-style facade beyond the golden fixtures: structures, one-step calls, weights, and bad input."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from numrnn.compat.v1 import nn
from numrnn.compat.v1.nn.rnn_cell import (
    BasicLSTMCell,
    BasicRNNCell,
    GRUCell,
    LSTMCell,
    LSTMStateTuple,
    MultiRNNCell,
)

B, T, D = 3, 4, 2


def _multi(seed=0):
    """LSTMCell(peepholes, clip, projection) above which a GRUCell: the shapes every test here uses."""
    cell = MultiRNNCell([LSTMCell(4, use_peepholes=True, cell_clip=1.5, num_proj=3, forget_bias=0.5), GRUCell(3)])
    rng = np.random.default_rng(seed)
    cell.build(D)
    cell.set_weights([rng.uniform(-0.5, 0.5, w.shape) for w in cell.get_weights()])
    return cell


def _x(seed=1, steps=T):
    return np.random.default_rng(seed).standard_normal((B, steps, D)).astype(np.float32)


def test_import_paths_and_no_framework_imports():
    import numrnn.compat.v1.nn.rnn_cell as rnn_cell_module

    assert rnn_cell_module.LSTMCell is nn.rnn_cell.LSTMCell is LSTMCell
    code = ("import sys, numrnn, numrnn.compat.v1, numrnn.compat.torch; "
            "assert 'torch' not in sys.modules and 'tensorflow' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_sizes_and_zero_state_structure():
    cell = _multi()
    assert cell.state_size == (LSTMStateTuple(4, 3), 3)
    assert cell.output_size == 3
    state = cell.zero_state(B, np.float32)
    assert isinstance(state, tuple) and isinstance(state[0], LSTMStateTuple)
    assert state[0].c.shape == (B, 4) and state[0].h.shape == (B, 3) and state[1].shape == (B, 3)
    assert BasicRNNCell(5).state_size == 5 and BasicLSTMCell(5).state_size == LSTMStateTuple(5, 5)


def test_weights_in_tf1_order_round_trip():
    cell = _multi()
    assert cell.weight_names() == [
        "multi_rnn_cell/cell_0/lstm_cell/kernel", "multi_rnn_cell/cell_0/lstm_cell/bias",
        "multi_rnn_cell/cell_0/lstm_cell/w_f_diag", "multi_rnn_cell/cell_0/lstm_cell/w_i_diag",
        "multi_rnn_cell/cell_0/lstm_cell/w_o_diag", "multi_rnn_cell/cell_0/lstm_cell/projection/kernel",
        "multi_rnn_cell/cell_1/gru_cell/gates/kernel", "multi_rnn_cell/cell_1/gru_cell/gates/bias",
        "multi_rnn_cell/cell_1/gru_cell/candidate/kernel", "multi_rnn_cell/cell_1/gru_cell/candidate/bias"]
    shapes = [w.shape for w in cell.get_weights()]
    assert shapes == [(D + 3, 16), (16,), (4,), (4,), (4,), (4, 3), (6, 6), (6,), (6, 3), (3,)]
    fresh = MultiRNNCell([LSTMCell(4, use_peepholes=True, cell_clip=1.5, num_proj=3, forget_bias=0.5), GRUCell(3)])
    fresh.set_weights(cell.get_weights())  # builds from the kernel's rows
    assert fresh.input_size == D
    for a, b in zip(fresh.get_weights(), cell.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_one_step_calls_chain_like_dynamic_rnn():
    cell, x = _multi(), _x(steps=2)
    rng = np.random.default_rng(3)
    init = (LSTMStateTuple(rng.standard_normal((B, 4)), rng.standard_normal((B, 3))), rng.standard_normal((B, 3)))
    outputs, final = nn.dynamic_rnn(cell, x, initial_state=init, dtype=np.float32)
    state = init
    for t in range(2):
        out, state = cell(x[:, t], state)
        np.testing.assert_allclose(out, outputs[:, t], rtol=0, atol=1e-6)
    assert isinstance(state[0], LSTMStateTuple)
    for got, want in zip(state[0] + (state[1],), final[0] + (final[1],)):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_dynamic_and_static_rnn_with_sequence_length():
    cell, x = _multi(), _x()
    lengths = np.array([4, 0, 2])
    outputs, state = nn.dynamic_rnn(cell, x, sequence_length=lengths, dtype=np.float32)
    steps, static_state = nn.static_rnn(cell, list(x.transpose(1, 0, 2)), sequence_length=lengths, dtype=np.float32)
    np.testing.assert_allclose(np.stack(steps, axis=1), outputs, rtol=0, atol=1e-6)
    assert np.all(outputs[1] == 0) and np.all(outputs[2, 2:] == 0)
    assert np.all(state[0].c[1] == 0) and np.all(state[1][1] == 0)  # zero length: the initial (zero) state
    np.testing.assert_allclose(state[1][2], outputs[2, 1], rtol=0, atol=1e-7)  # state = output at the last step
    np.testing.assert_allclose(static_state[1], state[1], rtol=0, atol=1e-6)


def test_bidirectional_structure_and_valid_prefix_reversal():
    fw, bw, x = BasicLSTMCell(3), GRUCell(2), _x()
    lengths = np.array([4, 2, 1])
    (out_fw, out_bw), (state_fw, state_bw) = nn.bidirectional_dynamic_rnn(fw, bw, x, sequence_length=lengths,
                                                                           dtype=np.float32)
    assert out_fw.shape == (B, T, 3) and out_bw.shape == (B, T, 2)
    assert isinstance(state_fw, LSTMStateTuple) and state_bw.shape == (B, 2)
    # the backward cell on row 1 sees x[1, 1], x[1, 0]: the same as dynamic_rnn over that reversed prefix
    alone, last = nn.dynamic_rnn(bw, x[1:2, 1::-1], dtype=np.float32)
    np.testing.assert_allclose(out_bw[1, :2], alone[0, ::-1], rtol=0, atol=1e-6)
    np.testing.assert_allclose(state_bw[1], last[0], rtol=0, atol=1e-6)
    assert np.all(out_bw[1, 2:] == 0)


def test_float64_and_time_major():
    cell, x = BasicRNNCell(3, activation="relu"), _x().astype(np.float64)
    out, state = nn.dynamic_rnn(cell, x.transpose(1, 0, 2), dtype=np.float64, time_major=True)
    assert out.dtype == np.float64 and out.shape == (T, B, 3) and state.dtype == np.float64
    np.testing.assert_array_equal(out[-1], state)


@pytest.mark.parametrize("lengths, match", [
    ([5, 1, 1], r"sequence_length: every length must lie in \[0, 4\].*got \[5, 1, 1\]"),
    ([2, -1, 1], r"sequence_length: every length must lie in \[0, 4\]"),
    ([2, 1], r"sequence_length: expected shape \(batch,\) = \(3,\); got \(2,\)"),
])
def test_bad_sequence_length(lengths, match):
    with pytest.raises(ValueError, match=match):
        nn.dynamic_rnn(_multi(), _x(), sequence_length=lengths, dtype=np.float32)
    with pytest.raises(ValueError, match=match):
        nn.static_rnn(_multi(), list(_x().transpose(1, 0, 2)), sequence_length=lengths, dtype=np.float32)


@pytest.mark.parametrize("state, match", [
    (np.zeros((B, 3)), r"initial_state: expected a tuple of 2 states .* got ndarray"),
    ((np.zeros((B, 3)),), r"initial_state: expected a tuple of 2 states .* got a tuple of 1 items"),
    ((np.zeros((B, 4)), np.zeros((B, 3))), r"initial_state\[0\]: expected an LSTMStateTuple\(c, h\)"),
    ((LSTMStateTuple(np.zeros((B, 3)), np.zeros((B, 3))), np.zeros((B, 3))),
     r"initial_state\[0\].c: expected shape \(3, 4\); got \(3, 3\)"),
    ((LSTMStateTuple(np.zeros((B, 4)), np.zeros((B, 3))), (np.zeros((B, 3)),)),
     r"initial_state\[1\]: expected an array of shape \(3, 3\); got a tuple of 1 items"),
])
def test_wrong_state_structure(state, match):
    with pytest.raises(ValueError, match=match):
        nn.dynamic_rnn(_multi(), _x(), initial_state=state)


def test_bad_inputs_and_weights():
    cell = _multi()
    with pytest.raises(ValueError, match="inputs: expected 2 features"):
        nn.dynamic_rnn(cell, np.zeros((B, T, 5)), dtype=np.float32)
    with pytest.raises(TypeError, match="static_rnn: inputs must be a non-empty list"):
        nn.static_rnn(cell, np.zeros((T, B, D)))
    with pytest.raises(ValueError, match=r"static_rnn: inputs\[1\]: expected shape \(3, 2\)"):
        nn.static_rnn(cell, [np.zeros((B, D)), np.zeros((B + 1, D))])
    with pytest.raises(TypeError, match="dynamic_rnn: cell"):
        nn.dynamic_rnn(object(), _x())
    weights = cell.get_weights()
    with pytest.raises(ValueError, match="expected 10 arrays"):
        cell.set_weights(weights[:-1])
    weights[1] = np.zeros(15)
    with pytest.raises(ValueError, match=r"weights\[1\] \(lstm_cell/bias\) has shape \(15,\); expected \(16,\)"):
        cell.set_weights(weights)
    weights = cell.get_weights()
    weights[0][-1, 0] = np.nan  # a recurrent row of the first cell's kernel
    with pytest.raises(ValueError, match=r"weights\[0\] \(lstm_cell/kernel\) holds NaN or infinite values"):
        cell.set_weights(weights)
    with pytest.raises(ValueError, match="reuses the cell object"):
        MultiRNNCell([GRUCell(2)] * 2)
    with pytest.raises(ValueError, match="proj_clip is not supported"):
        LSTMCell(3, proj_clip=1.0)
    with pytest.raises(ValueError, match="cell_clip must be a positive finite number"):
        LSTMCell(3, cell_clip=-1.0)
    with pytest.raises(ValueError, match="^BasicLSTMCell: forget_bias must be finite; got inf"):
        BasicLSTMCell(3, forget_bias=float("inf"))


def test_cells_draw_their_weights_with_the_initializers_given():
    # TF1's LSTMCell draws its kernel, peephole diagonals and projection with `initializer` (biases zeros);
    # GRUCell both kernels with `kernel_initializer` and both biases with `bias_initializer`. A TF initializer
    # object is a callable f(shape, dtype=...), as this one is.
    def quarter(shape, dtype=None):
        return np.full(shape, 0.25)

    lstm = LSTMCell(4, use_peepholes=True, num_proj=3, initializer=quarter)
    lstm.build(D)
    drawn = dict(zip(lstm.weight_names(), lstm.get_weights()))
    for name, values in drawn.items():
        np.testing.assert_array_equal(values, 0.0 if name.endswith("bias") else 0.25, err_msg=name)
    gru = GRUCell(3, kernel_initializer={"class_name": "Constant", "config": {"value": 0.5}},
                  bias_initializer="zeros")
    gru.build(D)
    for name, values in zip(gru.weight_names(), gru.get_weights()):
        np.testing.assert_array_equal(values, 0.0 if name.endswith("bias") else 0.5, err_msg=name)


def test_cells_without_initializers_keep_tf1_defaults():
    gru = GRUCell(3)
    gru.build(D)
    weights = dict(zip(gru.weight_names(), gru.get_weights()))
    np.testing.assert_array_equal(weights["gru_cell/gates/bias"], 1.0)  # TF1's GRUCell starts with open gates
    np.testing.assert_array_equal(weights["gru_cell/candidate/bias"], 0.0)
    limit = np.sqrt(6 / sum(weights["gru_cell/gates/kernel"].shape))  # glorot-uniform
    assert 0 < np.abs(weights["gru_cell/gates/kernel"]).max() <= limit


@pytest.mark.parametrize("make, match", [
    (lambda: LSTMCell(3, initializer="nope"), "^LSTMCell: initializer: unknown initializer 'nope'"),
    (lambda: GRUCell(3, kernel_initializer=3), "^GRUCell: kernel_initializer"),
    (lambda: GRUCell(3, bias_initializer={"class_name": "Zeros", "config": {"seed": -1}}),
     "^GRUCell: bias_initializer"),
])
def test_an_unknown_initializer_is_refused_when_the_cell_is_made(make, match):
    with pytest.raises((ValueError, TypeError), match=match):
        make()
