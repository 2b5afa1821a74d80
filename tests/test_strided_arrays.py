"""A kernel's ``x`` and ``out`` of any strides: a facade's batch-major arrays, transposed.

The batch split copies its rows from ``x`` and to the output anyway, so it
takes them as they are (the Keras facade on seed000 had spent 2.3 ms of 40
transposing the output after the call); every other schedule runs on
contiguous copies. Each schedule's result on strided arrays is the
contiguous call's, bit for bit. The specs are ones other tests compile under
the same schedules.
"""

from __future__ import annotations

import numpy as np
import pytest
from test_direction_split import CASES as DIRECTION_CASES
from test_grid import CASES as GRID_CASES
from test_grid import _inputs, _weights
from test_unit_split import CASES as UNIT_CASES

from numrnn.runtime import get_kernel, pack_weights
from numrnn.runtime.kernels import Kernel
from numrnn.runtime.schedule import cores

CALLS = {  # name: (spec, schedule, batch)
    "serial": (GRID_CASES["bidir_concat_stack"], "serial", 4),
    "batch": (GRID_CASES["bidir_concat_stack"], "batch", 5),
    "units": (UNIT_CASES["bidir_ave_two_blocks"], "units", 4),
    "directions": (DIRECTION_CASES["one_block_concat_lengths"], "directions", 4),
    "static unroll": (DIRECTION_CASES["float64_peephole_ave_carry_unrolled"], "serial", 4),
    "last output, batch": (GRID_CASES["lstm_carry_last"], "batch", 4),
    "one row, streaming": (GRID_CASES["stack_lstm_gru_simple_carry"], "auto", 1),
}


@pytest.mark.parametrize("name", sorted(CALLS))
def test_strided_input_and_output_give_the_contiguous_calls_result(name, monkeypatch):
    spec, schedule, batch = CALLS[name]
    rng = np.random.default_rng(sorted(CALLS).index(name))
    weights = pack_weights(spec, _weights(spec, rng))
    x, mask, lengths, initial = _inputs(spec, rng, batch)
    if name == "one row, streaming":  # a fast-path call: one row, up to STREAMING_MAX_STEPS steps
        x, mask = x[:3], mask[:3]
    condition = mask if spec.masking in ("carry", "zero") else lengths
    monkeypatch.setenv("NUMRNN_SCHEDULE", schedule)
    kernel = get_kernel(spec)
    states = [np.array(s) for cell_states in initial for s in cell_states]
    expected = kernel(x, condition, states, weights)  # contiguous; compiles (or loads) the kernels it runs

    contiguous_calls = []
    real = Kernel._call_contiguous
    monkeypatch.setattr(Kernel, "_call_contiguous", lambda *a: contiguous_calls.append(a) or real(*a))
    strided_states = [np.array(s) for cell_states in initial for s in cell_states]
    # batch-major memory, looked at time-major: neither is C-contiguous where the batch has 2 rows or more
    x_batch_major = np.ascontiguousarray(x.transpose(1, 0, 2))
    out = np.empty((batch, expected.shape[0] if expected.ndim == 3 else 1, spec.output_size), spec.dtype)
    got = kernel(x_batch_major.transpose(1, 0, 2), condition, strided_states, weights, out=out.transpose(1, 0, 2))

    np.testing.assert_array_equal(got, expected)
    assert np.shares_memory(got, out)
    for a, b in zip(strided_states, states, strict=True):
        np.testing.assert_array_equal(a, b)
    if schedule == "batch" and batch > 1 and cores() > 1:
        assert contiguous_calls == []  # the batch split took them as they are
    elif batch > 1:
        assert len(contiguous_calls) == 1


def test_a_one_row_call_on_a_strided_input_leaves_the_fast_path():
    # The fast path hands x to numba as it is, whose views take C-contiguous arrays only: a strided one row
    # would fail there with a typing error, so it takes the general path, which copies it.
    spec = GRID_CASES["lstm_carry_last"]
    rng = np.random.default_rng(9)
    weights = pack_weights(spec, _weights(spec, rng))
    kernel = get_kernel(spec)
    every_other = rng.standard_normal((2, 1, 2 * spec.input_size)).astype(np.float32)[:, :, ::2]
    assert not every_other.flags.c_contiguous
    mask = np.ones((2, 1), bool)
    zeros = [np.zeros((1, n), np.float32) for n in spec.cells[0].state_sizes]
    expected = kernel(np.ascontiguousarray(every_other), mask, [z.copy() for z in zeros], weights)
    np.testing.assert_array_equal(kernel(every_other, mask, [z.copy() for z in zeros], weights), expected)
    assert len(kernel.function.signatures) == 1  # no kernel compiled for strided arrays


def test_a_strided_input_alone_is_copied_alone(monkeypatch):
    # Where the output is contiguous (a fresh one, or a caller's), only x is copied: the call writes y itself.
    spec = GRID_CASES["bidir_concat_stack"]
    rng = np.random.default_rng(8)
    weights = pack_weights(spec, _weights(spec, rng))
    x, _, _, initial = _inputs(spec, rng, 4)
    monkeypatch.setenv("NUMRNN_SCHEDULE", "serial")
    kernel = get_kernel(spec)
    states = [np.array(s) for cell_states in initial for s in cell_states]
    expected = kernel(x, None, [s.copy() for s in states], weights)
    out = np.empty_like(expected)
    seen = []
    real = Kernel.__call__
    monkeypatch.setattr(Kernel, "__call__", lambda self, *a, **k: seen.append(k.get("out")) or real(self, *a, **k))
    got = kernel(x.transpose(1, 0, 2).copy().transpose(1, 0, 2), None, states, weights, out=out)
    assert got is out
    assert all(o is out for o in seen)  # the contiguous call wrote into out: no buffer of its own
    np.testing.assert_array_equal(out, expected)


def test_calls_of_the_batch_split_write_each_rows_output_where_out_puts_it():
    # Rows of unequal lengths are dealt longest first, back and forth (index arrays, not ranges): each row's
    # output goes back to its own place of a batch-major output.
    spec = GRID_CASES["bidir_none_valid_lengths"]
    rng = np.random.default_rng(4)
    weights = pack_weights(spec, _weights(spec, rng))
    x, _, lengths, initial = _inputs(spec, rng, 6)
    kernel = get_kernel(spec)
    states = [np.array(s) for cell_states in initial for s in cell_states]
    expected = kernel(x, lengths, [s.copy() for s in states], weights)
    out = np.full((6, x.shape[0], spec.output_size), np.nan, np.float32)
    kernel._run_batch_split(2, x.transpose(1, 0, 2).copy().transpose(1, 0, 2), [lengths], states, weights,
                            out.transpose(1, 0, 2))
    np.testing.assert_array_equal(out.transpose(1, 0, 2), expected)
