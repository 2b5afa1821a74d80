"""The direction split (a bidirectional call on two threads, one per direction) against the NumPy oracle.

The split runs the unsplit kernel's layer functions, so the cases cover what
the split itself adds: both reversals, each merge (between blocks it needs a
second barrier; on the last block with the last output only, one of the two
workers has no time row to merge), one block whose concatenation needs no
shared buffer, a chain of cells in each direction, each masking mode, a
static unroll and both dtypes. Each case runs at one row, four and seven
(on two cores the automatic schedule takes the split beyond four rows),
forced through ``NUMRNN_SCHEDULE=directions``. One compile per case.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from test_grid import D, T, _bidir, _inputs, _torch_style, _weights, assert_forced_schedule_matches_reference

from codegen.spec import BlockSpec, CellSpec, DirectionSpec, StackSpec, simple_stack
from numrnn.runtime import get_kernel, pack_weights, schedule

CASES = {
    "torch_packed_projection_two_blocks": _torch_style(CellSpec("lstm", 5, proj_units=3), 2, masking="lengths"),
    "gru_before_simple_chain_sum_zero_last": _bidir(
        [CellSpec("gru", 4, reset_after=False), CellSpec("simple", 3)], "sum", blocks=2, masking="zero",
        return_sequences=False),
    # One concatenating block: both workers write their columns of the output, so they share no buffer.
    "one_block_concat_lengths": _torch_style(CellSpec("gru", 3), 1, masking="lengths"),
    "float64_peephole_ave_carry_unrolled": _bidir([CellSpec("lstm", 4, peephole=True)], "ave", masking="carry",
                                                  dtype="float64", unroll=T),
}


@pytest.mark.parametrize("batch", [1, 4, 7])
@pytest.mark.parametrize("name", sorted(CASES))
def test_direction_split_matches_reference(name, batch, monkeypatch):
    spec = CASES[name]
    split_spec = dataclasses.replace(spec, direction_split=True)
    seed = sorted(CASES).index(name)
    assert_forced_schedule_matches_reference(spec, seed, batch, monkeypatch, "directions", split_spec)


def test_spec_refuses_a_direction_split_it_cannot_run():
    forward_only = simple_stack([CellSpec("lstm", 4)], 3)
    with pytest.raises(ValueError, match="block 0 has one direction"):
        dataclasses.replace(forward_only, direction_split=True)
    bidir = _bidir([CellSpec("lstm", 4)], "concat")
    with pytest.raises(ValueError, match="direction_split and unit_split=2 exclude each other"):
        dataclasses.replace(bidir, direction_split=True, unit_split=2)
    with pytest.raises(TypeError, match="direction_split must be a bool"):
        dataclasses.replace(bidir, direction_split=1)


def test_forcing_directions_on_a_forward_stack_names_the_reason(monkeypatch):
    monkeypatch.setenv("NUMRNN_SCHEDULE", "directions")
    with pytest.raises(ValueError, match="NUMRNN_SCHEDULE=directions cannot run lstm4_fwd.*one direction"):
        schedule.choose(simple_stack([CellSpec("lstm", 4)], 3), 10, 1)


def test_auto_policy_splits_directions_of_bidirectional_stacks_of_up_to_the_packed_rows_on_two_cores(monkeypatch):
    monkeypatch.delenv("NUMRNN_SCHEDULE", raising=False)
    monkeypatch.setattr(schedule, "cores", lambda: 2)
    monkeypatch.setattr(schedule, "packed_product_rows", lambda: 8)
    bidir = _bidir([CellSpec("lstm", 64)], "concat", blocks=2)
    assert schedule.choose(bidir, 100, 1) == ("directions", 2)
    assert schedule.choose(bidir, 100, 8) == ("directions", 2)
    assert schedule.choose(bidir, 100, 9) == ("batch", 2)  # a BLAS GEMM per step beyond the packed rows
    monkeypatch.setattr(schedule, "packed_product_rows", lambda: 0)
    assert schedule.choose(bidir, 100, 4) == ("directions", 2)
    assert schedule.choose(bidir, 100, 5) == ("batch", 2)
    assert schedule.choose(bidir, 2, 1) == ("serial", 1)  # too little work for a hand-off
    assert schedule.choose(simple_stack([CellSpec("lstm", 64)], 32), 100, 1) == ("serial", 1)
    monkeypatch.setattr(schedule, "packed_product_rows", lambda: 8)
    monkeypatch.setattr(schedule, "cores", lambda: 4)  # four batch workers against two direction workers
    assert schedule.choose(bidir, 100, 4) == ("directions", 2)
    assert schedule.choose(bidir, 100, 5) == ("batch", 4)
    monkeypatch.setattr(schedule, "cores", lambda: 1)
    assert schedule.choose(bidir, 100, 1) == ("serial", 1)


def _uneven(backward_units: int):
    """A block whose backward direction (TF1's ``cell_bw``) has its own size."""
    directions = (DirectionSpec(cells=(CellSpec("lstm", 128),)),
                  DirectionSpec(cells=(CellSpec("lstm", backward_units),), reverse="valid"))
    return StackSpec(blocks=(BlockSpec(directions=directions, merge=None),), input_size=64, masking="lengths")


def test_directions_of_uneven_work_split_only_up_to_four_rows(monkeypatch):
    monkeypatch.delenv("NUMRNN_SCHEDULE", raising=False)
    monkeypatch.setattr(schedule, "cores", lambda: 2)
    monkeypatch.setattr(schedule, "packed_product_rows", lambda: 128)
    assert schedule.direction_imbalance(_uneven(128)) == 1.0
    assert schedule.direction_imbalance(_uneven(64)) == 1.5  # forward 4*128*192, backward 4*64*128 a row and step
    assert schedule.choose(_uneven(96), 100, 8) == ("directions", 2)  # 1.23
    assert schedule.choose(_uneven(64), 100, 8) == ("units", 2)  # a small batch (batch 1179, units 1025 us)
    assert schedule.choose(_uneven(64), 300, 8) == ("batch", 2)  # 629 MFLOP: worth the pool's hand-off
    assert schedule.choose(_uneven(64), 100, 4) == ("directions", 2)


def test_uneven_directions_split_their_units_at_eight_rows(monkeypatch):
    # What the small-batch rule takes for _uneven(64) at eight rows (test above), against the oracle.
    spec = dataclasses.replace(_uneven(64), input_size=D)
    assert_forced_schedule_matches_reference(spec, 3, 8, monkeypatch, "units", dataclasses.replace(spec, unit_split=2))


def test_direction_split_refuses_workspaces_smaller_than_its_shape_needs(monkeypatch):
    # The workers carve their buffers from their rows of ``workspaces`` unchecked (numrnn.runtime.views): the
    # kernel checks the rows' size once a call. A chain in each direction, so each carves sequences too.
    spec = CASES["gru_before_simple_chain_sum_zero_last"]
    split = get_kernel(dataclasses.replace(spec, direction_split=True))
    make = split.shared_buffers

    def short_workspaces(T, T_out, B):
        *blocks, workspaces = make(T, T_out, B)
        return (*blocks, np.empty((workspaces.shape[0], workspaces.shape[1] - 1), workspaces.dtype))

    monkeypatch.setattr(split, "shared_buffers", short_workspaces)
    monkeypatch.setattr(split, "_shared", {})  # none kept from other tests; the short ones dropped after
    monkeypatch.setenv("NUMRNN_SCHEDULE", "directions")
    rng = np.random.default_rng(0)
    weights = _weights(spec, rng)
    x, mask, _, initial = _inputs(spec, rng, batch=3)
    states = [np.array(s) for cell_states in initial for s in cell_states]
    with pytest.raises(ValueError, match="workspaces: smaller than the module's shared_buffers"):
        get_kernel(spec)(x[:5], mask[:5], states, pack_weights(spec, weights))
