"""The three facades are translations onto one engine: equal weights give equal results, from one kernel."""

from __future__ import annotations

import numpy as np

import numrnn
from codegen.spec import CellSpec
from numrnn.compat import torch as ntorch
from numrnn.compat.v1 import nn as tf1_nn
from numrnn.compat.weights import tf1_cell_arrays, torch_layer_arrays
from numrnn.runtime import get_kernel


def test_one_lstm_through_keras_tf1_and_torch():
    rng = np.random.default_rng(0)
    cell = CellSpec("lstm", 4)
    logical = {k: rng.uniform(-0.5, 0.5, s).astype(np.float32) for k, s in cell.weight_shapes(3).items()}
    x = rng.standard_normal((2, 5, 3)).astype(np.float32)

    keras = numrnn.LSTM(4, return_sequences=True, return_state=True)
    keras.set_weights([logical["kernel"], logical["recurrent_kernel"], logical["bias"]])
    k_out, k_h, k_c = keras(x)

    tf1_cell = tf1_nn.rnn_cell.BasicLSTMCell(4, forget_bias=0.0)  # TF1's default 1.0 would differ
    tf1_cell.set_weights(tf1_cell_arrays(cell, logical))
    t_out, t_state = tf1_nn.dynamic_rnn(tf1_cell, x, dtype=np.float32)

    torch_lstm = ntorch.nn.LSTM(3, 4, batch_first=True)
    torch_lstm.load_state_dict({f"{k}_l0": v for k, v in torch_layer_arrays(cell, logical).items()})
    p_out, (p_h, p_c) = torch_lstm(x)

    np.testing.assert_array_equal(t_out, k_out)
    np.testing.assert_array_equal(t_state.h, k_h)
    np.testing.assert_array_equal(t_state.c, k_c)
    np.testing.assert_allclose(p_out, k_out, rtol=0, atol=1e-6)  # PyTorch's two biases are summed: rounding
    np.testing.assert_allclose(p_h[0], k_h, rtol=0, atol=1e-6)
    np.testing.assert_allclose(p_c[0], k_c, rtol=0, atol=1e-6)
    assert get_kernel(torch_lstm.spec(5)) is get_kernel(keras.spec(5))  # the very same generated kernel


def test_each_facade_packs_again_after_unpickling():
    # A pack's panels are as wide as its process's vectors (codegen.cells.common.vector_bytes), which the process
    # that unpickles may not share: pickles leave the packs out, and the first call makes them again.
    import pickle

    rng = np.random.default_rng(1)
    cell = CellSpec("lstm", 4)
    logical = {k: rng.uniform(-0.5, 0.5, s).astype(np.float32) for k, s in cell.weight_shapes(3).items()}
    x = rng.standard_normal((2, 5, 3)).astype(np.float32)
    keras = numrnn.LSTM(4, return_sequences=True)
    keras.set_weights([logical["kernel"], logical["recurrent_kernel"], logical["bias"]])
    tf1_cell = tf1_nn.rnn_cell.BasicLSTMCell(4, forget_bias=0.0)
    tf1_cell.set_weights(tf1_cell_arrays(cell, logical))
    torch_lstm = ntorch.nn.LSTM(3, 4, batch_first=True)
    torch_lstm.load_state_dict({f"{k}_l0": v for k, v in torch_layer_arrays(cell, logical).items()})
    calls = {"keras": (keras, lambda layer: layer(x), lambda layer: layer.cell._packed),
             "tf1": (tf1_cell, lambda c: tf1_nn.dynamic_rnn(c, x, dtype=np.float32)[0], lambda c: c._packed),
             "torch": (torch_lstm, lambda m: m(x)[0], lambda m: m._packed)}
    for name, (facade, call, pack_of) in calls.items():
        before = call(facade)
        assert pack_of(facade), name
        copy = pickle.loads(pickle.dumps(facade))
        assert not pack_of(copy), name
        np.testing.assert_array_equal(call(copy), before)
        assert pack_of(copy), name
