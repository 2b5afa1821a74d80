"""A masked call's input projection covers only the rows its steps read, and every schedule gets them right.

Beyond ``PACKED_PROJECTION_MAX_ROWS`` rows (or where a call takes no packed
product) a masked spec's projection gathers the ``(t, b)`` rows a step reads
(before a row's length, or where its Keras mask is set), multiplies those and
spreads the products back (``codegen.targets.cpu.emit_live_projection``).
``test_grid``'s calls are too short to take that path, so these calls are
long: each schedule that generates a projection (the unsplit kernel under the
automatic schedule, the direction split, the unit split) runs masked calls of
more rows than the packed projection takes, with rows of every length from
none to all (the rest at random), and is compared with the oracle. The specs
are those of the other suites (a layer of more than
``LOOP_PROJECTION_MAX_INPUTS`` inputs in each), but for two kernels that
compile for this file alone: the unit split of a lengths spec, and a float64
stack. The gathered rows are multiplied by the packed product up to
``packed_projection_rows`` of them (on AVX-512, these calls' rows), by BLAS
beyond or in a call that takes no packed product (``small`` 0, tested too).
"""

from __future__ import annotations

import dataclasses
from functools import partial

import numpy as np
import pytest
from test_direction_split import CASES as DIRECTION_CASES
from test_grid import CASES as GRID_CASES
from test_grid import D, assert_forced_schedule_matches_reference
from test_unit_split import CASES as UNIT_CASES

import codegen.targets.cpu
from codegen import generate_source
from codegen.spec import CellSpec, simple_stack
from codegen.targets.cpu import PACKED_PROJECTION_MAX_ROWS, packed_projection_rows, projections_packed_up_to
from numrnn.runtime import get_kernel
from numrnn.runtime.kernels import SMALL_WORKSPACE

#: The exact (float64) flavor: the other suites' float64 specs project at most 4 inputs, in a loop.
FLOAT64_LENGTHS = simple_stack([CellSpec("gru", 6), CellSpec("lstm", 3)], D, masking="lengths", dtype="float64")
DIRECTIONS = DIRECTION_CASES["torch_packed_projection_two_blocks"]
GRU_LENGTHS, CARRY = GRID_CASES["torch_style_three_blocks_gru"], UNIT_CASES["stack_carry"]

#: (spec, NUMRNN_SCHEDULE, the split kernel that must have run or None, batch, steps)
CALLS = {
    "auto_lengths_valid_reverse": (GRU_LENGTHS, "auto", None, 6, 50),
    "auto_carry_stack": (GRID_CASES["stack_lstm_gru_simple_carry"], "auto", None, 6, 50),
    "auto_lengths_lstm_projection": (GRID_CASES["torch_style_two_blocks_proj"], "auto", None, 6, 50),
    "auto_lengths_float64": (FLOAT64_LENGTHS, "auto", None, 6, 50),
    "directions_lengths": (DIRECTIONS, "directions", dataclasses.replace(DIRECTIONS, direction_split=True), 2, 150),
    "units_lengths_valid_reverse": (GRU_LENGTHS, "units", dataclasses.replace(GRU_LENGTHS, unit_split=2), 2, 150),
    "units_carry": (CARRY, "units", dataclasses.replace(CARRY, unit_split=2), 2, 150),
}


def _masked_inputs(spec, rng, batch: int, steps: int):
    """Inputs, a mask or lengths, and initial states: row 0 masked in part, row 1 nowhere, row 2 everywhere."""
    x = rng.standard_normal((steps, batch, spec.input_size)).astype(spec.dtype)
    mask = lengths = None
    if spec.masking == "lengths":
        lengths = rng.integers(0, steps + 1, batch).astype(np.int64)
        lengths[:3] = (2 * steps // 3, steps, 0)[:batch]
    else:
        mask = rng.random((steps, batch)) > 0.3
        mask[:, 1:2] = True
        mask[:, 2:3] = False
    initial = [tuple(rng.standard_normal((batch, n)).astype(spec.dtype) for n in c.state_sizes) for c in spec.cells]
    return x, mask, lengths, initial


@pytest.mark.parametrize("name", sorted(CALLS))
def test_long_masked_calls_match_reference(name, monkeypatch):
    spec, schedule, split_spec, batch, steps = CALLS[name]
    assert steps * batch // 2 > PACKED_PROJECTION_MAX_ROWS  # gathered, even for a batch worker
    assert_forced_schedule_matches_reference(spec, sorted(CALLS).index(name), batch, monkeypatch, schedule, split_spec,
                                             partial(_masked_inputs, steps=steps))


@pytest.mark.parametrize("name", ["auto_lengths_valid_reverse", "auto_carry_stack"])
def test_long_masked_calls_without_packed_products_match_reference(name, monkeypatch):
    spec, schedule, _, batch, steps = CALLS[name]
    monkeypatch.setattr(get_kernel(spec), "_small", 0)  # every product BLAS's, the gathered projection's too
    assert_forced_schedule_matches_reference(spec, sorted(CALLS).index(name), batch, monkeypatch, schedule, None,
                                             partial(_masked_inputs, steps=steps))


@pytest.mark.parametrize("rows", [4, 8])
def test_the_packed_projection_takes_more_rows_with_8_row_blocks_while_they_fit_l2(rows, monkeypatch):
    monkeypatch.setattr(codegen.targets.cpu, "panel_rows", lambda: rows)
    lstm128 = CellSpec("lstm", 128)  # 256 inputs: 1 KiB a row, a 512 KiB kernel
    if rows == 4:
        assert packed_projection_rows(lstm128, 256, "float32") == PACKED_PROJECTION_MAX_ROWS
        return
    assert packed_projection_rows(lstm128, 256, "float32") == 1024
    assert packed_projection_rows(lstm128, 64, "float32") == 4096
    assert packed_projection_rows(lstm128, 256, "float64") == PACKED_PROJECTION_MAX_ROWS  # float32 only
    assert packed_projection_rows(lstm128, 5000, "float32") == PACKED_PROJECTION_MAX_ROWS  # at least that many
    assert packed_projection_rows(CellSpec("lstm", 512), 512, "float32") == PACKED_PROJECTION_MAX_ROWS  # 4 MiB kernel
    # The call is as packed as its narrowest layer's projection; a masked one gathers beyond 128 rows.
    spec = simple_stack([CellSpec("lstm", 128), CellSpec("gru", 64)], 256)
    assert projections_packed_up_to(spec) == 1024
    source = generate_source(spec)
    assert "if T * B <= 1024 and small > 0:" in source and "if T * B <= 2048 and small > 0:" in source
    masked = dataclasses.replace(spec, masking="lengths")
    assert projections_packed_up_to(masked) == PACKED_PROJECTION_MAX_ROWS
    source = generate_source(masked)
    assert f"if T * B <= {PACKED_PROJECTION_MAX_ROWS} and small > 0:" in source
    call = source.split("_project_live(xs, lengths, B, w0_wx, ")[1].split("\n")[0]
    assert call.startswith("w0_wx_panels, w0_wx_tiles, xw, ") and call.endswith("np.int64(1024 if small > 0 else 0))")


def test_direction_split_keeps_the_last_large_buffers_and_reuses_them_exactly(monkeypatch):
    # Shared buffers over SMALL_WORKSPACE elements (each worker's workspace row here) are kept for the last
    # call shape only: a later call of that shape reuses them, one of another shape replaces them, and
    # every call still matches the oracle.
    split_spec = dataclasses.replace(DIRECTIONS, direction_split=True)
    split = get_kernel(split_spec)
    make = split.shared_buffers

    def one_large_set_at_a_time(T, T_out, B):
        assert not _large_sets(split), "a new set made while the last large one is still kept"
        return make(T, T_out, B)

    monkeypatch.setattr(split, "shared_buffers", one_large_set_at_a_time)
    shapes = [(150, 40), (120, 40), (150, 40), (150, 40)]
    kept = []
    for seed, (steps, batch) in enumerate(shapes):
        assert_forced_schedule_matches_reference(DIRECTIONS, seed, batch, monkeypatch, "directions", split_spec,
                                                 partial(_masked_inputs, steps=steps))
        large = _large_sets(split)
        assert [key for key, _ in large] == [(steps, steps, batch)]
        kept.append(large[0][1])
    assert kept[3] is kept[2] and kept[2] is not kept[0]


def _large_sets(split) -> list:
    """``(call shape, buffers)`` of each set of shared buffers over ``SMALL_WORKSPACE`` elements ``split`` keeps."""
    return [(key, entry[1]) for key, entry in split._shared.items() if sum(b.size for b in entry[1]) > SMALL_WORKSPACE]
