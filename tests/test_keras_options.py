"""Keras's other constructor arguments: initializers, unit_forget_bias, training-only options, Keras 3 configs,
and the refusal of training calls that would apply dropout (Keras-style and PyTorch-style)."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

import numrnn
from numrnn.compat.torch import nn
from numrnn.layers.initializers import TRUNCATED_UNIT_STDDEV, make_initializer

RNG = np.random.default_rng(11)
X = RNG.standard_normal((3, 5, 2)).astype(np.float32)


def _policy(name="float32"):
    return {"module": "keras", "class_name": "DTypePolicy", "config": {"name": name}, "registered_name": None}


def _initializer(class_name, **config):
    return {"module": "keras.initializers", "class_name": class_name, "config": config, "registered_name": None}


#: A Keras 3.15 ``LSTM(4, return_sequences=True, dropout=0.1, kernel_regularizer="l2", name="enc")``'s
#: ``get_config()``, as Keras writes it (recorded with Keras 3.15.1).
KERAS_LSTM_CONFIG = {
    "name": "enc", "trainable": True, "dtype": _policy(), "return_sequences": True, "return_state": False,
    "go_backwards": False, "stateful": False, "unroll": False, "zero_output_for_mask": False, "units": 4,
    "activation": "tanh", "recurrent_activation": "sigmoid", "use_bias": True,
    "kernel_initializer": _initializer("GlorotUniform", seed=None, input_axes=None, output_axes=None),
    "recurrent_initializer": _initializer("Orthogonal", gain=1.0, seed=None),
    "bias_initializer": _initializer("Zeros"), "unit_forget_bias": True,
    "kernel_regularizer": {"module": "keras.regularizers", "class_name": "L2", "config": {"l2": 0.01},
                           "registered_name": None},
    "recurrent_regularizer": None, "bias_regularizer": None, "activity_regularizer": None,
    "kernel_constraint": None, "recurrent_constraint": None, "bias_constraint": None,
    "dropout": 0.1, "recurrent_dropout": 0.0, "seed": None,
}


def _by_hand_like(layer):
    """A plain numrnn LSTM with ``layer``'s weights, for comparing results."""
    plain = numrnn.LSTM(4, return_sequences=True)
    plain.set_weights(layer.get_weights())
    return plain


def test_a_keras_layer_config_makes_the_same_layer():
    layer = numrnn.LSTM.from_config(KERAS_LSTM_CONFIG)
    assert (layer.name, layer.cell.units, layer.cell.dropout, layer.dtype) == ("enc", 4, 0.1, "float32")
    assert layer.get_config()["kernel_regularizer"] == KERAS_LSTM_CONFIG["kernel_regularizer"]
    layer.build(X.shape)
    np.testing.assert_array_equal(layer(X), _by_hand_like(layer)(X))
    again = numrnn.LSTM.from_config(layer.get_config())
    assert again.get_config() == layer.get_config()


def test_keras_stack_and_bidirectional_configs():
    gru = {"class_name": "GRUCell", "module": "keras.layers", "registered_name": None,
           "config": {"units": 3, "name": "gru_cell", "dtype": _policy("float64"), "trainable": True,
                      "reset_after": False, "seed": 3, "recurrent_dropout": 0.2}}
    stack = {"class_name": "StackedRNNCells", "module": "keras.layers", "registered_name": None,
             "config": {"cells": [gru], "name": "stacked_rnn_cells", "trainable": True, "dtype": _policy()}}
    layer = numrnn.RNN.from_config({"cell": stack, "name": "r", "trainable": True, "dtype": _policy(),
                                    "return_sequences": True})
    assert (layer.name, layer.dtype, layer.cells[0].reset_after, layer.cells[0].recurrent_dropout) == \
        ("r", "float64", False, 0.2)
    forward = {**KERAS_LSTM_CONFIG, "name": "forward_enc"}
    backward = {**KERAS_LSTM_CONFIG, "name": "backward_enc", "go_backwards": True}
    bidirectional = numrnn.Bidirectional.from_config({
        "name": "bidirectional", "trainable": True, "dtype": _policy(), "merge_mode": "sum",
        "layer": {"class_name": "LSTM", "config": forward}, "backward_layer": {"class_name": "LSTM",
                                                                                "config": backward}})
    assert (bidirectional.forward_layer.name, bidirectional.backward_layer.name) == ("forward_enc", "backward_enc")
    assert bidirectional(X).shape == (3, 5, 4)


def test_bidirectional_weights_argument_sets_them():
    source = numrnn.Bidirectional(numrnn.GRU(3))
    source.build(X.shape)
    given = numrnn.Bidirectional(numrnn.GRU(3), weights=source.get_weights())
    np.testing.assert_array_equal(given(X), source(X))


@pytest.mark.parametrize("name, mode, scale, uniform", [
    ("glorot_uniform", "fan_avg", 1.0, True), ("GlorotNormal", "fan_avg", 1.0, False),
    ("he_uniform", "fan_in", 2.0, True), ("he_normal", "fan_in", 2.0, False),
    ("lecun_uniform", "fan_in", 1.0, True), ("LecunNormal", "fan_in", 1.0, False),
])
def test_variance_scaling_initializers_draw_keras_distributions(name, mode, scale, uniform):
    shape = (300, 500)
    values = make_initializer("t", "kernel_initializer", name)(shape, "float64")
    fan = {"fan_in": 300, "fan_avg": 400}[mode]
    np.testing.assert_allclose(values.std(), np.sqrt(scale / fan), rtol=0.02)
    if uniform:
        assert np.abs(values).max() <= np.sqrt(3 * scale / fan)
    else:  # truncated at two of the untruncated normal's standard deviations
        assert np.abs(values).max() <= 2 * np.sqrt(scale / fan) / TRUNCATED_UNIT_STDDEV


def test_other_initializers():
    def draw(value, shape=(64, 32)):
        return make_initializer("t", "kernel_initializer", value)(shape, "float32")

    q = draw({"class_name": "Orthogonal", "config": {"gain": 2.0}})
    np.testing.assert_allclose(q.T @ q, 4 * np.eye(32), atol=1e-12)
    np.testing.assert_array_equal(draw("identity", (3, 4)), np.eye(3, 4))
    np.testing.assert_array_equal(draw({"class_name": "Constant", "config": {"value": 0.25}}), np.full((64, 32), 0.25))
    np.testing.assert_array_equal(draw("ones"), np.ones((64, 32)))
    uniform = draw({"class_name": "RandomUniform", "config": {"minval": 1.0, "maxval": 2.0}})
    assert 1.0 <= uniform.min() and uniform.max() <= 2.0
    truncated = draw({"class_name": "TruncatedNormal", "config": {"mean": 5.0, "stddev": 0.5}})
    assert np.abs(truncated - 5.0).max() <= 1.0
    np.testing.assert_allclose(draw("random_normal", (400, 400)).std(), 0.05, rtol=0.02)
    seeded = {"class_name": "HeNormal", "config": {"seed": 5}}
    np.testing.assert_array_equal(draw(seeded), draw(seeded))
    assert not np.array_equal(draw("he_normal"), draw("he_normal"))
    np.testing.assert_array_equal(draw(lambda shape, dtype=None: np.full(shape, 3.0)), np.full((64, 32), 3.0))

    class Halves:  # an initializer class, given uninstantiated as Keras allows
        def __call__(self, shape, dtype=None):
            return np.full(shape, 0.5)

    np.testing.assert_array_equal(draw(Halves), np.full((64, 32), 0.5))
    older = draw({"class_name": "VarianceScaling", "config": {"distribution": "normal", "seed": 1}}, (300, 500))
    assert np.abs(older).max() <= 2 * np.sqrt(1 / 300) / TRUNCATED_UNIT_STDDEV  # Keras reads "normal" as truncated


def test_cells_build_with_their_initializers():
    cell = numrnn.SimpleRNNCell(3, kernel_initializer="ones", recurrent_initializer="zeros",
                                bias_initializer={"class_name": "Constant", "config": {"value": 0.5}})
    cell.build(2)
    kernel, recurrent, bias = cell.get_weights()
    np.testing.assert_array_equal(kernel, np.ones((2, 3)))
    np.testing.assert_array_equal(recurrent, np.zeros((3, 3)))
    np.testing.assert_array_equal(bias, np.full(3, 0.5))
    gru = numrnn.GRUCell(2, bias_initializer="ones")
    gru.build(2)
    np.testing.assert_array_equal(gru.get_weights()[2], np.ones((2, 6)))  # Keras's (2, 3 * units) reset_after bias


def test_unit_forget_bias():
    keras_default = numrnn.LSTMCell(3, bias_initializer="random_uniform")
    keras_default.build(2)
    bias = keras_default.get_weights()[2]
    np.testing.assert_array_equal(bias[3:6], np.ones(3))
    assert np.abs(np.r_[bias[:3], bias[6:]]).max() <= 0.05
    off = numrnn.LSTMCell(3, unit_forget_bias=False)
    off.build(2)
    np.testing.assert_array_equal(off.get_weights()[2], np.zeros(12))
    assert numrnn.LSTM.from_config(numrnn.LSTM(3, unit_forget_bias=False).get_config()).cell.unit_forget_bias is False


def test_training_calls_with_dropout_are_refused():
    layer = numrnn.LSTM(3, recurrent_dropout=0.3)
    assert layer(X, training=False).shape == layer(X).shape == (3, 3)
    with pytest.raises(ValueError, match=r"LSTM: a training call would apply dropout \(lstmcell.recurrent_dropout"
                                         r"=0.3\).*training=False or None"):
        layer(X, training=True)
    with pytest.raises(ValueError, match="Bidirectional: a training call"):
        numrnn.Bidirectional(layer)(X, training=True)
    cell = numrnn.GRUCell(3, dropout=0.5, name="g")
    states = cell.get_initial_state(3)
    with pytest.raises(ValueError, match=r"GRUCell: .*\(g.dropout=0.5\)"):
        cell(X[:, 0], states, training=True)
    with pytest.raises(ValueError, match="StackedRNNCells: a training call"):
        numrnn.StackedRNNCells([cell])(X[:, 0], [states], training=True)
    numrnn.LSTM(3)(X, training=True)  # no dropout: Keras's training result is the inference one


def test_training_refusal_sees_every_cell_of_one_name():
    with pytest.raises(ValueError, match=r"lstmcell.dropout=0.3"):
        numrnn.RNN([numrnn.LSTMCell(3, dropout=0.3), numrnn.LSTMCell(3)])(X, training=True)
    backward = numrnn.LSTM(3, go_backwards=True, name="same")
    with pytest.raises(ValueError, match=r"same.dropout=0.3"):
        numrnn.Bidirectional(numrnn.LSTM(3, dropout=0.3, name="same"), backward_layer=backward)(X, training=True)


def test_torch_training_mode_with_dropout_between_layers_is_refused():
    lstm = nn.LSTM(2, 3, num_layers=2, dropout=0.2)
    x = X.transpose(1, 0, 2)
    expected = lstm(x)[0]
    with pytest.raises(ValueError, match=r"LSTM: a training call would apply dropout \(dropout=0.2\).*\.eval\(\)"):
        lstm.train()(x)
    np.testing.assert_array_equal(lstm.eval()(x)[0], expected)
    single = nn.GRU(2, 3, num_layers=1, dropout=0.2).train()  # PyTorch drops out between layers only
    assert single(x)[0].shape == (5, 3, 3)


@pytest.mark.parametrize("make, error, match", [
    (lambda: numrnn.LSTMCell(2, kernel_initializer="glorot"), ValueError, "kernel_initializer: unknown initializer"),
    (lambda: numrnn.GRU(2, bias_initializer={"class_name": "Zeros", "config": {"value": 1}}), ValueError,
     r"bias_initializer: 'Zeros' takes \['seed'\]; got \['value'\]"),
    (lambda: numrnn.GRUCell(2, recurrent_initializer=3), TypeError, "recurrent_initializer: expected an initializer"),
    (lambda: numrnn.SimpleRNN(2, kernel_initializer={"class_name": "RandomNormal", "config": {"stddev": 0}}),
     ValueError, "stddev must be positive"),
    (lambda: numrnn.LSTMCell(2, kernel_initializer={"class_name": "VarianceScaling", "config": {"mode": "fan"}}),
     ValueError, "mode must be 'fan_in', 'fan_out' or 'fan_avg'"),
    (lambda: numrnn.LSTMCell(2, kernel_initializer={"class_name": "HeNormal", "config": {"seed": -1}}),
     ValueError, "seed must be a non-negative integer"),
    (lambda: numrnn.LSTMCell(2, dropout=1.5), ValueError, r"LSTMCell: dropout must be a number in \[0, 1\]"),
    (lambda: numrnn.GRU(2, use_cudnn=True), ValueError, "use_cudnn must be 'auto' or False"),
    (lambda: numrnn.LSTMCell(2, dtype=_policy("mixed_float16")), ValueError, "dtype must be 'float32' or 'float64'"),
    (lambda: numrnn.RNN(numrnn.GRUCell(2), dtype="int8"), ValueError, "RNN: dtype must be"),
    (lambda: numrnn.GRUCell(2, unit_forget_bias=True), TypeError, "unit_forget_bias"),
    (lambda: numrnn.LSTMCell(2, bias_initializer="orthogonal").build(3), ValueError,
     "bias_initializer: an orthogonal initializer needs a 2-D shape"),
    (lambda: numrnn.LSTMCell(2, kernel_initializer=lambda shape, dtype=None: np.zeros(3)).build(3), ValueError,
     r"kernel_initializer returned shape \(3,\) for shape \(3, 8\)"),
    (lambda: nn.LSTM(2, 3, dropout=-0.1), ValueError, r"LSTM: dropout must be a number in \[0, 1\]"),
    (lambda: numrnn.LSTM(4, "relu"), TypeError, "positional"),
    (lambda: numrnn.GRUCell(2, dtype={"class_name": "DTypePolicy", "config": {}}), ValueError,
     "GRUCell: dtype must be 'float32' or 'float64'"),
    (lambda: numrnn.GRUCell(2, dtype={"name": "float32"}), ValueError, "GRUCell: dtype must be"),
    (lambda: numrnn.StackedRNNCells([numrnn.GRUCell(2)], dtype="float16"), ValueError, "StackedRNNCells: dtype"),
])
def test_bad_keras_options_are_named(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_configs_are_copies():
    given = {"class_name": "RandomNormal", "config": {"stddev": 0.1}}
    layer = numrnn.LSTM(2, kernel_initializer=given)
    given["config"]["stddev"] = -1.0
    layer.get_config()["kernel_initializer"]["config"]["stddev"] = -1.0
    assert layer.get_config()["kernel_initializer"]["config"]["stddev"] == 0.1
    layer.build(X.shape)


def test_names_and_dtypes_as_keras_gives_them():
    assert (numrnn.LSTM(2).name, numrnn.GRU(2).name, numrnn.SimpleRNN(2).name, numrnn.RNN(numrnn.GRUCell(2)).name) \
        == ("lstm", "gru", "simple_rnn", "rnn")
    named = numrnn.Bidirectional(numrnn.GRU(2, name="enc"))
    assert (named.forward_layer.name, named.backward_layer.name, named.name) == ("enc", "backward_enc", "bidirectional")
    assert numrnn.GRUCell(2, dtype=None).dtype == "float32"  # Keras's floatx
    assert numrnn.LSTMCell(2, dtype=_policy("float64")).dtype == "float64"


def test_a_cell_pickled_before_the_options_existed_still_works():
    cell = numrnn.LSTMCell(3)
    state = cell.__dict__.copy()
    for name in ("kernel_initializer", "recurrent_initializer", "bias_initializer", "dropout", "recurrent_dropout",
                 "training_only", "unit_forget_bias"):
        del state[name]
    old = numrnn.LSTMCell.__new__(numrnn.LSTMCell)
    old.__setstate__(state)
    old = pickle.loads(pickle.dumps(old))
    assert old.get_config()["kernel_initializer"] == "glorot_uniform"
    old.build(2)
    np.testing.assert_array_equal(old.get_weights()[2][3:6], np.ones(3))
    assert numrnn.RNN(old).get_config()["name"] == "rnn"
