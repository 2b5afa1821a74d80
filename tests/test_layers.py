"""The Keras-style facade: structures, cells, stacking, state handling, config, float64."""

from __future__ import annotations

import numpy as np

import numrnn

RNG = np.random.default_rng(7)
X = RNG.standard_normal((3, 5, 2)).astype(np.float32)


def seed000_stack(units=120):
    """Seed 000: three GRU cells of ``units`` on 2 features."""
    return [numrnn.GRUCell(units) for _ in range(3)]


def test_stack_list_and_stacked_cells_are_the_same_layer():
    as_list = numrnn.RNN(seed000_stack(), return_sequences=True)
    stacked = numrnn.RNN(numrnn.StackedRNNCells(seed000_stack()), return_sequences=True)
    as_list.build((None, None, 2))
    stacked.build((None, None, 2))
    assert as_list.count_params() == stacked.count_params() == 218_880
    stacked.set_weights(as_list.get_weights())
    small = RNG.standard_normal((2, 4, 2)).astype(np.float32)
    np.testing.assert_array_equal(as_list(small), stacked(small))


def test_return_state_structures_follow_keras():
    single_lstm = numrnn.RNN(numrnn.LSTMCell(4), return_state=True)
    out, h, c = single_lstm(X)
    assert out.shape == h.shape == c.shape == (3, 4)
    np.testing.assert_array_equal(out, h)

    single_gru = numrnn.GRU(3, return_state=True)
    out, h = single_gru(X)
    np.testing.assert_array_equal(out, h)

    stack = numrnn.RNN([numrnn.LSTMCell(4), numrnn.GRUCell(3)], return_sequences=True, return_state=True)
    out, lstm_states, gru_states = stack(X)
    assert out.shape == (3, 5, 3)
    assert [s.shape for s in lstm_states] == [(3, 4), (3, 4)]
    assert [s.shape for s in gru_states] == [(3, 3)]
    np.testing.assert_array_equal(out[:, -1], gru_states[0])


def test_bidirectional_structures_and_merges():
    forward = numrnn.LSTM(3, return_sequences=True, return_state=True)
    layer = numrnn.Bidirectional(forward, merge_mode=None)
    fw, bw, fh, fc, bh, bc = layer(X)
    assert fw.shape == bw.shape == (3, 5, 3)
    np.testing.assert_array_equal(fw[:, -1], fh)
    np.testing.assert_array_equal(bw[:, 0], bh)  # backward output realigned with the input time axis
    weights = layer.get_weights()
    for mode, combine in {"concat": lambda a, b: np.concatenate([a, b], -1), "sum": np.add,
                          "mul": np.multiply, "ave": lambda a, b: (a + b) / 2}.items():
        merged = numrnn.Bidirectional(numrnn.LSTM(3, return_sequences=True), merge_mode=mode)
        merged.set_weights(weights)
        np.testing.assert_allclose(merged(X), combine(fw, bw), rtol=0, atol=1e-6)


def test_cell_steps_reproduce_the_layer():
    cell = numrnn.LSTMCell(4)
    layer = numrnn.RNN(cell, return_sequences=True)
    sequence = layer(X)
    states = cell.get_initial_state(3)
    for t in range(X.shape[1]):
        output, states = cell(X[:, t], states)
        np.testing.assert_allclose(output, sequence[:, t], rtol=0, atol=1e-6)
    assert isinstance(states, list) and len(states) == 2


def test_one_state_cell_keeps_the_state_form():
    cell = numrnn.GRUCell(3)
    cell.build(2)
    h = np.zeros((3, 3), np.float32)
    output, new_state = cell(X[:, 0], h)
    assert isinstance(new_state, np.ndarray)
    np.testing.assert_array_equal(output, new_state)
    _, new_states = cell(X[:, 0], [h])
    assert isinstance(new_states, list)


def test_go_backwards_returns_processing_order():
    forward = numrnn.SimpleRNN(3, return_sequences=True)
    backward = numrnn.SimpleRNN(3, return_sequences=True, go_backwards=True)
    forward.build(X.shape)
    backward.set_weights(forward.get_weights())
    np.testing.assert_allclose(backward(X), forward(X[:, ::-1]), rtol=0, atol=1e-6)


def test_time_major_matches_batch_major():
    batch_major = numrnn.GRU(4, return_sequences=True)
    time_major = numrnn.GRU(4, return_sequences=True, time_major=True)
    batch_major.build(X.shape)
    time_major.set_weights(batch_major.get_weights())
    np.testing.assert_array_equal(time_major(X.transpose(1, 0, 2)), batch_major(X).transpose(1, 0, 2))


def test_initial_state_nested_or_flat():
    layer = numrnn.RNN([numrnn.LSTMCell(4), numrnn.GRUCell(3)], return_state=True)
    h0, c0, g0 = (RNG.standard_normal((3, n)).astype(np.float32) for n in (4, 4, 3))
    nested = layer(X, initial_state=[[h0, c0], [g0]])
    flat = layer(X, initial_state=[h0, c0, g0])
    zero = layer(X)
    np.testing.assert_array_equal(nested[0], flat[0])
    assert not np.allclose(nested[0], zero[0])


def test_a_stack_hands_back_a_state_bare_where_its_initial_state_was():
    # Keras's StackedRNNCells: a one-state cell given its state bare (not in a list) returns it bare.
    layer = numrnn.RNN([numrnn.SimpleRNNCell(3), numrnn.LSTMCell(4), numrnn.GRUCell(2)], return_state=True)
    h1, h2, c2, h3 = (RNG.standard_normal((3, n)).astype(np.float32) for n in (3, 4, 4, 2))
    _, bare1, lstm, bare3 = layer(X, initial_state=[h1, [h2, c2], h3])
    _, listed1, _, listed3 = layer(X, initial_state=[[h1], [h2, c2], [h3]])
    assert isinstance(bare1, np.ndarray) and isinstance(bare3, np.ndarray) and len(lstm) == 2
    assert len(listed1) == len(listed3) == 1
    np.testing.assert_array_equal(bare1, listed1[0])
    np.testing.assert_array_equal(bare3, listed3[0])

    # Bidirectional gives each direction half of a flat list, so both halves come back bare.
    bidir = numrnn.Bidirectional(numrnn.RNN([numrnn.SimpleRNNCell(3), numrnn.GRUCell(2)], return_state=True))
    given = [h1, h3, 2 * h1, 2 * h3]
    _, *states = bidir(X, initial_state=given)
    assert [s.shape for s in states] == [(3, 3), (3, 2), (3, 3), (3, 2)]
    _, *default = bidir(X)
    assert [len(s) for s in default] == [1, 1, 1, 1]


def test_keras_training_argument_is_accepted_and_changes_nothing():
    layer = numrnn.GRU(3)
    np.testing.assert_array_equal(layer(X, training=True), layer(X, training=False))
    cell, stack = numrnn.LSTMCell(4), numrnn.StackedRNNCells([numrnn.GRUCell(3)])
    states = cell.get_initial_state(3)
    np.testing.assert_array_equal(cell(X[:, 0], states, training=True)[0], cell(X[:, 0], states)[0])
    np.testing.assert_array_equal(stack(X[:, 0], [np.zeros((3, 3), np.float32)], training=True)[0],
                                  stack(X[:, 0], [np.zeros((3, 3), np.float32)])[0])


def test_stateful_stack_carries_and_resets():
    stateful = numrnn.RNN([numrnn.LSTMCell(4), numrnn.GRUCell(3)], return_sequences=True, stateful=True)
    plain = numrnn.RNN([numrnn.LSTMCell(4), numrnn.GRUCell(3)], return_sequences=True)
    stateful.build(X.shape)
    plain.set_weights(stateful.get_weights())
    whole = plain(X)
    np.testing.assert_allclose(stateful(X[:, :2]), whole[:, :2], rtol=0, atol=1e-6)
    np.testing.assert_allclose(stateful(X[:, 2:]), whole[:, 2:], rtol=0, atol=1e-6)
    stateful.reset_states()  # Keras 3 itself crashes here for stacked cells
    assert all(not s.any() for s in stateful.states)
    np.testing.assert_allclose(stateful(X), whole, rtol=0, atol=1e-6)
    given = [np.ones((3, n), np.float32) for n in (4, 4, 3)]
    stateful.reset_states([[given[0], given[1]], [given[2]]])
    np.testing.assert_allclose(stateful(X), plain(X, initial_state=given), rtol=0, atol=1e-6)


def test_float64_layer_computes_in_float64():
    layer = numrnn.LSTM(4, return_sequences=True, dtype="float64")
    out = layer(X)
    assert out.dtype == np.float64
    as32 = numrnn.LSTM(4, return_sequences=True)
    as32.set_weights(layer.get_weights())
    np.testing.assert_allclose(as32(X), out, rtol=0, atol=1e-5)


def test_a_float64_layer_reads_float64_input_on_the_call_that_builds_it():
    x = np.random.default_rng(0).standard_normal((2, 5, 3))  # float64 values that float32 would round
    layer = numrnn.GRU(4, return_sequences=True, dtype="float64")
    built_by_the_call = layer(x)
    np.testing.assert_array_equal(built_by_the_call, layer(x))


def test_mask_carry_and_zero_output():
    mask = np.ones((3, 5), bool)
    mask[0, 3:] = False
    carry = numrnn.GRU(3, return_sequences=True)
    zero = numrnn.GRU(3, return_sequences=True, zero_output_for_mask=True)
    carry.build(X.shape)
    zero.set_weights(carry.get_weights())
    c, z = carry(X, mask=mask), zero(X, mask=mask)
    np.testing.assert_array_equal(c[0, 3], c[0, 2])
    np.testing.assert_array_equal(c[0, 4], c[0, 2])
    assert not z[0, 3:].any()
    np.testing.assert_array_equal(c[1:], z[1:])


def test_config_round_trip():
    layers = [
        numrnn.RNN([numrnn.LSTMCell(4, recurrent_activation="hard_sigmoid"), numrnn.GRUCell(3, reset_after=False)],
                   return_sequences=True, go_backwards=True, zero_output_for_mask=True),
        numrnn.LSTM(5, activation="relu", return_state=True, unroll=True),
        numrnn.Bidirectional(numrnn.GRU(2, use_bias=False, return_sequences=True), merge_mode="ave"),
    ]
    for layer in layers:
        clone = type(layer).from_config(layer.get_config())
        assert clone.get_config() == layer.get_config()
        layer.build(X.shape)
        clone.set_weights(layer.get_weights())
        np.testing.assert_array_equal(np.asarray(clone(X)[0]), np.asarray(layer(X)[0]))


def test_source_is_the_generated_kernel():
    layer = numrnn.RNN(seed000_stack(8), return_sequences=True)
    layer.build((None, None, 2))
    source = layer.source()
    assert "def gru8x3_fwd_none_dyn(" in source
    assert source.count("def _layer0_gru8(") == 1  # one function for the three equal layers
    assert source.count("_layer0_gru8(_view(xw, 0, (T, B, 24))") == 3
    compile(source, "<kernel>", "exec")


def test_stacked_cells_step_like_the_layer():
    stack = numrnn.StackedRNNCells([numrnn.LSTMCell(4), numrnn.GRUCell(3)])
    layer = numrnn.RNN(stack, return_sequences=True)
    sequence = layer(X)
    states = stack.get_initial_state(3)
    for t in range(X.shape[1]):
        output, states = stack(X[:, t], states)
        np.testing.assert_allclose(output, sequence[:, t], rtol=0, atol=1e-6)
    assert [len(s) for s in states] == [2, 1]
