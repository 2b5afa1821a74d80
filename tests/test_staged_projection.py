"""Staged projections: a long unmasked call projects its input a few steps at a time, inside its loop.

(Or inside a static unroll's steps: each call of the step function checks whether it starts a stage.)

``codegen.targets.cpu.stages_projection``: where the packed product has
8-row blocks (AVX-512), a call whose input projection is longer than one
packed product takes (``packed_projection_rows``) projects ``STAGE_ROWS``
rows' worth of steps at a time into the first rows of its projection
buffer, as its steps reach them, forward or reversed, rather than all of it
by one BLAS GEMM before the loop. Each case runs at batch sizes whose stages
are several steps (the last one short), two steps, the whole call, and one
step, under every schedule that runs the unsplit layer functions (one
thread, the batch split, the direction split), and must match the oracle.
Every sum is the packed product's, in input order, so a staged call's rows
equal the same rows run alone (a short call, projected whole before its
loop) to the bit, but where a step's product is BLAS's (more rows than
``small``).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from reference import run_stack
from test_grid import _run_kernel, assert_bit_equal, assert_matches_reference, fan_in_weights

from codegen import generate_source
from codegen.cells.common import WIDE_PANEL_ROWS, panel_rows
from codegen.spec import BlockSpec, CellSpec, DirectionSpec, StackSpec, simple_stack
from codegen.targets.cpu import (
    STAGE_MAX_WEIGHT_BYTES,
    STAGE_ROWS,
    fuses_projection,
    layers_of,
    stages_past,
    stages_projection,
)
from numrnn.runtime import get_kernel
from numrnn.runtime.schedule import packed_product_rows

LSTM96 = CellSpec("lstm", 96)
CASES = {
    # Forward and reversed LSTM(96) on 700 inputs: an input kernel past 1 MiB, so past 128 rows a call stages.
    "bidir_lstm": StackSpec(blocks=(BlockSpec((DirectionSpec((LSTM96,)), DirectionSpec((LSTM96,), "full")),
                                              "concat"),), input_size=700),
    # A GRU that resets before its product (on 1400 inputs: 1 MiB and more), then a SimpleRNN whose 64-input
    # kernel stages only past 4096 rows.
    "gru_reset_before_simple": simple_stack([CellSpec("gru", 64, reset_after=False), CellSpec("simple", 32)],
                                            1400),
    # Three steps an iteration of the partially unrolled loop, each checking whether it starts a stage.
    "lstm_partial_unroll": dataclasses.replace(simple_stack([CellSpec("lstm", 64)], 1100), unroll_steps=3),
}
#: A static unroll of 17 steps, forward and reversed: each step function call checks whether it starts a stage.
STATIC = dataclasses.replace(CASES["bidir_lstm"], unroll=17)
#: (steps, batch): stages of 6 steps (the first one reached short when reversed), of 2, one stage of every
#: step, a stage a step (more rows than ``small``: the steps' products are BLAS's).
SHAPES = [(17, STAGE_ROWS // 6), (5, STAGE_ROWS // 2), (20, 9), (4, STAGE_ROWS)]
SCHEDULES = {"bidir_lstm": ("serial", "batch", "directions")}
STAGES = panel_rows() == WIDE_PANEL_ROWS


def _staged_call(spec: StackSpec, steps: int, batch: int) -> list[bool]:
    """Per layer, whether a call of ``steps`` x ``batch`` rows stages its projection (as the kernel decides)."""
    return [stages_projection(spec, layer.context) and stages_past(layer, spec.dtype) is not None
            and steps * batch > stages_past(layer, spec.dtype) for layer in layers_of(spec)]


@pytest.mark.parametrize("spec", [*CASES.values(), STATIC], ids=[*CASES, "static"])
def test_long_unmasked_calls_stage_where_blocks_are_wide(spec):
    assert all(stages_projection(spec, layer.context) == STAGES for layer in layers_of(spec))
    assert ("if stage and " in generate_source(spec)) == STAGES
    assert _staged_call(spec, 17, 15)[0] == STAGES  # 255 rows, past the 128 of a kernel over 1 MiB


@pytest.mark.parametrize("spec, reason", [
    (simple_stack([LSTM96], 700, masking="carry"), "masked steps: the live rows are projected"),
    (StackSpec(blocks=(BlockSpec((DirectionSpec((LSTM96,)), DirectionSpec((LSTM96,), "valid")), "concat"),),
               input_size=700, masking="lengths"), "each row's own reversal"),
    (simple_stack([LSTM96], 700, dtype="float64"), "float64: BLAS's GEMM is the faster there"),
])
def test_layers_that_cannot_stage_project_before_their_loop(spec, reason):
    assert not any(stages_projection(spec, layer.context) for layer in layers_of(spec)), reason
    assert "if stage and " not in generate_source(spec)


def test_an_input_kernel_past_4_mib_is_projected_by_one_gemm():
    # LSTM(512) on 1024 inputs: 8 MiB, which each stage would read again. Its function stages (its layers may);
    # its call never does.
    spec = simple_stack([CellSpec("lstm", 512)], 1024)
    layer = layers_of(spec)[0]
    assert 1024 * 4 * 512 * 4 > STAGE_MAX_WEIGHT_BYTES and stages_past(layer, "float32") is None
    source = generate_source(spec)
    assert ("if stage and " in source) == STAGES
    assert "stage = np.bool_(False)" in source and "stage = T * B" not in source
    assert _staged_call(spec, 100, 64) == [False]


def test_blocks_of_four_rows_do_not_stage(monkeypatch):
    monkeypatch.setattr("codegen.targets.cpu.panel_rows", lambda: WIDE_PANEL_ROWS // 2)
    spec = CASES["bidir_lstm"]
    assert not any(stages_projection(spec, layer.context) for layer in layers_of(spec))


def _run(spec, weights, x, initial, schedule, monkeypatch):
    monkeypatch.setenv("NUMRNN_SCHEDULE", schedule)
    return _run_kernel(spec, weights, x, None, None, initial)


def _draw(spec: StackSpec, seed: int, steps: int, batch: int):
    """Weights, time-major inputs and initial states of a call of ``steps`` x ``batch`` rows."""
    rng = np.random.default_rng(seed)
    weights = fan_in_weights(spec, rng)
    x = rng.standard_normal((steps, batch, spec.input_size)).astype(spec.dtype)
    initial = [tuple(rng.standard_normal((batch, n)).astype(spec.dtype) for n in c.state_sizes) for c in spec.cells]
    return weights, x, initial


def _assert_serial_call_matches_oracle(spec: StackSpec, seed: int, steps: int, batch: int, monkeypatch) -> None:
    weights, x, initial = _draw(spec, seed, steps, batch)
    expected, expected_states = run_stack(spec, weights, x, initial_states=initial)
    got, got_states = _run(spec, weights, x, initial, "serial", monkeypatch)
    assert_matches_reference(spec, got, got_states, expected, expected_states)


@pytest.mark.parametrize("steps, batch", SHAPES)
@pytest.mark.parametrize("name", sorted(CASES))
def test_staged_calls_match_the_oracle_and_their_rows_alone_bit_for_bit(name, steps, batch, monkeypatch):
    _check_staged_call(CASES[name], SCHEDULES.get(name, ("serial", "batch")), steps, batch, monkeypatch)


@pytest.mark.parametrize("batch", [STAGE_ROWS // 6, STAGE_ROWS])
def test_a_static_unroll_stages_as_its_loop_would(batch, monkeypatch):
    _check_staged_call(STATIC, SCHEDULES["bidir_lstm"], STATIC.unroll, batch, monkeypatch)


def _check_staged_call(spec: StackSpec, schedules: tuple[str, ...], steps: int, batch: int, monkeypatch) -> None:
    """A call of ``steps`` x ``batch`` rows stages; serial matches the oracle, ``schedules[1:]`` serial (bit for bit
    where every product is packed), and its first rows alone, unstaged, give the same bits."""
    weights, x, initial = _draw(spec, steps * batch, steps, batch)
    assert _staged_call(spec, steps, batch)[0] == STAGES
    expected, expected_states = run_stack(spec, weights, x, initial_states=initial)
    serial, serial_states = _run(spec, weights, x, initial, "serial", monkeypatch)
    assert_matches_reference(spec, serial, serial_states, expected, expected_states)
    packed = batch <= packed_product_rows()  # else serial steps take BLAS's product, a worker's half the packed one
    for schedule in schedules[1:]:
        split, split_states = _run(spec, weights, x, initial, schedule, monkeypatch)
        if packed:
            assert_bit_equal(split, split_states, serial, serial_states)
        else:
            assert_matches_reference(spec, split, split_states, expected, expected_states)
    if STAGES and packed:
        rows = slice(0, 3)
        alone, alone_states = _run(spec, weights, np.ascontiguousarray(x[:, rows]),
                                   [tuple(s[rows] for s in cell) for cell in initial], "serial", monkeypatch)
        assert not any(_staged_call(spec, steps, 3))
        assert_bit_equal(serial[:, rows], [tuple(s[rows] for s in cell) for cell in serial_states],
                         alone, alone_states)


def test_a_call_without_the_packed_product_projects_by_blas(monkeypatch):
    # small 0 (every product BLAS's): the projection is one GEMM before the loop (the kernel's stage flag needs
    # small > 0), and the call still right.
    spec = CASES["lstm_partial_unroll"]
    monkeypatch.setattr(get_kernel(spec), "_small", 0)
    _assert_serial_call_matches_oracle(spec, 0, 17, 40, monkeypatch)


def test_a_one_row_call_that_fuses_its_projection_does_not_stage_it(monkeypatch):
    # 200 steps of one row: past the 128 rows that stage, and a layer of LSTM(96) (147 KiB) fuses one-row calls
    # where fusing is on (the suite's setting): the kernel's stage flag waits for ``not fuse``.
    spec = CASES["bidir_lstm"]
    layer = layers_of(spec)[0]
    assert _staged_call(spec, 200, 1) == [STAGES, STAGES]
    source = generate_source(spec)
    if fuses_projection(layer.context, layer.cell.units):
        assert "and small > 0 and not fuse" in source
    _assert_serial_call_matches_oracle(spec, 1, 200, 1, monkeypatch)
