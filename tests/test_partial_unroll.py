"""Partial unroll (``StackSpec.unroll_steps = k``): the spec field, the generated loop, and results against the oracle.

Few distinct specs are compiled on purpose (each costs seconds); every one is
run at several sequence lengths, covering T below k, T a multiple of k and T
with a remainder.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from reference import run_stack
from test_golden_keras import run_fixture

from codegen import generate_source
from codegen.spec import UNROLL_STEPS_CEILING, BlockSpec, CellSpec, DirectionSpec, StackSpec, simple_stack
from numrnn.runtime import get_kernel, pack_weights


def _spec(**kwargs) -> StackSpec:
    return simple_stack([CellSpec("lstm", 5), CellSpec("gru", 4, reset_after=False)], 3, **kwargs)


# -- the spec field -------------------------------------------------------------------------------------
def test_unroll_steps_round_trips_and_keys_the_cache():
    spec = _spec(unroll_steps=3)
    assert StackSpec.from_json(spec.to_json()) == spec
    assert spec.cache_key() != _spec().cache_key()
    assert spec.kernel_name() == "lstm5_gru4_fwd_none_partial3"
    assert _spec().kernel_name() == "lstm5_gru4_fwd_none_dyn"


def test_json_without_unroll_steps_means_the_plain_loop():
    data = json.loads(_spec().to_json())
    del data["unroll_steps"]
    assert StackSpec.from_dict(data) == _spec()


@pytest.mark.parametrize("kwargs, message", [
    ({"unroll_steps": 0}, "unroll_steps must be a positive integer"),
    ({"unroll_steps": True}, "unroll_steps must be a positive integer"),
    ({"unroll_steps": UNROLL_STEPS_CEILING + 1}, "exceeds the partial unroll ceiling"),
    ({"unroll": 8, "unroll_steps": 2}, "exclude each other"),
])
def test_invalid_unroll_steps(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _spec(**kwargs)


def test_generated_loop_holds_k_body_copies_and_a_remainder_loop():
    source = generate_source(_spec(unroll_steps=3))
    assert source.count("for s0 in range(0, T_main, 3):") == 2  # one per layer
    assert source.count("T_main = T - T % 3") == 2
    assert source.count("for s in range(T_main, T):") == 2
    for j in range(3):
        assert source.count(f"# step s0 + {j}") == 2
    # every body copy starts with the recurrent product: 3 unrolled + 1 remainder, per layer
    assert source.count("_dot(h, wh, rh)") == 4
    assert source.count("_dot(h, whzr, rzr)") == 4
    plain = generate_source(_spec())
    assert "T_main" not in plain and plain.count("for s in range(T):") == 2


# -- results against the NumPy oracle ---------------------------------------------------------------------
def _weights(spec: StackSpec, rng) -> list[dict]:
    return [{name: rng.uniform(-0.5, 0.5, shape) for name, shape in cell.weight_shapes(width).items()}
            for cell, width in zip(spec.cells, spec.input_sizes())]


def _check(spec: StackSpec, steps: int, rng, *, mask=None, lengths=None) -> None:
    batch = 3
    x = rng.standard_normal((steps, batch, spec.input_size)).astype(spec.dtype)
    weights = _weights(spec, rng)
    states = [rng.standard_normal((batch, n)).astype(spec.dtype) for c in spec.cells for n in c.state_sizes]
    init, start = [], 0
    for cell in spec.cells:
        init.append(tuple(states[start: start + len(cell.state_sizes)]))
        start += len(cell.state_sizes)
    expected, finals = run_stack(spec, weights, x, mask=mask, lengths=lengths, initial_states=init)
    condition = mask if mask is not None else lengths
    kernel_states = [s.copy() for s in states]
    got = get_kernel(spec)(x, condition, kernel_states, pack_weights(spec, weights))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.concatenate(kernel_states, axis=1),
                               np.concatenate([s for f in finals for s in f], axis=1), rtol=0, atol=1e-5)


def test_stack_with_carry_mask_matches_the_oracle_at_any_length():
    spec = _spec(unroll_steps=3, masking="carry")
    rng = np.random.default_rng(0)
    for steps in (7, 2, 6, 1):
        mask = rng.random((steps, 3)) < 0.7
        _check(spec, steps, rng, mask=mask)
    assert len(get_kernel(spec).function.signatures) == 1  # one compile served every T


def test_bidirectional_valid_reversal_with_lengths_matches_the_oracle():
    directions = (DirectionSpec((CellSpec("simple", 4),)), DirectionSpec((CellSpec("simple", 4),), reverse="valid"))
    spec = StackSpec(blocks=(BlockSpec(directions, merge="concat"),), input_size=2, masking="lengths",
                     return_sequences=False, unroll_steps=2)
    rng = np.random.default_rng(1)
    for steps in (5, 4):
        _check(spec, steps, rng, lengths=np.array([steps, 1, steps - 2], dtype=np.int64))


@pytest.mark.parametrize("name, k", [("mask_holes_backwards", 3), ("bidir_sum_mask", 4),
                                     ("stack_lstm_gru_seed002", 2)])
def test_keras_golden_fixture_through_the_facade(name, k):
    run_fixture(name, unroll=k)


def test_a_static_kernel_refuses_another_length_before_compiling():
    spec = _spec(unroll=4)
    kernel = get_kernel(spec)
    x = np.zeros((5, 2, 3), dtype=np.float32)
    states = [np.zeros((2, n), dtype=np.float32) for c in spec.cells for n in c.state_sizes]
    weights = pack_weights(spec, _weights(spec, np.random.default_rng(2)))
    with pytest.raises(ValueError, match="statically unrolled for 4 time steps; got 5"):
        kernel(x, None, states, weights)
    assert kernel.compile_seconds is None
