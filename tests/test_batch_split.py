"""The batch split deals rows of unequal length so that its workers get about as many steps, and stays exact.

A masked call's rows end at their lengths (or run as long as their masks
say), and a worker's time is about its row-steps, so the workers'
rows are dealt longest first, back and forth
(:func:`numrnn.runtime.schedule.worker_rows`); each worker takes its rows as
copies and writes outputs and states back to where they came from. The
calls here run the grid's kernels (no compile of their own) on two and three
workers, with rows of every length, and compare outputs and states with the
oracle.
"""

from __future__ import annotations

import numpy as np
import pytest
from reference import run_stack
from test_grid import CASES, D, T, _weights, assert_matches_reference

from numrnn.runtime import get_kernel, kernels, pack_weights
from numrnn.runtime.schedule import worker_rows

#: Lengths as PyTorch packs them (descending), those of bidir_masked.
BENCH_LENGTHS = np.array([100, 89, 86, 86, 86, 78, 73, 50])


def test_rows_of_equal_steps_split_into_even_ranges():
    assert worker_rows(7, 2) == [slice(0, 3), slice(3, 7)]
    assert worker_rows(6, 3, np.full(6, 5)) == [slice(0, 2), slice(2, 4), slice(4, 6)]


def test_rows_are_dealt_longest_first_back_and_forth():
    first, second = worker_rows(8, 2, BENCH_LENGTHS)
    assert first.tolist() == [0, 3, 4, 7] and second.tolist() == [1, 2, 5, 6]
    assert (BENCH_LENGTHS[first].sum(), BENCH_LENGTHS[second].sum()) == (322, 326)  # sorted halves: 361, 287


@pytest.mark.parametrize("workers", [2, 3, 4])
def test_dealt_rows_cover_every_row_once_longest_first(workers):
    steps = np.random.default_rng(workers).integers(0, 60, 11)
    dealt = worker_rows(11, workers, steps)
    assert sorted(np.concatenate(dealt).tolist()) == list(range(11))
    assert max(map(len, dealt)) - min(map(len, dealt)) <= 1
    for rows in dealt:
        assert np.all(np.diff(steps[rows]) <= 0)  # a step's live rows come first
    loads = [steps[rows].sum() for rows in dealt]
    assert max(loads) - min(loads) <= steps.max()


def _unequal_rows(spec, rng, batch: int):
    """Inputs whose rows run for different numbers of steps (none to all), and random initial states."""
    x = rng.standard_normal((T, batch, D)).astype(spec.dtype)
    mask = lengths = None
    if spec.masking == "lengths":
        lengths = np.array([2, T, 0, 5, 1, T, 3][:batch], dtype=np.int64)
    else:
        mask = rng.random((T, batch)) < np.linspace(0.1, 1.0, batch)
        mask[:, 2] = False
    initial = [tuple(rng.standard_normal((batch, n)).astype(spec.dtype) for n in c.state_sizes) for c in spec.cells]
    return x, mask, lengths, initial


@pytest.mark.parametrize("workers", [2, 3])
@pytest.mark.parametrize("name", ["lstm_tf1_variants_lengths", "stack_lstm_gru_simple_carry",
                                  "bidir_none_valid_lengths", "gru_after_zero_backwards", "float64_bidir_lengths",
                                  "simple_linear_lengths_last", "lstm_carry_last"])
def test_batch_split_of_unequal_rows_matches_reference(name, workers):
    spec, batch = CASES[name], 7
    rng = np.random.default_rng(workers)
    weights = _weights(spec, rng)
    x, mask, lengths, initial = _unequal_rows(spec, rng, batch)
    expected, expected_states = run_stack(spec, weights, x, mask=mask, lengths=lengths, initial_states=initial)
    condition = mask if lengths is None else lengths
    assert not isinstance(worker_rows(batch, workers, kernels._steps_per_row([condition], T))[0], slice)
    states = [np.array(s) for cell_states in initial for s in cell_states]
    y = np.empty((T if spec.return_sequences else 1, batch, spec.output_size), spec.dtype)
    get_kernel(spec)._run_batch_split(workers, x, [condition], states, pack_weights(spec, weights), y)
    grouped, i = [], 0
    for cell in spec.cells:
        grouped.append(tuple(states[i: i + len(cell.state_names)]))
        i += len(cell.state_names)
    assert_matches_reference(spec, y if spec.return_sequences else y[0], grouped, expected, expected_states)
