"""Bad input gets a ValueError/TypeError naming the argument, the expected and the received."""

from __future__ import annotations

import copy as copy_module
import pickle

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


# -- cells built or set apart from the layer that runs them ------------------------------------------------------
def _built(cell, features):
    cell.build(features)
    return cell


def _same_weights(before, after) -> bool:
    return len(before) == len(after) and all(np.array_equal(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize("wrap", ["bidirectional", "stack", "backward_layer"])
def test_a_first_call_keeps_the_weights_already_set(wrap):
    # Keras builds only the sublayers that have no weights; rebuilding every cell replaced weights set before.
    x = np.random.default_rng(0).random((2, 4, 3)).astype(np.float32)
    if wrap == "bidirectional":
        kept = numrnn.GRU(4)
        kept.build(x.shape)
        layer = numrnn.Bidirectional(kept)
    elif wrap == "stack":
        kept = _built(numrnn.GRUCell(4), 3)
        layer = numrnn.RNN([kept, numrnn.GRUCell(5)])
    else:
        kept = numrnn.GRU(4, go_backwards=True)
        kept.build(x.shape)
        layer = numrnn.Bidirectional(numrnn.GRU(4), backward_layer=kept)
    before = [w.copy() for w in kept.get_weights()]
    layer(x)
    assert _same_weights(before, kept.get_weights())


def test_a_first_call_of_a_multi_rnn_cell_keeps_the_weights_already_set():
    x = np.random.default_rng(0).random((2, 4, 3)).astype(np.float32)
    from numrnn.compat.v1 import nn
    kept = nn.rnn_cell.GRUCell(4)
    kept.build(3)
    before = [w.copy() for w in kept.get_weights()]
    nn.dynamic_rnn(nn.rnn_cell.MultiRNNCell([kept, nn.rnn_cell.GRUCell(5)]), x, dtype=np.float32)
    assert _same_weights(before, kept.get_weights())


@pytest.mark.parametrize("case, words", [
    ("second cell", ["cells[1] (grucell)", "built for 7 input features", "cells[0] gives it 4"]),
    ("one cell twice", ["cells[1] (grucell)", "built for 3 input features", "cells[0] gives it 4"]),
    ("backward layer", ["backward_layer.cells[0]", "built for 6 input features", "the input gives it 3"]),
])
def test_a_cell_built_for_another_width_names_itself(case, words):
    # The kernel read a cell's weights with the width the chain gives it: out of bounds, or garbage.
    if case == "second cell":
        layer = numrnn.RNN([_built(numrnn.GRUCell(4), 3), _built(numrnn.GRUCell(5), 7)])
    elif case == "one cell twice":
        cell = numrnn.GRUCell(4)
        layer = numrnn.RNN([cell, cell])
    else:
        backward = numrnn.GRU(4, go_backwards=True)
        backward.build((2, 4, 6))
        layer = numrnn.Bidirectional(numrnn.GRU(4), backward_layer=backward)
    with pytest.raises(ValueError) as info:
        layer(X)
    for word in words:
        assert word in str(info.value)


def test_a_stack_of_cells_checks_every_cells_width_on_one_step():
    stack = numrnn.StackedRNNCells([_built(numrnn.GRUCell(4), 3), _built(numrnn.GRUCell(5), 1)])
    with pytest.raises(ValueError, match=r"cells\[1\] \(grucell\) was built for 1 input features; cells\[0\] gives"):
        stack(X[:, 0], [np.zeros((2, 4), np.float32), np.zeros((2, 5), np.float32)])


def test_a_multi_rnn_cell_checks_every_cells_width():
    from numrnn.compat.v1 import nn
    top = nn.rnn_cell.GRUCell(5)
    top.build(9)
    cell = nn.rnn_cell.MultiRNNCell([nn.rnn_cell.GRUCell(4), top])
    with pytest.raises(ValueError, match=r"leaves\[1\] \(gru_cell\) was built for 9 input features; leaves\[0\] gives"):
        nn.dynamic_rnn(cell, X, dtype=np.float32)


def test_bidirectional_set_weights_checks_the_backward_kernel_against_the_forward_one():
    forward, backward = numrnn.GRU(4), numrnn.GRU(4, go_backwards=True)
    forward.build(3)
    backward.build(6)
    layer = numrnn.Bidirectional(numrnn.GRU(4))
    with pytest.raises(ValueError, match=r"kernel has shape \(6, 12\); expected \(3, 12\)"):
        layer.set_weights(forward.get_weights() + backward.get_weights())
    assert not layer.built


def test_bidirectional_layers_of_two_dtypes_are_refused():
    with pytest.raises(ValueError, match="share one dtype; got float32 and float64"):
        numrnn.Bidirectional(numrnn.GRU(4), backward_layer=numrnn.GRU(4, go_backwards=True, dtype="float64"))


def test_bidirectional_config_keeps_a_given_backward_layer():
    layer = numrnn.Bidirectional(numrnn.LSTM(3), backward_layer=numrnn.GRU(5, go_backwards=True))
    again = numrnn.Bidirectional.from_config(layer.get_config())
    assert type(again.backward_layer) is numrnn.GRU and again.backward_layer.cells[0].units == 5
    assert "backward_layer" not in numrnn.Bidirectional(numrnn.LSTM(3)).get_config()


@pytest.mark.parametrize("copy", [None, "deepcopy", "pickle"])
@pytest.mark.parametrize("facade", ["keras", "tf1"])
def test_logical_weights_cannot_be_edited_behind_the_pack(facade, copy):
    # An in-place edit left the kernels on the packed old values while get_weights showed the new ones.
    if facade == "keras":
        cell = _built(numrnn.GRUCell(4), 3)
    else:
        from numrnn.compat.v1 import nn
        cell = nn.rnn_cell.GRUCell(4)
        cell.build(3)
    if copy == "deepcopy":
        cell = copy_module.deepcopy(cell)
    elif copy == "pickle":  # the default protocol brings arrays back writeable
        cell = pickle.loads(pickle.dumps(cell))
    weights = cell.logical_weights()
    kernel = next(iter(weights))
    with pytest.raises(ValueError, match="read-only"):
        weights[kernel][...] = 0
    weights[kernel] = np.zeros_like(weights[kernel])  # the dict is the caller's
    assert np.any(cell.logical_weights()[kernel] != 0)


def test_set_weights_takes_any_sequence_of_arrays_but_not_one_array():
    arrays = _built(numrnn.GRUCell(4), 3).get_weights()
    saved = np.empty(len(arrays), object)  # np.save of a get_weights() list loads as this
    saved[:] = arrays
    for weights in (tuple(arrays), saved):
        layer = numrnn.GRU(4)
        layer.set_weights(weights)
        assert _same_weights(arrays, layer.get_weights())
    with pytest.raises(TypeError, match="list of arrays"):
        numrnn.GRU(4).set_weights(arrays[0])


def test_set_weights_keeps_its_own_copy():
    cell = numrnn.GRUCell(4)
    arrays = _built(numrnn.GRUCell(4), 3).get_weights()
    cell.set_weights(arrays)
    arrays[0][...] = 0
    assert np.any(cell.get_weights()[0] != 0)


@pytest.mark.parametrize("call, error, words", [
    (lambda: numrnn.GRU(4).set_weights(None), TypeError, ["GRU.set_weights", "list of arrays", "NoneType"]),
    (lambda: numrnn.GRUCell(4).set_weights(None), TypeError, ["GRUCell.set_weights", "list of arrays"]),
    (lambda: numrnn.GRU(4).build((None, None, None)), ValueError, ["GRU.build", "feature size", "None"]),
    (lambda: numrnn.GRUCell(4).build(None), ValueError, ["GRUCell.build", "input_shape", "None"]),
    (lambda: numrnn.GRUCell(4).get_initial_state(-1), ValueError, ["get_initial_state", "batch_size", "-1"]),
    (lambda: numrnn.GRU(4).set_weights([np.zeros((0, 12)), np.zeros((4, 12)), np.zeros((2, 12))]), ValueError,
     ["kernel has shape (0, 12)", "a row per input feature"]),
    (lambda: numrnn.GRU(4, stateful=True).reset_states([np.zeros(4)]), ValueError,
     ["reset_states: states[0]", "(batch, 4)", "(4,)"]),
    (lambda: numrnn.GRU(4)(X, initial_state=[np.zeros((3, 4))]), ValueError, ["GRU: initial_state[0]", "(2, 4)"]),
    (lambda: numrnn.compat.v1.nn.rnn_cell.LSTMCell(4, forget_bias="a"), ValueError, ["forget_bias", "'a'"]),
    (lambda: numrnn.compat.v1.nn.rnn_cell.LSTMCell(4, cell_clip="a"), ValueError, ["cell_clip", "'a'"]),
    (lambda: numrnn.compat.v1.nn.rnn_cell.LSTMCell(4, forget_bias=True), ValueError, ["forget_bias", "True"]),
    (lambda: numrnn.compat.torch.nn.GRU(2, 4)(np.zeros((0, 2))), ValueError, ["input", "(0, 2)"]),
    (lambda: numrnn.compat.torch.nn.GRU(3, 4, batch_first=True)(X, lengths=np.array([1e300, 2.0])), ValueError,
     ["lengths", "1e+300"]),
], ids=["layer-weights-none", "cell-weights-none", "build-none", "cell-build-none", "negative-batch",
        "zero-row-kernel", "reset-states-1d", "initial-state-owner", "forget-bias", "cell-clip", "forget-bias-bool",
        "torch-unbatched-empty", "huge-float-length"])
def test_odd_arguments_name_themselves(call, error, words):
    with pytest.raises(error) as info:
        call()
    for word in words:
        assert word in str(info.value)


def test_tf1_forget_bias_takes_what_float_takes():
    from numrnn.compat.v1 import nn
    assert nn.rnn_cell.LSTMCell(4, forget_bias=np.array(0.5)).forget_bias == 0.5


def test_a_failed_first_call_builds_nothing_around_the_cell_at_fault():
    backward = numrnn.GRU(4, go_backwards=True)
    backward.build((2, 4, 6))
    forward = numrnn.GRU(4)
    with pytest.raises(ValueError, match="backward_layer.cells"):
        numrnn.Bidirectional(forward, backward_layer=backward)(X)
    assert not forward.built
