"""The fused product: layers at one row project their input inside the steps' products.

``codegen.cells.common.emit_fused_product``: a layer whose recurrent matrix
(a unit-split worker's slice of it) is read from L2, or just past it (up to
2 MiB), projects the next block
of rows a slice per step, in the same passes as its recurrent product. Each
case runs forced through the unit split and through one thread, at step
counts around the block size (a short block alone, one block, a block and a
short one, many, and past the packed projection's 128 rows, which fuse
as well), and at two rows (never fused). Not at four steps
or fewer: one-row calls that short take the streaming path, one thread and
BLAS. Split and serial must agree to the bit (every sum is the packed
product's, in input order), so must a one-row call and the same row in a
two-row call (which never fuses), and all must match the oracle. LSTM(64)
fuses serial only (a worker's 32 KiB is read from L1): fused against
unfused, and its static unroll against its loop. A GRU that resets before
its product fuses in the first of its two products (over z and r), narrower
than its projection (z, r and h); split, the second reads the workers'
gathered ``r * h``. Since every one-row call of
five steps or more fuses, a long sequence equals the same one cut in two
calls, its states carried, to the bit. The suite fuses on every machine
(``NUMRNN_FUSED_PROJECTION=1``, conftest), also where it does not pay by
default (``fusion_pays``).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from reference import run_stack
from test_grid import _run_kernel, assert_bit_equal, assert_matches_reference, fan_in_weights

from codegen import generate_source
from codegen.cells import common
from codegen.cells.common import FUSED_ROWS
from codegen.spec import BlockSpec, CellSpec, DirectionSpec, StackSpec, simple_stack
from codegen.targets.cpu import FUSE_CONDITION, PACKED_PROJECTION_MAX_ROWS, fuses_projection, layers_of
from numrnn.runtime import get_kernel
from numrnn.runtime.schedule import packed_product_rows

LSTM128 = CellSpec("lstm", 128)
CASES = {
    # Forward and reversed LSTM(128) (128 KiB a worker) on 40 inputs, fewer than the product's 128; then a
    # GRU(136) on 256 inputs, more than its 136, whose worker's 204 columns end in a partial panel.
    "bidir_lstm_then_gru": StackSpec(
        blocks=(BlockSpec((DirectionSpec((LSTM128,)), DirectionSpec((LSTM128,), "full")), "concat"),
                BlockSpec((DirectionSpec((CellSpec("gru", 136),)),))),
        input_size=40),
    "float64_simple": simple_stack([CellSpec("simple", 256)], 20, dtype="float64"),
    "lstm64_serial_only": simple_stack([CellSpec("lstm", 64)], 32),
    "gru_reset_before": simple_stack([CellSpec("gru", 128, reset_after=False)], 40),
}
SERIAL_ONLY = {"lstm64_serial_only"}


def _fuses(spec: StackSpec, workers: int = 1) -> list[bool]:
    return [fuses_projection(layer.context, layer.cell.units // workers) for layer in layers_of(spec)]


@pytest.mark.parametrize("name", sorted(CASES))
def test_layers_whose_matrix_is_read_from_l2_fuse_their_projection(name):
    assert all(_fuses(CASES[name]))
    assert all(_fuses(CASES[name], 2)) == (name not in SERIAL_ONLY)


@pytest.mark.parametrize("spec, reason", [
    (simple_stack([CellSpec("lstm", 32)], 32), "16 KiB, read from L1"),
    (simple_stack([CellSpec("lstm", 1024)], 64), "16 MiB, read from L3 (8 MiB a worker of two)"),
    (simple_stack([LSTM128], 40, masking="carry"), "masked steps skip the product"),
    (StackSpec(blocks=(BlockSpec((DirectionSpec((LSTM128,)), DirectionSpec((LSTM128,), "valid")), "concat"),),
               input_size=40, masking="lengths"), "each row's own reversal"),
])
def test_layers_the_fused_product_cannot_serve_do_not_fuse(spec, reason):
    assert not any(_fuses(spec)), reason


@pytest.fixture
def fusion_unset(monkeypatch):
    """``NUMRNN_FUSED_PROJECTION`` unset (the suite sets it: conftest) and ``fusion_pays`` asked afresh, then again
    after the test, with the suite's setting back."""
    monkeypatch.delenv("NUMRNN_FUSED_PROJECTION", raising=False)
    common.fusion_pays.cache_clear()
    yield monkeypatch
    common.fusion_pays.cache_clear()


def test_fusion_follows_the_cpu_unless_set(fusion_unset):
    latency256 = simple_stack([CellSpec("lstm", 256)], 256)
    split = dataclasses.replace(latency256, unit_split=2)
    fusion_unset.setattr(common, "_target_cpu_name", lambda: "emeraldrapids")
    assert not common.fusion_pays() and _fuses(latency256, 2) == [False]
    assert "_fused_product(" not in generate_source(split)
    fusion_unset.setattr(common, "_target_cpu_name", lambda: "znver4")
    common.fusion_pays.cache_clear()
    assert common.fusion_pays() and _fuses(latency256, 2) == [True]
    fusion_unset.setenv("NUMRNN_FUSED_PROJECTION", "0")
    common.fusion_pays.cache_clear()
    assert not common.fusion_pays()
    fusion_unset.setenv("NUMRNN_FUSED_PROJECTION", "yes")
    common.fusion_pays.cache_clear()
    with pytest.raises(ValueError, match="NUMRNN_FUSED_PROJECTION must be 0 or 1; got 'yes'"):
        common.fusion_pays()


def test_a_matrix_read_from_l3_fuses_only_in_slices_near_l2():
    # LSTM(512): 4 MiB on one thread, 2 MiB a worker of two.
    spec = simple_stack([CellSpec("lstm", 512)], 64)
    assert _fuses(spec) == [False] and _fuses(spec, 2) == [True]
    assert "_fused_product(" not in generate_source(spec)
    assert "_fused_product(" in generate_source(dataclasses.replace(spec, unit_split=2))


def test_a_layer_with_a_loop_projection_calls_its_fused_function_unfused():
    # GRU(120) x 3 on two inputs (seed000): the first layer's projection is a loop, the others' a product, and
    # all three call one function, compiled once (a literal False would have compiled it twice).
    source = generate_source(simple_stack([CellSpec("gru", 120)] * 3, 2))
    assert source.count("def _layer") == 1 and "_fused_product(" in source
    assert source.count("fuse = np.bool_(False)") == 1 and source.count(f"fuse = {FUSE_CONDITION}") == 2


def _run(spec, weights, x, initial, schedule, monkeypatch):
    monkeypatch.setenv("NUMRNN_SCHEDULE", schedule)
    return _run_kernel(spec, weights, x, None, None, initial)


@pytest.mark.skipif(packed_product_rows() < 2, reason="BLAS takes every product on this machine: nothing fuses")
@pytest.mark.parametrize("steps, batch", [(5, 1), (FUSED_ROWS, 1), (FUSED_ROWS + 5, 1), (100, 1), (129, 1), (13, 2)])
@pytest.mark.parametrize("name", sorted(CASES))
def test_fused_calls_equal_unfused_ones_bit_for_bit_and_the_oracle(name, steps, batch, monkeypatch):
    spec = CASES[name]
    rng = np.random.default_rng(steps)
    weights = fan_in_weights(spec, rng)
    x = rng.standard_normal((steps, batch, spec.input_size)).astype(spec.dtype)
    initial = [tuple(rng.standard_normal((batch, n)).astype(spec.dtype) for n in c.state_sizes) for c in spec.cells]
    serial, serial_states = _run(spec, weights, x, initial, "serial", monkeypatch)
    split, split_states = _run(spec, weights, x, initial, "units", monkeypatch)
    assert get_kernel(dataclasses.replace(spec, unit_split=2)).compile_seconds is not None  # it really ran split
    assert_bit_equal(split, split_states, serial, serial_states)
    if batch == 1 and 2 * steps <= PACKED_PROJECTION_MAX_ROWS:  # the row beside another, which never fuses
        pair = np.concatenate([x, rng.standard_normal(x.shape).astype(spec.dtype)], axis=1)
        pair_initial = [tuple(np.concatenate([s, s]) for s in cell) for cell in initial]
        two, two_states = _run(spec, weights, pair, pair_initial, "serial", monkeypatch)
        assert_bit_equal(two[:, :1], [tuple(s[:1] for s in cell) for cell in two_states], serial, serial_states)
    if name in SERIAL_ONLY and steps in (FUSED_ROWS + 5, 100):  # the static unroll's steps fuse too
        static = dataclasses.replace(spec, unroll=steps)
        assert_bit_equal(*_run(static, weights, x, initial, "serial", monkeypatch), serial, serial_states)
    expected, expected_states = run_stack(spec, weights, x, initial_states=initial)
    assert_matches_reference(spec, serial, serial_states, expected, expected_states)


@pytest.mark.skipif(packed_product_rows() < 2, reason="BLAS takes every product on this machine: nothing fuses")
@pytest.mark.parametrize("name, schedule", [("float64_simple", "serial"), ("float64_simple", "units"),
                                            ("gru_reset_before", "serial"), ("gru_reset_before", "units"),
                                            ("lstm64_serial_only", "serial")])
def test_a_long_row_equals_the_same_row_in_two_calls_bit_for_bit(name, schedule, monkeypatch):
    # 200 steps in one call, then as 100 + 100 with the states carried: every call fuses. Up to 128 steps only,
    # at first: BLAS projected the 200 up front, and its float64 sums differ (float32's OpenBLAS happens to add
    # these few inputs in the packed product's order, one multiply-add each).
    spec = CASES[name]
    rng = np.random.default_rng(200)
    weights = fan_in_weights(spec, rng)
    x = rng.standard_normal((200, 1, spec.input_size)).astype(spec.dtype)
    initial = [tuple(rng.standard_normal((1, n)).astype(spec.dtype) for n in c.state_sizes) for c in spec.cells]
    whole, whole_states = _run(spec, weights, x, initial, schedule, monkeypatch)
    first, carried = _run(spec, weights, x[:100], initial, schedule, monkeypatch)
    second, last_states = _run(spec, weights, x[100:], carried, schedule, monkeypatch)
    assert_bit_equal(np.concatenate([first, second]), last_states, whole, whole_states)
