"""Bad input gets a ValueError/TypeError naming the argument, the expected and the received."""

from __future__ import annotations

import numpy as np
import pytest
from test_compat_torch import FakeTensor

import numrnn
from codegen.spec import UNROLL_CEILING, CellSpec, StackSpec, simple_stack
from numrnn.runtime import get_kernel, pack_weights, schedule

X = np.zeros((2, 4, 3), np.float32)


@pytest.fixture(scope="module")
def lstm():
    layer = numrnn.LSTM(4, return_sequences=True)
    layer.build(X.shape)
    return layer


@pytest.mark.parametrize(
    "x, error, words",
    [
        (np.zeros((2, 3), np.float32), ValueError, ["x", "3-D", "(batch, time, features)", "(2, 3)"]),
        (np.zeros((2, 4, 5), np.float32), ValueError, ["x", "expected 3 features", "got 5"]),
        (np.zeros((2, 0, 3), np.float32), ValueError, ["x", "at least 1", "(2, 0, 3)"]),
        (np.zeros((2, 4, 0), np.float32), ValueError, ["x", "feature sizes must be at least 1", "(2, 4, 0)"]),
        (np.array([[["a"] * 3] * 4] * 2), TypeError, ["x", "real numeric", "<U1"]),
        (np.zeros((2, 4, 3), np.complex64), TypeError, ["x", "complex64"]),
    ],
    ids=["rank", "features", "empty-time", "no-features", "strings", "complex"],
)
def test_bad_x(lstm, x, error, words):
    with pytest.raises(error) as info:
        lstm(x)
    for word in words:
        assert word in str(info.value)


@pytest.mark.parametrize(
    "mask, error, words",
    [
        (np.ones((2, 5), bool), ValueError, ["LSTM: mask", "(2, 4)", "(2, 5)"]),
        (np.ones((4, 2), bool), ValueError, ["LSTM: mask", "(batch, time)", "(4, 2)"]),
        (np.ones((2, 4), np.float32), TypeError, ["LSTM: mask", "boolean", "float32"]),
        (np.full((2, 4), 2), TypeError, ["LSTM: mask", "0/1"]),
    ],
    ids=["time", "transposed", "float", "not-binary"],
)
def test_bad_mask(lstm, mask, error, words):
    with pytest.raises(error) as info:
        lstm(X, mask=mask)
    for word in words:
        assert word in str(info.value)


def test_integer_masks_are_accepted(lstm):
    np.testing.assert_array_equal(lstm(X, mask=np.ones((2, 4), np.int64)), lstm(X, mask=np.ones((2, 4), bool)))


def test_a_mask_may_be_a_torch_tensor(lstm):
    mask = np.ones((2, 4), bool)
    mask[1, 2:] = False
    np.testing.assert_array_equal(lstm(X, mask=FakeTensor(mask)), lstm(X, mask=mask))


def test_set_weights_count_shape_and_values(lstm):
    good = lstm.get_weights()
    with pytest.raises(ValueError, match=r"expected 3 arrays .* got 2"):
        lstm.set_weights(good[:2])
    with pytest.raises(ValueError, match=r"kernel has shape \(5, 16\); expected \(3, 16\)"):
        lstm.set_weights([np.zeros((5, 16), np.float32), *good[1:]])
    with pytest.raises(ValueError, match=r"recurrent_kernel.*shape \(4, 12\).*expected \(4, 16\)"):
        lstm.set_weights([good[0], np.zeros((4, 12), np.float32), good[2]])
    bad = [w.copy() for w in good]
    bad[2][0] = np.nan
    with pytest.raises(ValueError, match="bias holds NaN"):
        lstm.set_weights(bad)
    np.testing.assert_array_equal(lstm.get_weights()[0], good[0])  # failed sets change nothing


def test_stacked_set_weights_checks_the_chain():
    layer = numrnn.RNN([numrnn.GRUCell(4), numrnn.GRUCell(3)])
    layer.build(X.shape)
    weights = layer.get_weights()
    weights[3] = np.zeros((5, 9), np.float32)  # second cell's kernel must read the first cell's 4 outputs
    with pytest.raises(ValueError, match=r"gru.*kernel has shape \(5, 9\); expected \(4, 9\)"):
        layer.set_weights(weights)


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: numrnn.LSTMCell(4, activation="swish"), ValueError, "activation must be one of .* got 'swish'"),
        (lambda: numrnn.GRUCell(4, recurrent_activation="elu"), ValueError, "recurrent_activation .* 'elu'"),
        (lambda: numrnn.SimpleRNNCell(0), ValueError, "units must be a positive integer; got 0"),
        (lambda: numrnn.LSTMCell(4, dtype="float16"), ValueError, "dtype must be 'float32' or 'float64'"),
        (lambda: numrnn.RNN("lstm"), TypeError, "cell must be .* got str"),
        (lambda: numrnn.RNN([]), ValueError, "at least one cell"),
        (lambda: numrnn.RNN([numrnn.GRUCell(2), numrnn.GRUCell(2, dtype="float64")]), ValueError, "one dtype"),
        (lambda: numrnn.Bidirectional(numrnn.GRUCell(2)), TypeError, "layer must be an RNN layer"),
        (lambda: numrnn.Bidirectional(numrnn.GRU(2), merge_mode="max"), ValueError, "merge_mode .* 'max'"),
        (lambda: numrnn.Bidirectional(numrnn.GRU(3), merge_mode="sum",
                                      backward_layer=numrnn.GRU(4, go_backwards=True)),
         ValueError, "merge_mode='sum' needs layer and backward_layer of equal output sizes; got 3 and 4"),
    ],
)
def test_bad_construction(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_unroll_ceiling_is_stated():
    layer = numrnn.SimpleRNN(2, unroll=True)
    long = np.zeros((1, UNROLL_CEILING + 1, 3), np.float32)
    with pytest.raises(ValueError, match=rf"unroll=True needs at most {UNROLL_CEILING} time steps .* got "
                                         rf"{UNROLL_CEILING + 1}"):
        layer(long)
    with pytest.raises(ValueError, match=f"exceeds the static unroll ceiling of {UNROLL_CEILING}"):
        simple_stack([CellSpec("gru", 2)], 3, unroll=UNROLL_CEILING + 1)


def test_stateful_batch_size_change():
    layer = numrnn.GRU(3, stateful=True)
    layer(X)
    with pytest.raises(ValueError, match="keeps states for batch size 2; got batch size 5"):
        layer(np.zeros((5, 4, 3), np.float32))
    layer.reset_states([np.zeros((5, 3), np.float32)])
    assert layer(np.zeros((5, 4, 3), np.float32)).shape == (5, 3)
    with pytest.raises(ValueError, match="not stateful"):
        numrnn.GRU(3).reset_states()


def test_bad_initial_state(lstm):
    with pytest.raises(ValueError, match=r"initial_state: expected 2 state arrays .* got 1"):
        lstm(X, initial_state=[np.zeros((2, 4), np.float32)])
    with pytest.raises(ValueError, match=r"initial_state\[1\]: expected shape \(2, 4\); got \(3, 4\)"):
        lstm(X, initial_state=[np.zeros((2, 4), np.float32), np.zeros((3, 4), np.float32)])


def test_bad_cell_step():
    cell = numrnn.LSTMCell(3)
    cell.build(2)
    with pytest.raises(ValueError, match=r"states: expected 2 arrays; got 1"):
        cell(np.zeros((1, 2), np.float32), [np.zeros((1, 3), np.float32)])
    with pytest.raises(ValueError, match=r"inputs: expected 2 features; got 4"):
        cell(np.zeros((1, 4), np.float32), cell.get_initial_state(1))
    with pytest.raises(ValueError, match="no weights yet"):
        numrnn.GRUCell(2).get_weights()


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: CellSpec("gru", 4, peephole=True), "peephole is only supported by LSTM"),
        (lambda: CellSpec("lstm", 4, cell_clip=-1.0), "cell_clip must be a positive finite number"),
        (lambda: CellSpec("rnn", 4), "kind must be one of"),
        (lambda: simple_stack([CellSpec("gru", 2)], 3, reverse="valid"), 'needs masking="lengths"'),
        (lambda: StackSpec(blocks=(), input_size=3), "at least one BlockSpec"),
    ],
)
def test_bad_spec(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("name, value, read", [
    ("NUMRNN_NUM_THREADS", "abc", schedule.cores.__wrapped__),  # the cached functions' bodies: read anew
    ("NUMRNN_NUM_THREADS", "0", schedule.cores.__wrapped__),
    ("NUMRNN_PACKED_PRODUCT_ROWS", "-1", schedule.packed_product_rows.__wrapped__),
])
def test_bad_environment_values_name_the_variable(name, value, read, monkeypatch):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=f"{name} must be a whole number of at least .*; got '{value}'"):
        read()


def test_more_rows_than_blas_takes_is_refused_before_any_work():
    # 2**16 steps of 2**15 + 1 rows: one zero broadcast, no memory; BLAS's sizes are 32-bit.
    spec = simple_stack([CellSpec("gru", 2)], 1)
    x = np.lib.stride_tricks.as_strided(np.zeros(1, np.float32), shape=(2**16, 2**15 + 1, 1), strides=(0, 0, 0))
    weights = pack_weights(spec, [{k: np.zeros(s) for k, s in spec.cells[0].weight_shapes(1).items()}])
    with pytest.raises(ValueError, match=r"x: 65536 steps of 32769 rows .* at most 2147483647"):
        get_kernel(spec)(x, None, [np.zeros((2**15 + 1, 2), np.float32)], weights)
