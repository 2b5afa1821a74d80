"""The facades look their kernels up by what the specs are made of (``numrnn.runtime.kernel_for``).

A call like the one before makes no spec (that had taken a quarter to a half of
a one-step call), and a call after an option changed runs the new option.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import numrnn
from codegen.spec import StackSpec
from numrnn.compat.torch import nn
from numrnn.compat.v1 import nn as v1
from numrnn.runtime import kernels
from numrnn.runtime.schedule import cores

RNG = np.random.default_rng(11)
X = RNG.standard_normal((3, 5, 2)).astype(np.float32)  # batch-major, as Keras and TF1 take it


def _arrays(result) -> list[np.ndarray]:
    """The arrays of a facade's result, in order (its tuples and lists flattened)."""
    if isinstance(result, np.ndarray):
        return [result]
    return [array for item in result for array in _arrays(item)]


@pytest.fixture
def specs_made(monkeypatch):
    """The specs made from here on (each ``StackSpec`` checks itself once made), ``kernel_for``'s memo empty."""
    made = []
    real = StackSpec.__post_init__
    monkeypatch.setattr(StackSpec, "__post_init__", lambda spec: made.append(spec) or real(spec))
    monkeypatch.setattr(kernels, "_KERNEL_OF_KEY", {})
    return made


def _keras_layer():
    layer = numrnn.LSTM(4, return_state=True)
    return lambda: layer(X, initial_state=[np.zeros((3, 4), np.float32)] * 2)


def _keras_bidirectional():
    layer = numrnn.Bidirectional(numrnn.LSTM(3, return_sequences=True), merge_mode=None)
    return lambda: layer(X)


def _keras_cell():
    cell = numrnn.LSTMCell(4)
    return lambda: cell(X[:, 0], [np.zeros((3, 4), np.float32)] * 2)


def _torch_module():
    module = nn.GRU(2, 4, bidirectional=True, batch_first=True)
    return lambda: module(X, lengths=[5, 3, 4])


def _tf1_cell():
    cell = v1.rnn_cell.BasicLSTMCell(4)
    return lambda: cell(X[:, 0], cell.zero_state(3))


def _tf1_dynamic_rnn():
    cell = v1.rnn_cell.GRUCell(3)
    return lambda: v1.dynamic_rnn(cell, X, sequence_length=[5, 3, 4], dtype="float32")


CALLS = {"keras layer": _keras_layer, "keras bidirectional": _keras_bidirectional, "keras cell": _keras_cell,
         "torch module": _torch_module, "tf1 cell": _tf1_cell, "tf1 dynamic_rnn": _tf1_dynamic_rnn}


@pytest.mark.parametrize("facade", sorted(CALLS))
def test_a_call_like_the_last_makes_no_spec(facade, specs_made):
    call = CALLS[facade]()
    first = call()
    assert specs_made  # made on the first call
    specs_made.clear()
    again = call()
    assert specs_made == []
    for a, b in zip(_arrays(first), _arrays(again), strict=True):
        np.testing.assert_array_equal(a, b)


def test_keras_options_changed_after_a_call_take_effect():
    layer = numrnn.LSTM(4)
    last = layer(X)
    assert last.shape == (3, 4)
    layer.return_sequences = True
    sequence = layer(X)
    assert sequence.shape == (3, 5, 4)
    np.testing.assert_array_equal(sequence[:, -1], last)

    layer.go_backwards = True
    backward = numrnn.LSTM(4, return_sequences=True, go_backwards=True)
    backward.set_weights(layer.get_weights())
    np.testing.assert_array_equal(layer(X), backward(X))

    layer.cell.activation = "relu"
    relu = numrnn.LSTM(4, activation="relu", return_sequences=True, go_backwards=True)
    relu.set_weights(layer.get_weights())
    np.testing.assert_array_equal(layer(X), relu(X))
    assert not np.array_equal(layer(X), backward(X))


def test_a_cell_rebuilt_for_other_features_is_checked_again():
    layer = numrnn.LSTM(4)
    layer(X)
    layer.cell.build(3)  # now for 3 features, as the layer's input no longer is
    with pytest.raises(ValueError, match=r"x: expected 3 features"):
        layer(X)
    stacked = numrnn.RNN([numrnn.LSTMCell(4), numrnn.GRUCell(3)])
    stacked(X)
    stacked.cell.cells[1].build(5)  # the GRU above, for 5 inputs where the LSTM gives it 4
    with pytest.raises(ValueError, match=r"cells\[1\] \(grucell\) was built for 5 input features"):
        stacked(X)


@pytest.mark.parametrize("facade", ["keras", "torch"])
def test_unroll_true_is_not_unroll_one(facade):
    # True == 1 in Python: a key holding the option rather than the spec's unroll gave a full static unroll's
    # call the loop kernel of unroll=1 (and no error past the static unroll ceiling), or the other way round.
    long = np.zeros((1, 300, 2), np.float32)
    make = {"keras": lambda unroll: numrnn.LSTM(4, unroll=unroll),
            "torch": lambda unroll: nn.LSTM(2, 4, batch_first=True, unroll=unroll)}[facade]
    make(1)(long)
    with pytest.raises(ValueError, match="unroll=True needs at most 256 time steps"):
        make(True)(long)


def test_torch_options_changed_after_a_call_take_effect():
    module = nn.RNN(2, 4, batch_first=True)
    before = module(X)[0]
    module.nonlinearity = "relu"
    relu = nn.RNN(2, 4, nonlinearity="relu", batch_first=True)
    relu.load_state_dict(module.state_dict())
    np.testing.assert_array_equal(module(X)[0], relu(X)[0])
    assert not np.array_equal(module(X)[0], before)


def test_tf1_options_changed_after_a_call_take_effect():
    cell = v1.rnn_cell.BasicLSTMCell(4)
    state = cell.zero_state(3)
    before = cell(X[:, 0], state)[0]
    cell.forget_bias = 0.5
    other = v1.rnn_cell.BasicLSTMCell(4, forget_bias=0.5)
    other.build(2)
    other.set_weights(cell.get_weights())
    np.testing.assert_array_equal(cell(X[:, 0], state)[0], other(X[:, 0], state)[0])
    np.testing.assert_array_equal(v1.dynamic_rnn(cell, X, dtype="float32")[0],
                                  v1.dynamic_rnn(other, X, dtype="float32")[0])
    assert not np.array_equal(cell(X[:, 0], state)[0], before)


BATCH_MAJOR = {
    "keras LSTM": lambda: numrnn.LSTM(4, return_sequences=True),
    "keras bidirectional": lambda: numrnn.Bidirectional(numrnn.LSTM(3, return_sequences=True), merge_mode=None),
    "torch batch_first": lambda: nn.GRU(2, 4, bidirectional=True, batch_first=True),
    "tf1 dynamic_rnn": lambda: (lambda cell: lambda x: v1.dynamic_rnn(cell, x, dtype="float32")[0])(
        v1.rnn_cell.GRUCell(3)),
}


@pytest.mark.parametrize("facade", sorted(BATCH_MAJOR))
def test_batch_major_facades_give_the_same_outputs_split_by_rows(facade, monkeypatch):
    # Their batch-major input and output reach the kernel transposed, not copied: the batch split reads and
    # writes its rows there itself; serial calls run on contiguous copies.
    if cores() < 2:
        pytest.skip("one core: the batch split runs serial")
    call = BATCH_MAJOR[facade]()
    outputs = {}
    for schedule in ("serial", "batch"):
        monkeypatch.setenv("NUMRNN_SCHEDULE", schedule)
        outputs[schedule] = call(X)
    for serial, split in zip(_arrays(outputs["serial"]), _arrays(outputs["batch"]), strict=True):
        assert serial.flags.c_contiguous and split.flags.c_contiguous
        np.testing.assert_array_equal(serial, split)


def test_an_unpickled_cell_makes_its_spec_again():
    # A cell keeps its CellSpec while its options stay; a pickle leaves it out, since the numrnn that unpickles
    # may make another spec of the same options (a stale one stands in for it here).
    import pickle

    cell = numrnn.LSTMCell(4)
    spec = cell.cell_spec()
    cell._spec = (cell._spec[0], dataclasses.replace(spec, units=5))
    assert cell.cell_spec().units == 5
    assert pickle.loads(pickle.dumps(cell)).cell_spec() == spec
