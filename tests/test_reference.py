"""Pin the NumPy oracle (tests/reference.py) and the weight converters to the golden fixtures."""

from __future__ import annotations

import numpy as np
import pytest
from golden_fixtures import fixture_names, load_case
from reference import activation, cell_step, run_stack

from codegen.spec import BlockSpec, CellSpec, DirectionSpec, StackSpec, simple_stack
from numrnn.compat.weights import (
    keras_cell_arrays,
    keras_cell_weights,
    tf1_cell_arrays,
    tf1_cell_weights,
    torch_layer_arrays,
    torch_layer_weights,
)

TOLERANCE = 1e-5
NAMES = fixture_names()


def test_all_fixtures_present():
    assert len(NAMES) == 31


@pytest.mark.parametrize("name", NAMES)
def test_reference_matches_golden(name):
    case = load_case(name)
    states = None
    for k, call in enumerate(case.calls):
        init = call.initial_states if call.initial_states is not None else (states if case.stateful else None)
        output, states = run_stack(
            case.spec, case.weights, call.x, mask=call.mask, lengths=call.lengths, initial_states=init
        )
        got = case.flatten(output, states)
        assert len(got) == len(call.expected), (
            f"call {k}: {len(got)} results, fixture has {len(call.expected)}"
        )
        for j, (g, e) in enumerate(zip(got, call.expected)):
            assert g.shape == e.shape, f"call {k} out_{j}: shape {g.shape} != {e.shape}"
            assert g.dtype == e.dtype, f"call {k} out_{j}: dtype {g.dtype} != {e.dtype}"
            err = float(np.max(np.abs(g.astype(np.float64) - e)))
            assert err <= TOLERANCE, f"call {k} out_{j}: max abs error {err:.3g}"


@pytest.mark.parametrize("name", [n for n in NAMES if not n.startswith(("tf1_", "torch_"))])
def test_keras_param_count(name):
    case = load_case(name)
    assert case.params is not None
    assert sum(np.size(a) for w in case.weights for a in w.values()) == case.params


@pytest.mark.parametrize("name", NAMES)
def test_logical_weights_have_spec_shapes(name):
    case = load_case(name)
    for cell, size, w in zip(case.spec.cells, case.spec.input_sizes(), case.weights):
        assert {k: v.shape for k, v in w.items()} == cell.weight_shapes(size)


# -- converters round-trip --------------------------------------------------------------------------


def _random_logical(cell: CellSpec, input_size: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in cell.weight_shapes(input_size).items()}


KERAS_CELLS = [
    CellSpec("simple", 3),
    CellSpec("simple", 3, use_bias=False),
    CellSpec("lstm", 4),
    CellSpec("gru", 5),
    CellSpec("gru", 5, reset_after=False),
    CellSpec("gru", 5, use_bias=False),
]
TF1_CELLS = [
    CellSpec("simple", 3),
    CellSpec("lstm", 4, forget_bias=1.0),
    CellSpec("lstm", 4, peephole=True, cell_clip=3.0, proj_units=2),
    CellSpec("gru", 5, reset_after=False),
]
TORCH_CELLS = [
    CellSpec("simple", 3, activation="relu"),
    CellSpec("lstm", 4),
    CellSpec("lstm", 4, proj_units=2),
    CellSpec("lstm", 4, use_bias=False),
    CellSpec("gru", 5),
]


def _assert_same(a: dict, b: dict):
    assert set(a) == set(b)
    for k, value in a.items():
        np.testing.assert_allclose(value, b[k], rtol=0, atol=1e-6, err_msg=k)


@pytest.mark.parametrize("cell", KERAS_CELLS, ids=str)
def test_keras_round_trip(cell):
    w = _random_logical(cell, 6)
    arrays = keras_cell_arrays(cell, w)
    if cell.has_recurrent_bias:
        assert arrays[2].shape == (2, 3 * cell.units)
    _assert_same(keras_cell_weights(cell, arrays), w)


@pytest.mark.parametrize("cell", TF1_CELLS, ids=str)
def test_tf1_round_trip(cell):
    w = _random_logical(cell, 6)
    arrays = tf1_cell_arrays(cell, w)
    assert arrays[0].shape[0] == 6 + cell.output_size
    _assert_same(tf1_cell_weights(cell, 6, arrays), w)


@pytest.mark.parametrize("cell", TORCH_CELLS, ids=str)
def test_torch_round_trip(cell):
    w = _random_logical(cell, 6)
    if cell.kind != "gru":  # a summed bias comes back whole; start from that form
        _assert_same(torch_layer_weights(cell, **torch_layer_arrays(cell, w)), w)
    arrays = torch_layer_arrays(cell, w)
    assert arrays["weight_ih"].shape == (cell.gates * cell.units, 6)
    _assert_same(torch_layer_weights(cell, **arrays), w)


def test_torch_gru_gate_order():
    cell = CellSpec("gru", 2)
    rows = np.repeat(np.arange(3.0), 2)[:, None]  # blocks r=0, z=1, n=2
    w = torch_layer_weights(cell, rows * np.ones((1, 3)), rows * np.ones((1, 2)), rows[:, 0], rows[:, 0] + 10)
    np.testing.assert_array_equal(w["kernel"][0], [1, 1, 0, 0, 2, 2])  # z, r, h
    np.testing.assert_array_equal(w["recurrent_bias"], [11, 11, 10, 10, 12, 12])


def test_tf1_lstm_gate_order_and_peepholes():
    cell = CellSpec("lstm", 1, peephole=True)
    kernel = np.array([[0.0, 1.0, 2.0, 3.0]] * 2)  # i, j, f, o
    w = tf1_cell_weights(cell, 1, [kernel, kernel[0], [20.0], [10.0], [30.0]])  # w_f, w_i, w_o
    np.testing.assert_array_equal(w["kernel"], [[0, 2, 1, 3]])  # i, f, c, o
    np.testing.assert_array_equal(w["peephole"][:, 0], [10, 20, 30])  # rows i, f, o


@pytest.mark.parametrize(
    "call, match",
    [
        (
            lambda: keras_cell_weights(
                CellSpec("lstm", 4), [np.zeros((3, 16)), np.zeros((4, 12)), np.zeros(16)]
            ),
            r"arrays\[1\] \(recurrent_kernel\)",
        ),
        (
            lambda: keras_cell_weights(
                CellSpec("gru", 4), [np.zeros((3, 12)), np.zeros((4, 12)), np.zeros(12)]
            ),
            r"arrays\[2\] \(bias\)",
        ),
        (lambda: keras_cell_weights(CellSpec("lstm", 4), [np.zeros((3, 16))]), "arrays must hold 3"),
        (
            lambda: tf1_cell_weights(CellSpec("simple", 3), 2, [np.zeros((4, 3)), np.zeros(3)]),
            r"arrays\[0\] \(kernel\)",
        ),
        (lambda: tf1_cell_weights(CellSpec("gru", 3), 2, []), "reset_after"),
        (
            lambda: torch_layer_weights(
                CellSpec("lstm", 2), np.zeros((8, 3)), np.zeros((6, 2)), np.zeros(8), np.zeros(8)
            ),
            "weight_hh",
        ),
        (lambda: torch_layer_weights(CellSpec("lstm", 2), np.zeros((8, 3)), np.zeros((8, 2))), "bias_ih"),
        (lambda: keras_cell_arrays(CellSpec("simple", 2), {"kernel": np.zeros((3, 2))}), "keys"),
    ],
)
def test_converter_errors_name_the_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# -- oracle semantics not covered by fixtures ------------------------------------------------------


def test_activations():
    x = np.array([-4.0, -3.0, 0.0, 1.5, 3.0, 4.0])
    np.testing.assert_allclose(activation("hard_sigmoid", x), [0, 0, 0.5, 0.75, 1, 1])
    np.testing.assert_allclose(activation("sigmoid", [-1000.0, 0.0]), [0.0, 0.5])
    np.testing.assert_array_equal(activation("relu", x), np.maximum(x, 0))
    with pytest.raises(ValueError, match="unknown"):
        activation("gelu", x)


def _random_stack(spec: StackSpec, seed=0):
    return [_random_logical(c, n, seed + i) for i, (c, n) in enumerate(zip(spec.cells, spec.input_sizes()))]


def test_lengths_reverse_valid_equals_per_row_reversal():
    """reverse="valid" = run each row's valid prefix backwards, write outputs back aligned, zeros after."""
    cell = CellSpec("gru", 3)
    spec = StackSpec(
        blocks=(BlockSpec((DirectionSpec((cell,), reverse="valid"),)),), input_size=2, masking="lengths"
    )
    w = _random_stack(spec)
    x = np.random.default_rng(1).standard_normal((5, 3, 2)).astype(np.float32)
    lengths = np.array([5, 2, 0])
    out, states = run_stack(spec, w, x, lengths=lengths)
    forward = simple_stack([cell], 2)
    for b, n in enumerate(lengths):
        ref, ref_states = run_stack(forward, w, x[:n, b : b + 1][::-1])
        np.testing.assert_allclose(out[:n, b], ref[::-1, 0], atol=1e-6)
        np.testing.assert_array_equal(out[n:, b], 0)
        expected_h = ref_states[0][0][0] if n else np.zeros(3)
        np.testing.assert_allclose(states[0][0][b], expected_h, atol=1e-6)


def test_carry_mask_last_output_and_states():
    spec = simple_stack(
        [CellSpec("lstm", 3), CellSpec("simple", 2)], 2, masking="carry", return_sequences=False
    )
    w = _random_stack(spec)
    x = np.random.default_rng(2).standard_normal((4, 2, 2))
    mask = np.array([[1, 0], [1, 1], [0, 1], [0, 0]], bool)
    init = [(np.ones((2, 3)), np.ones((2, 3))), (np.ones((2, 2)),)]
    last, states = run_stack(spec, w, x, mask=mask, initial_states=init)
    seq_spec = simple_stack(spec.cells, 2, masking="carry")
    seq, _ = run_stack(seq_spec, w, x, mask=mask, initial_states=init)
    np.testing.assert_array_equal(seq[0, 1], 0)  # masked first step: zeros, even with an initial state
    np.testing.assert_array_equal(seq[2, 0], seq[1, 0])  # masked steps repeat the previous output
    np.testing.assert_array_equal(seq[3], seq[2])
    np.testing.assert_array_equal(last, seq[-1])
    # only valid steps count: running the valid steps alone gives the same final states
    for b, steps in enumerate([[0, 1], [1, 2]]):
        _, ref = run_stack(
            simple_stack(spec.cells, 2),
            w,
            x[steps, b : b + 1],
            initial_states=[tuple(s[b : b + 1] for s in st) for st in init],
        )
        for got, want in zip(states, ref):
            for g, r in zip(got, want):
                np.testing.assert_allclose(g[b], r[0], atol=1e-6)


MERGED = {
    "concat": lambda a, b: np.concatenate([a, b], -1),
    None: lambda a, b: np.concatenate([a, b], -1),
    "sum": lambda a, b: a + b,
    "mul": lambda a, b: a * b,
    "ave": lambda a, b: (a + b) / 2,
}


@pytest.mark.parametrize("merge", list(MERGED))
def test_merge_modes_and_last_output_of_full_reverse(merge):
    cell = CellSpec("simple", 2)
    x = np.random.default_rng(3).standard_normal((3, 2, 2))
    fw_spec, bw_spec = simple_stack([cell], 2), simple_stack([cell], 2, reverse="full")
    w = _random_stack(fw_spec)
    fw, _ = run_stack(fw_spec, w, x)
    bw, _ = run_stack(bw_spec, w, x)
    np.testing.assert_allclose(bw[::-1], run_stack(fw_spec, w, x[::-1])[0], atol=1e-6)  # stored aligned
    block = BlockSpec((DirectionSpec((cell,)), DirectionSpec((cell,), reverse="full")), merge=merge)
    seq, _ = run_stack(StackSpec(blocks=(block,), input_size=2), w + w, x)
    np.testing.assert_allclose(seq, MERGED[merge](fw, bw), atol=1e-6)
    last, _ = run_stack(StackSpec(blocks=(block,), input_size=2, return_sequences=False), w + w, x)
    # the backward direction's last processing step read input time 0
    np.testing.assert_allclose(last, MERGED[merge](fw[-1], bw[0]), atol=1e-6)


def test_cell_step_lstm_projection_shapes():
    cell = CellSpec("lstm", 4, proj_units=2, peephole=True, cell_clip=0.5)
    w = _random_logical(cell, 3)
    out, (h, c) = cell_step(cell, w, np.ones((5, 3)), (np.zeros((5, 2)), np.zeros((5, 4))))
    assert out.shape == h.shape == (5, 2) and c.shape == (5, 4)
    assert np.all(np.abs(c) <= 0.5)


def test_valid_reverse_equals_full_reverse_under_lengths_masking():
    """With lengths masking, a full-axis backward pass first sees only padding, which leaves the state
    untouched; so reverse="valid" and reverse="full" give the same sequence and final states (only the
    "last output" differs: "valid" ends on a padding step for short rows)."""
    cell = CellSpec("lstm", 3)
    x = np.random.default_rng(4).standard_normal((6, 3, 2))
    lengths = np.array([6, 3, 1])
    init = [(np.full((3, 3), 0.5), np.full((3, 3), -0.5))]
    runs = {}
    for reverse in ("valid", "full"):
        spec = simple_stack([cell], 2, reverse=reverse, masking="lengths")
        runs[reverse] = run_stack(spec, _random_stack(spec), x, lengths=lengths, initial_states=init)
    np.testing.assert_array_equal(runs["valid"][0], runs["full"][0])
    for a, b in zip(runs["valid"][1][0], runs["full"][1][0]):
        np.testing.assert_array_equal(a, b)
