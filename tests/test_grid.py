"""Every generated kernel against the NumPy oracle: dynamic loop and static unroll, over a grid of specs.

The grid covers each cell kind and option, each activation, each masking mode,
each reversal, stacks, every bidirectional merge, multi-block stacks, both
output modes and both dtypes. Cases are chosen to cover the combinations, not
the whole product: each case costs two compiles.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from reference import run_stack

from codegen.spec import BlockSpec, CellSpec, DirectionSpec, StackSpec, simple_stack
from numrnn.runtime import get_kernel, pack_weights

T, B, D = 7, 4, 3


def _bidir(cells, merge, *, reverse="full", blocks=1, **kwargs) -> StackSpec:
    block = BlockSpec((DirectionSpec(tuple(cells)), DirectionSpec(tuple(cells), reverse)), merge)
    return StackSpec(blocks=(block,) * blocks, input_size=D, **kwargs)


def _torch_style(cell, layers, **kwargs) -> StackSpec:
    block = BlockSpec((DirectionSpec((cell,)), DirectionSpec((cell,), "valid")), "concat")
    first = StackSpec(blocks=(block,), input_size=D, **kwargs)
    return dataclasses.replace(first, blocks=(block,) * layers)


LSTM_TF1 = CellSpec("lstm", 5, peephole=True, cell_clip=0.8, proj_units=3, forget_bias=1.0)

CASES = {
    "simple_tanh_seq": simple_stack([CellSpec("simple", 5)], D),
    "simple_relu_nobias_carry_backwards": simple_stack(
        [CellSpec("simple", 5, activation="relu", use_bias=False)], D, masking="carry", reverse="full"
    ),
    "simple_linear_lengths_last": simple_stack(
        [CellSpec("simple", 4, activation="linear")], D, masking="lengths", return_sequences=False
    ),
    "lstm_carry_last": simple_stack([CellSpec("lstm", 6)], D, masking="carry", return_sequences=False),
    "lstm_hardsigmoid_linear_zero": simple_stack(
        [CellSpec("lstm", 4, activation="linear", recurrent_activation="hard_sigmoid")], D, masking="zero"
    ),
    "lstm_relu_nobias_backwards_last": simple_stack(
        [CellSpec("lstm", 4, activation="relu", use_bias=False)], D, reverse="full", return_sequences=False
    ),
    "lstm_tf1_variants_lengths": simple_stack([LSTM_TF1], D, masking="lengths"),
    "lstm_tf1_variants_valid_reverse": simple_stack([LSTM_TF1], D, masking="lengths", reverse="valid"),
    "gru_after_zero_backwards": simple_stack([CellSpec("gru", 5)], D, masking="zero", reverse="full"),
    "gru_before_carry": simple_stack([CellSpec("gru", 5, reset_after=False)], D, masking="carry"),
    "gru_nobias_tanh_sigmoid_swapped": simple_stack(
        [CellSpec("gru", 4, activation="sigmoid", recurrent_activation="tanh", use_bias=False)], D
    ),
    "stack_lstm_gru_simple_carry": simple_stack(
        [CellSpec("lstm", 5), CellSpec("gru", 4, reset_after=False), CellSpec("simple", 3)], D, masking="carry"
    ),
    "stack_gru_lstm_last_backwards_zero": simple_stack(
        [CellSpec("gru", 4), CellSpec("lstm", 3)], D, masking="zero", reverse="full", return_sequences=False
    ),
    "bidir_concat_stack": _bidir([CellSpec("lstm", 4), CellSpec("gru", 3)], "concat"),
    "bidir_sum_zero": _bidir([CellSpec("gru", 4)], "sum", masking="zero"),
    "bidir_mul_carry_last": _bidir([CellSpec("simple", 4)], "mul", masking="carry", return_sequences=False),
    "bidir_ave_last": _bidir([CellSpec("lstm", 3)], "ave", return_sequences=False),
    "bidir_none_valid_lengths": _bidir([CellSpec("lstm", 4)], None, reverse="valid", masking="lengths"),
    "torch_style_two_blocks_proj": _torch_style(CellSpec("lstm", 5, proj_units=3), 2, masking="lengths"),
    "torch_style_three_blocks_gru": _torch_style(CellSpec("gru", 4), 3, masking="lengths"),
    "float64_stack_carry": simple_stack(
        [CellSpec("lstm", 4), CellSpec("gru", 3)], D, masking="carry", dtype="float64"
    ),
    "float64_bidir_lengths": _bidir([CellSpec("gru", 3, reset_after=False)], "concat", reverse="valid",
                                    masking="lengths", dtype="float64"),
}


def _weights(spec: StackSpec, rng) -> list[dict]:
    # Scaled so that activations see moderate values (no saturation hiding errors).
    return [
        {k: (0.5 * rng.standard_normal(s)).astype(spec.dtype) for k, s in cell.weight_shapes(n).items()}
        for cell, n in zip(spec.cells, spec.input_sizes())
    ]


def fan_in_weights(spec: StackSpec, rng) -> list[dict]:
    """Weights scaled by 1 / sqrt(fan-in): at :func:`_weights`' scale a hundred or more units saturate every gate,
    and float32 sums of that size drift past the oracle's 1e-5."""
    return [{k: (rng.standard_normal(s) / np.sqrt(s[0])).astype(spec.dtype) for k, s in cell.weight_shapes(n).items()}
            for cell, n in zip(spec.cells, spec.input_sizes())]


def assert_bit_equal(got, got_states, expected, expected_states) -> None:
    """Outputs and per-cell states identical to the bit."""
    np.testing.assert_array_equal(got, expected)
    for got_cell, expected_cell in zip(got_states, expected_states, strict=True):
        for g, e in zip(got_cell, expected_cell, strict=True):
            np.testing.assert_array_equal(g, e)


def _inputs(spec: StackSpec, rng, batch: int = B):
    x = rng.standard_normal((T, batch, D)).astype(spec.dtype)
    mask = lengths = None
    if spec.masking in ("carry", "zero"):
        mask = rng.random((T, batch)) > 0.3
        mask[:2, 0] = False  # leading masked steps: outputs before the first valid step
        mask[:, 1:2] = True
    if spec.masking == "lengths":
        lengths = np.resize(np.array([T, 0, 3, 1], dtype=np.int64), batch)  # the pattern repeated past four rows
    initial = [tuple(rng.standard_normal((batch, n)).astype(spec.dtype) for n in c.state_sizes) for c in spec.cells]
    return x, mask, lengths, initial


def _run_kernel(spec, weights, x, mask, lengths, initial):
    states = [np.array(s) for cell_states in initial for s in cell_states]
    condition = mask if spec.masking in ("carry", "zero") else lengths
    output = get_kernel(spec)(x, condition, states, pack_weights(spec, weights))
    grouped, i = [], 0
    for cell in spec.cells:
        grouped.append(tuple(states[i: i + len(cell.state_names)]))
        i += len(cell.state_names)
    return output, grouped


@pytest.mark.parametrize("unrolled", [False, True], ids=["dynamic", "unrolled"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_kernel_matches_reference(name, unrolled):
    spec = CASES[name]
    if unrolled:
        spec = dataclasses.replace(spec, unroll=T)
    rng = np.random.default_rng(sorted(CASES).index(name))
    weights = _weights(spec, rng)
    x, mask, lengths, initial = _inputs(spec, rng)
    expected, expected_states = run_stack(spec, weights, x, mask=mask, lengths=lengths, initial_states=initial)
    got, got_states = _run_kernel(spec, weights, x, mask, lengths, initial)
    assert_matches_reference(spec, got, got_states, expected, expected_states)


def assert_matches_reference(spec, got, got_states, expected, expected_states) -> None:
    """A kernel's output and per-cell states equal the oracle's (1e-5 in float32, 1e-12 in float64)."""
    atol = 1e-5 if spec.dtype == "float32" else 1e-12
    assert got.dtype == np.dtype(spec.dtype)
    np.testing.assert_allclose(got, expected, rtol=0, atol=atol)
    assert len(got_states) == len(expected_states)
    for got_cell, expected_cell in zip(got_states, expected_states):
        assert len(got_cell) == len(expected_cell)
        for g, e in zip(got_cell, expected_cell):
            np.testing.assert_allclose(g, e, rtol=0, atol=atol)


def test_dynamic_kernel_serves_every_length_with_one_compile():
    spec = CASES["stack_lstm_gru_simple_carry"]
    kernel = get_kernel(spec)
    rng = np.random.default_rng(1)
    weights = _weights(spec, rng)
    for steps in (1, 5, 12):
        x = rng.standard_normal((steps, B, D)).astype(np.float32)
        mask = np.ones((steps, B), dtype=bool)
        expected, _ = run_stack(spec, weights, x, mask=mask)
        got, _ = _run_kernel(spec, weights, x, mask, None, [tuple(np.zeros((B, n), np.float32) for n in
                                                                   c.state_sizes) for c in spec.cells])
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    assert get_kernel(spec) is kernel
    assert len(kernel.function.signatures) == 1


def assert_forced_schedule_matches_reference(spec, seed, batch, monkeypatch, schedule, split_spec,
                                             inputs=_inputs) -> None:
    """Run ``spec`` under ``NUMRNN_SCHEDULE=schedule``, check that ``split_spec``'s kernel ran, compare with the oracle.

    ``seed`` draws the weights, then ``inputs(spec, rng, batch)`` the inputs
    and initial states; ``split_spec`` ``None`` checks no split kernel.
    """
    rng = np.random.default_rng(seed)
    weights = _weights(spec, rng)
    x, mask, lengths, initial = inputs(spec, rng, batch)
    expected, expected_states = run_stack(spec, weights, x, mask=mask, lengths=lengths, initial_states=initial)
    monkeypatch.setenv("NUMRNN_SCHEDULE", schedule)
    got, got_states = _run_kernel(spec, weights, x, mask, lengths, initial)
    if split_spec is not None:
        assert get_kernel(split_spec).compile_seconds is not None  # it really ran split
    assert_matches_reference(spec, got, got_states, expected, expected_states)


@pytest.mark.parametrize("name", ["stack_lstm_gru_simple_carry", "lstm_carry_last", "lstm_tf1_variants_lengths",
                                  "simple_tanh_seq", "gru_nobias_tanh_sigmoid_swapped",
                                  "float64_stack_carry"])
def test_one_row_calls_of_a_few_steps_carry_their_states_like_one_long_call(name, monkeypatch):
    # Streaming: after the first call, one-row calls of up to STREAMING_MAX_STEPS steps take the kernel's fast
    # path (no scheduler, no checks that cannot fail there). Chunks of 1-4 steps, states carried in place,
    # read as one call of all the steps; the scheduler must not be asked.
    spec = CASES[name]
    rng = np.random.default_rng(5)
    weights = _weights(spec, rng)
    chunks = (1, 3, 2, 4, 1)
    initial = [tuple(rng.standard_normal((1, n)).astype(spec.dtype) for n in c.state_sizes) for c in spec.cells]
    x = rng.standard_normal((sum(chunks), 1, D)).astype(spec.dtype)
    mask = None
    if spec.masking in ("carry", "zero"):
        mask = rng.random((sum(chunks), 1)) > 0.3
        # A call starts its carried output from zeros, as a Keras call does: each chunk's first step is valid.
        mask[np.cumsum((0,) + chunks[:-1])] = True
    full = np.full(1, sum(chunks), dtype=np.int64) if spec.masking == "lengths" else None
    expected, expected_states = run_stack(spec, weights, x, mask=mask, lengths=full, initial_states=initial)
    kernel, packed = get_kernel(spec), pack_weights(spec, weights)
    states = [np.array(s) for cell_states in initial for s in cell_states]
    outputs, start = [], 0
    for n, steps in enumerate(chunks):
        if n == 1:  # compiled by now: the scheduler is not asked again
            monkeypatch.setattr(kernel, "_scheduler", None)
        condition = (mask[start:start + steps] if mask is not None
                     else np.full(1, steps, dtype=np.int64) if full is not None else None)
        chunk = np.ascontiguousarray(x[start:start + steps])
        if n == 3:  # into a buffer of the caller's
            out = np.empty((steps if spec.return_sequences else 1, 1, spec.output_size), spec.dtype)
            outputs.append(kernel(chunk, condition, states, packed, out=out))
            assert np.shares_memory(outputs[-1], out)
        else:
            outputs.append(kernel(chunk, condition, states, packed))
        start += steps
    assert kernel._stream_shapes is not None  # set once compiled: the fast path ran
    grouped = [tuple(states[i:i + len(c.state_names)]) for i, c in
               zip(np.cumsum([0] + [len(c.state_names) for c in spec.cells]), spec.cells)]
    if spec.return_sequences:
        got = np.concatenate(outputs)
    else:  # the last chunk's output: the last step's (carried over masked steps, as one call would)
        got = outputs[-1]
    assert_matches_reference(spec, got, grouped, expected, expected_states)


def test_a_static_kernel_refuses_another_length_on_one_row_after_its_first_call():
    spec = dataclasses.replace(CASES["lstm_carry_last"], unroll=T)
    rng = np.random.default_rng(2)
    weights = _weights(spec, rng)
    x, mask, _, initial = _inputs(spec, rng, batch=1)
    got, _ = _run_kernel(spec, weights, x, mask, None, initial)
    assert got.shape == (1, spec.output_size)
    with pytest.raises(ValueError, match=f"statically unrolled for {T} time steps; got 2"):
        _run_kernel(spec, weights, x[:2], mask[:2], None, initial)
