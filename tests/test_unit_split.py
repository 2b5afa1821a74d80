"""The unit split (one call on several threads, an exchange of ``h`` per step) against the NumPy oracle.

Each case is a spec the split can run (even unit counts) covering the
semantics the split touches: every cell kind and LSTM option, both GRU
resets (reset-before exchanges ``r * h`` within the step as well, an LSTM
projection ``o * tanh(c)``),
each masking mode, both reversals, every merge (including the merge between
blocks, which needs its own barrier), the last-output mode and both dtypes.
Each case runs at one row (the layer's inline one-row product), four rows
and 13 (the shared module's packed product), forced through
``NUMRNN_SCHEDULE=units``, and is compared with the oracle (which pins the
unsplit kernels too, in ``test_grid``); where OpenBLAS has
AVX-512 small-matrix kernels and numba's vectors are narrower
(``packed_product_rows`` 0), BLAS takes every product instead. One compile
per case.
"""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
from reference import run_stack
from test_grid import (
    D,
    T,
    _bidir,
    _run_kernel,
    _weights,
    assert_bit_equal,
    assert_forced_schedule_matches_reference,
    assert_matches_reference,
    fan_in_weights,
)

from codegen import generate_source
from codegen.cells import packed_names, split_packed
from codegen.spec import BlockSpec, CellSpec, DirectionSpec, StackSpec, simple_stack
from numrnn.runtime import get_kernel, kernels, pack_weights, schedule, sync
from numrnn.runtime import partners as partners_module
from numrnn.runtime.partners import Partners

LSTM_OPTIONS = CellSpec("lstm", 6, peephole=True, cell_clip=0.8, forget_bias=1.0)

CASES = {
    "stack_carry": simple_stack([LSTM_OPTIONS, CellSpec("gru", 4), CellSpec("simple", 4, activation="relu")], D,
                                masking="carry"),
    "bidir_none_zero_backwards": _bidir([CellSpec("gru", 4), CellSpec("lstm", 6)], None, masking="zero"),
    "bidir_ave_two_blocks": _bidir([CellSpec("simple", 4)], "ave", blocks=2),
    "float64_valid_sum_then_gru_last": StackSpec(
        blocks=(BlockSpec((DirectionSpec((CellSpec("lstm", 4),)), DirectionSpec((CellSpec("lstm", 4),), "valid")),
                          "sum"),
                BlockSpec((DirectionSpec((CellSpec("gru", 4, use_bias=False),)),))),
        input_size=D, dtype="float64", masking="lengths", return_sequences=False),
    "gru_reset_before_valid_two_blocks": _bidir(
        [CellSpec("gru", 6, reset_after=False), CellSpec("gru", 4, reset_after=False, use_bias=False)], "concat",
        reverse="valid", blocks=2, masking="lengths"),
    "lstm_projection_valid_sum": _bidir(
        [CellSpec("lstm", 6, proj_units=4, peephole=True, cell_clip=0.8, forget_bias=1.0)], "sum", reverse="valid",
        masking="lengths"),
    # o * tanh(c) takes two exchange lines a row and h one: each exchange's parts start where the wider one's do.
    "lstm_projection_of_fewer_lines_zero": simple_stack([CellSpec("lstm", 32, proj_units=8)], D, masking="zero"),
    # A projection wider than its units, then one of a column a worker.
    "float64_projections_carry_last": simple_stack(
        [CellSpec("lstm", 4, proj_units=6), CellSpec("lstm", 8, proj_units=2)], D, dtype="float64", masking="carry",
        return_sequences=False),
    "float64_gru_reset_before_carry_last": simple_stack(
        [CellSpec("gru", 4, reset_after=False, recurrent_activation="hard_sigmoid")], D, dtype="float64",
        masking="carry", return_sequences=False),
}


@pytest.mark.parametrize("batch", [1, 4, 13])
@pytest.mark.parametrize("name", sorted(CASES))
def test_unit_split_matches_reference(name, batch, monkeypatch):
    spec = CASES[name]
    split_spec = dataclasses.replace(spec, unit_split=2)
    seed = sorted(CASES).index(name)
    assert_forced_schedule_matches_reference(spec, seed, batch, monkeypatch, "units", split_spec)


def test_one_split_kernel_serves_calls_of_changing_length_and_rows(monkeypatch):
    # A split kernel keeps its last call's shared buffers (the steps' h exchange): a call of the same
    # shape reuses them and must not see the last call's values, and a call of another shape must get its own.
    spec = CASES["stack_carry"]
    monkeypatch.setenv("NUMRNN_SCHEDULE", "units")
    rng = np.random.default_rng(7)
    weights = _weights(spec, rng)
    for steps, batch in [(7, 1), (7, 1), (3, 1), (7, 1), (7, 4), (7, 4), (7, 1)]:
        x = rng.standard_normal((steps, batch, D)).astype(spec.dtype)
        mask = rng.random((steps, batch)) > 0.3
        initial = [tuple(rng.standard_normal((batch, n)).astype(spec.dtype) for n in c.state_sizes)
                   for c in spec.cells]
        expected, expected_states = run_stack(spec, weights, x, mask=mask, initial_states=initial)
        got, got_states = _run_kernel(spec, weights, x, mask, None, initial)
        assert_matches_reference(spec, got, got_states, expected, expected_states)
    assert get_kernel(dataclasses.replace(spec, unit_split=2)).compile_seconds is not None  # it really ran split


def test_a_split_kernels_compile_time_leaves_out_the_first_calls_run(monkeypatch):
    # numrnn compare reports compile_seconds as the cold compile and the cached load; a split kernel's counted its
    # first call's run as well. The run is slowed here so that it cannot hide in the compile's noise.
    spec = CASES["stack_carry"]
    monkeypatch.setenv("NUMRNN_SCHEDULE", "units")
    run_lead, pause = kernels.Kernel._run_lead, 0.5

    def slow_run_lead(self, *args, **kwargs):
        time.sleep(pause)
        return run_lead(self, *args, **kwargs)

    rng = np.random.default_rng(9)
    weights = _weights(spec, rng)
    x = rng.standard_normal((5, 1, D)).astype(spec.dtype)
    initial = [tuple(np.zeros((1, n), spec.dtype) for n in c.state_sizes) for c in spec.cells]
    _run_kernel(spec, weights, x, np.ones((5, 1), bool), None, initial)  # compiled, in the disk cache
    kernels.clear_memory_cache()  # the next first call loads it
    monkeypatch.setattr(kernels.Kernel, "_run_lead", slow_run_lead)
    start = time.perf_counter()
    _run_kernel(spec, weights, x, np.ones((5, 1), bool), None, initial)
    first_call = time.perf_counter() - start
    loaded = get_kernel(dataclasses.replace(spec, unit_split=2)).compile_seconds
    assert 0 < loaded <= first_call - pause


def test_a_split_kernel_follows_the_weights_it_is_given(monkeypatch):
    # The split kernel cuts each set of packed weights into the workers' slices once, and remembers the
    # set it used last: calls that alternate sets, or a list whose arrays were replaced in place, must each
    # run on the weights they pass.
    spec = CASES["stack_carry"]
    monkeypatch.setenv("NUMRNN_SCHEDULE", "units")
    rng = np.random.default_rng(8)
    sets = [_weights(spec, rng) for _ in range(2)]
    packed = [pack_weights(spec, weights) for weights in sets]
    kernel = get_kernel(spec)
    x = rng.standard_normal((5, 1, D)).astype(spec.dtype)
    mask = np.ones((5, 1), bool)
    initial = [tuple(np.zeros((1, n), spec.dtype) for n in c.state_sizes) for c in spec.cells]
    for weights, packed_list in [(sets[0], packed[0]), (sets[1], packed[1]), (sets[0], packed[0]),
                                 (sets[0], packed[0])]:
        expected, _ = run_stack(spec, weights, x, mask=mask, initial_states=initial)
        states = [np.array(s) for cell_states in initial for s in cell_states]
        np.testing.assert_allclose(kernel(x, mask, states, packed_list), expected, rtol=0, atol=1e-5)
    packed[0][:] = packed[1]  # the same list, every array replaced
    expected, _ = run_stack(spec, sets[1], x, mask=mask, initial_states=initial)
    states = [np.array(s) for cell_states in initial for s in cell_states]
    np.testing.assert_allclose(kernel(x, mask, states, packed[0]), expected, rtol=0, atol=1e-5)


THREE_WORKERS = """
import os, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
from test_grid import fan_in_weights
from codegen.spec import CellSpec, simple_stack
from numrnn.runtime import get_kernel, pack_weights
from numrnn.runtime.kernels import _partners

spec = simple_stack([CellSpec("lstm", 48), CellSpec("gru", 48, reset_after=False), CellSpec("lstm", 48, proj_units=24)],
                    5, masking="lengths", dtype="float32")
packed, kernel = pack_weights(spec, fan_in_weights(spec, np.random.default_rng(5))), get_kernel(spec)
results = {}
for schedule in ("serial", "units"):
    os.environ["NUMRNN_SCHEDULE"] = schedule
    for batch in (1, 2):
        x = np.random.default_rng(batch).standard_normal((9, batch, 5)).astype(np.float32)
        lengths = np.array([9, 5][:batch], dtype=np.int64)
        for call in range(2):  # the second call reuses the exchange buffers the first stamped
            states = [np.full((batch, n), 0.1 * call, np.float32) for cell in spec.cells for n in cell.state_sizes]
            results[schedule, batch, call] = (kernel(x, lengths, states, packed), *states)
team = _partners()
assert team.workers == 3 and team.hot_calls + team.cold_calls == 4, (team.workers, team.hot_calls, team.cold_calls)
for batch in (1, 2):
    for call in range(2):
        for split, serial in zip(results["units", batch, call], results["serial", batch, call], strict=True):
            np.testing.assert_allclose(split, serial, rtol=0, atol=1e-6)
print("three workers ok")
"""


def test_three_workers_exchange_h_as_two_do():
    # Every worker waits for the lines of each other worker: three of them, whatever the machine's cores
    # (NUMRNN_NUM_THREADS; two share a core here), in a fresh interpreter; a three-layer stack (the last two
    # exchange twice a step: a reset-before GRU, an LSTM projection), lengths masking,
    # one and two rows, each shape called twice; against the serial kernel.
    env = {**os.environ, "NUMRNN_NUM_THREADS": "3"}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(THREE_WORKERS), os.path.dirname(__file__)], env=env,
                          text=True, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "three workers ok" in done.stdout


def test_every_exchange_of_a_layer_starts_the_workers_parts_alike():
    # o * tanh(c) takes two lines a row (16 float32 values) and h one (4): placed by their own line counts, the
    # h exchange's parts would overlap the gather's, which the other worker may still be reading.
    source = generate_source(dataclasses.replace(CASES["lstm_projection_of_fewer_lines_zero"], unit_split=2))
    starts = re.findall(r"(?:mine|theirs) = \(\(epoch % 2\) \* 2 \+ (?:me|w)\) \* B \* (\d+)", source)
    assert len(starts) == 4 and set(starts) == {"16"}  # two lines of 8 slots, in both exchanges


def _second_workers_arrays(cell: CellSpec) -> tuple[dict, dict]:
    """Random logical weights of ``cell`` on 3 inputs, and worker 1 of 2's packed arrays by name."""
    rng = np.random.default_rng(0)
    logical = {k: rng.standard_normal(s).astype(np.float32) for k, s in cell.weight_shapes(3).items()}
    packed = pack_weights(simple_stack([cell], 3), [logical])
    return logical, dict(zip(packed_names(cell), split_packed(cell, packed, 1, 2)))


def test_split_packed_keeps_each_workers_columns_of_every_gate():
    logical, part1 = _second_workers_arrays(CellSpec("lstm", 4, peephole=True))
    columns = [2, 3, 6, 7, 10, 11, 14, 15]  # units 2, 3 of gates i, f, c, o
    np.testing.assert_array_equal(part1["wx"], logical["kernel"][:, columns])
    np.testing.assert_array_equal(part1["wh"], logical["recurrent_kernel"][:, columns])
    np.testing.assert_array_equal(part1["b"], logical["bias"][columns])
    np.testing.assert_array_equal(part1["wp"], logical["peephole"][:, 2:4])


def test_split_packed_keeps_each_workers_columns_of_a_reset_before_grus_two_products():
    logical, part1 = _second_workers_arrays(CellSpec("gru", 4, reset_after=False))
    recurrent = logical["recurrent_kernel"]  # (4, 12): z, r, h
    np.testing.assert_array_equal(part1["whzr"], recurrent[:, [2, 3, 6, 7]])  # units 2, 3 of z and r, every row
    np.testing.assert_array_equal(part1["whh"], recurrent[:, [10, 11]])  # units 2, 3 of h, every row of r * h
    np.testing.assert_array_equal(part1["wx"], logical["kernel"][:, [2, 3, 6, 7, 10, 11]])


def test_split_packed_cuts_a_projection_by_its_outputs():
    logical, part1 = _second_workers_arrays(CellSpec("lstm", 4, proj_units=6))
    np.testing.assert_array_equal(part1["wh"], logical["recurrent_kernel"][:, [2, 3, 6, 7, 10, 11, 14, 15]])  # 6 rows
    np.testing.assert_array_equal(part1["wr"], logical["projection"][:, 3:].T)  # outputs 3-5, from every unit


ONE_ROW_PRODUCTS = {
    # A worker's 264 outputs end in an 8-column panel: after two passes of four 32-column panels (64-byte
    # vectors, walked back on odd steps), or four of 16-column ones. Masked, so that its 136 KiB slice does
    # not fuse its projection (which would take the fused entry), and its row stops 3 steps early.
    "float32_passes_and_a_partial_panel": simple_stack([CellSpec("lstm", 132)], D, masking="lengths"),
    # 96 float64 outputs: one pass of four 16-column panels and two more panels, or three passes of 8-column ones.
    "float64_passes_and_whole_panels": simple_stack([CellSpec("gru", 64)], D, dtype="float64"),
    # Two products a step, of 96 and 48 outputs (whole panels of 16 or 32 columns, or a partial one), the
    # second from the gathered r * h. Masked: its rows stop 3 steps early.
    "float32_gru_reset_before": simple_stack([CellSpec("gru", 96, reset_after=False)], D, masking="lengths"),
}


def one_row_case(name: str):
    """``ONE_ROW_PRODUCTS[name]``, its weights, one row of input, its lengths (or ``None``) and initial states."""
    spec = ONE_ROW_PRODUCTS[name]
    rng = np.random.default_rng(11)
    weights = fan_in_weights(spec, rng)
    x = rng.standard_normal((T, 1, D)).astype(spec.dtype)
    lengths = np.array([T - 3], np.int64) if spec.masking == "lengths" else None
    initial = [tuple(rng.standard_normal((1, n)).astype(spec.dtype) for n in c.state_sizes) for c in spec.cells]
    return spec, weights, x, lengths, initial


@pytest.mark.skipif(schedule.packed_product_rows() < 2, reason="BLAS takes every product on this machine")
@pytest.mark.parametrize("name", sorted(ONE_ROW_PRODUCTS))
def test_a_one_row_split_step_computes_the_packed_products_sums(name, monkeypatch):
    # A split layer's one-row product is its own inline code (codegen.cells.common.emit_one_row_product), two
    # rows' the shared module's packed product: the same multiply-adds in the same order, so the same bits.
    spec, weights, x, lengths, initial = one_row_case(name)
    monkeypatch.setenv("NUMRNN_SCHEDULE", "units")
    one = _run_kernel(spec, weights, x, None, lengths, initial)
    doubled = [tuple(np.concatenate([s, s]) for s in cell) for cell in initial]
    two, two_states = _run_kernel(spec, weights, np.concatenate([x, x], axis=1), None,
                                  None if lengths is None else np.concatenate([lengths, lengths]), doubled)
    assert get_kernel(dataclasses.replace(spec, unit_split=2)).compile_seconds is not None  # it really ran split
    assert_bit_equal(two[:, :1], [tuple(s[:1] for s in cell) for cell in two_states], *one)
    expected, expected_states = run_stack(spec, weights, x, lengths=lengths, initial_states=initial)
    assert_matches_reference(spec, *one, expected, expected_states)


CACHED_BITS = """
import dataclasses, sys
sys.path.insert(0, sys.argv[1])
from test_grid import _run_kernel
from test_unit_split import one_row_case
from numrnn.runtime import get_kernel
spec, weights, x, lengths, initial = one_row_case("float32_passes_and_a_partial_panel")
output, states = _run_kernel(spec, weights, x, None, lengths, initial)
split = get_kernel(dataclasses.replace(spec, unit_split=2)).function
print(split.stats.cache_hits.get(split.signatures[0], 0), output.tobytes().hex())
"""


def test_a_split_kernel_loaded_from_the_disk_cache_computes_the_bits_of_the_process_that_compiled_it(tmp_path):
    # The kernel's cached code holds its own copy of its layer function, which rounded differently from the
    # layer function's own code, which the compiling process runs (kernels._load_cached_callees).
    env = {**os.environ, "NUMRNN_SCHEDULE": "units", "NUMRNN_CACHE_DIR": str(tmp_path)}
    env.pop("NUMBA_CACHE_DIR", None)
    runs = []
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", CACHED_BITS, os.path.dirname(__file__)], env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        runs.append(done.stdout.split())
    (compiled_hits, compiled), (loaded_hits, loaded) = runs
    assert compiled_hits == "0" and loaded_hits == "1"  # the second process loaded the kernel from the cache
    assert loaded == compiled


@pytest.mark.parametrize(
    "spec, message",
    [
        (simple_stack([CellSpec("lstm", 4, proj_units=3)], 3), "divide the projected outputs"),
        (simple_stack([CellSpec("lstm", 5)], 3), "divide the units"),
        (simple_stack([CellSpec("lstm", 4)], 3, unroll=8), "plain dynamic loop"),
    ],
)
def test_spec_refuses_a_unit_split_it_cannot_run(spec, message):
    with pytest.raises(ValueError, match=message):
        dataclasses.replace(spec, unit_split=2)


def test_forcing_units_on_a_spec_that_cannot_split_names_the_reason(monkeypatch):
    monkeypatch.setenv("NUMRNN_SCHEDULE", "units")
    with pytest.raises(ValueError, match="NUMRNN_SCHEDULE=units cannot run .*lstm4p3.*divide the projected outputs"):
        schedule.choose(simple_stack([CellSpec("lstm", 4, proj_units=3)], 3), 10, 1)


def test_unknown_schedule_is_refused(monkeypatch):
    monkeypatch.setenv("NUMRNN_SCHEDULE", "fastest")
    with pytest.raises(ValueError, match="NUMRNN_SCHEDULE must be one of auto, serial, batch, units"):
        schedule.choose(simple_stack([CellSpec("lstm", 4)], 3), 10, 1)


def test_auto_policy_splits_units_only_for_large_recurrent_matrices_at_one_row_or_gemm_sized_batches(monkeypatch):
    monkeypatch.delenv("NUMRNN_SCHEDULE", raising=False)
    monkeypatch.setattr(schedule, "cores", lambda: 2)
    monkeypatch.setattr(schedule, "packed_product_rows", lambda: 8)
    latency = simple_stack([CellSpec("lstm", 256)], 256)  # 1 MiB recurrent matrix
    tiny = simple_stack([CellSpec("lstm", 64)], 32)  # 64 KiB: cache-resident on one core
    small = simple_stack([CellSpec("lstm", 96)], 96)  # 144 KiB
    assert schedule.choose(latency, 100, 1) == ("units", 2)
    assert schedule.choose(tiny, 50, 1) == ("serial", 1)
    assert schedule.choose(small, 100, 2) == ("units", 2)
    assert schedule.choose(small, 20, 1) == ("units", 2)  # 2.9 MFLOP
    assert schedule.choose(small, 16, 1) == ("serial", 1)  # 2.4 MFLOP: less than a split adds per call
    assert schedule.choose(small, 100, 32) == ("batch", 2)  # GEMM-sized rows: only from one core's L2
    assert schedule.choose(latency, 100, 8) == ("batch", 2)  # 4-row packed products beat a barrier per step
    assert schedule.choose(latency, 100, 16) == ("batch", 2)  # 8-row packed products beat a 16-row GEMM
    assert schedule.choose(latency, 100, 17) == ("units", 2)  # each batch worker would run a GEMM anyway
    assert schedule.choose(latency, 100, 64) == ("units", 2)
    assert schedule.choose(latency, 100, 65) == ("batch", 2)
    assert schedule.choose(tiny, 50, 64) == ("batch", 2)
    monkeypatch.setattr(schedule, "packed_product_rows", lambda: schedule.PACKED_PRODUCT_MAX_ROWS)  # the default
    assert schedule.choose(latency, 100, 64) == ("batch", 2)  # every batch worker runs the packed product
    monkeypatch.setattr(schedule, "packed_product_rows", lambda: 0)  # BLAS for every row
    assert schedule.choose(latency, 100, 17) == ("units", 2)
    projected = simple_stack([CellSpec("lstm", 256, proj_units=128)], 256)  # two exchanges a step
    assert schedule.choose(projected, 100, 1) == ("units", 2)
    assert schedule.choose(projected, 100, 17) == ("batch", 2)  # GEMM-sized, not measured: no unit split
    monkeypatch.setattr(schedule, "packed_product_rows", lambda: schedule.PACKED_PRODUCT_MAX_ROWS)
    assert schedule.choose(projected, 20, 16) == ("units", 2)  # 273 MFLOP: the usual small-batch bands
    monkeypatch.setattr(schedule, "cores", lambda: 1)
    assert schedule.choose(latency, 100, 1) == ("serial", 1)


def test_auto_policy_splits_the_units_of_small_batches_up_to_a_few_hundred_mflop(monkeypatch):
    monkeypatch.delenv("NUMRNN_SCHEDULE", raising=False)
    monkeypatch.setattr(schedule, "cores", lambda: 2)
    monkeypatch.setattr(schedule, "packed_product_rows", lambda: schedule.PACKED_PRODUCT_MAX_ROWS)
    lstm64, lstm128 = simple_stack([CellSpec("lstm", 64)], 64), simple_stack([CellSpec("lstm", 128)], 128)
    assert schedule.choose(lstm64, 10, 4) == ("units", 2)  # 2.6 MFLOP
    assert schedule.choose(lstm64, 8, 4) == ("serial", 1)  # 2.1 MFLOP: less than a split adds per call
    assert schedule.choose(lstm128, 100, 8) == ("units", 2)  # 210 MFLOP
    assert schedule.choose(lstm128, 300, 8) == ("batch", 2)  # 629 MFLOP: worth the pool's hand-off
    assert schedule.choose(lstm128, 1000, 4) == ("units", 2)  # 1 GFLOP, but four rows
    assert schedule.choose(lstm128, 20, 32) == ("units", 2)  # 168 MFLOP
    assert schedule.choose(lstm128, 20, 33) == ("batch", 2)  # 173 MFLOP: past 100 from 33 rows
    assert schedule.choose(lstm64, 20, 64) == ("units", 2)  # 84 MFLOP
    assert schedule.choose(lstm64, 20, 65) == ("batch", 2)  # not measured past 64 rows
    assert schedule.choose(simple_stack([CellSpec("lstm", 32)], 32), 20, 16) == ("units", 2)  # 16 KiB
    tiny_units = simple_stack([CellSpec("gru", 16)], 16)  # 8 units a worker: the exchange costs more
    assert schedule.choose(tiny_units, 300, 32) == ("serial", 1)  # 14 MFLOP: the batch split's hand-off too
    assert schedule.choose(tiny_units, 300, 256) == ("batch", 2)  # 113 MFLOP
    reset_before = simple_stack([CellSpec("gru", 128, reset_after=False)], 128)  # two exchanges a step
    assert schedule.choose(reset_before, 100, 1) == ("units", 2)
    assert schedule.choose(reset_before, 200, 4) == ("units", 2)  # 157 MFLOP
    assert schedule.choose(reset_before, 100, 8) == ("batch", 2)  # 157 MFLOP: past 100 from 5 rows
    assert schedule.choose(reset_before, 20, 8) == ("units", 2)  # 31 MFLOP
    assert schedule.choose(reset_before, 10, 40) == ("batch", 2)  # 79 MFLOP: not split past 32 rows
    monkeypatch.setattr(schedule, "packed_product_rows", lambda: 8)  # BLAS past 8 rows: not measured
    assert schedule.choose(lstm128, 20, 16) == ("batch", 2)
    monkeypatch.setattr(schedule, "packed_product_rows", lambda: schedule.PACKED_PRODUCT_MAX_ROWS)
    monkeypatch.setattr(schedule, "cores", lambda: 4)  # measured on two workers only
    assert schedule.choose(lstm128, 100, 8) == ("batch", 4)
    monkeypatch.setattr(schedule, "cores", lambda: 8)  # as many batch workers as get 20 MFLOP each
    assert schedule.choose(reset_before, 100, 8) == ("batch", 7)  # 157 MFLOP
    assert schedule.choose(reset_before, 32, 8) == ("batch", 2)  # 50 MFLOP
    assert schedule.choose(reset_before, 20, 8) == ("serial", 1)  # 31 MFLOP


def test_barrier_releases_waiters_when_a_worker_aborts():
    flags = sync.new_flags(2)
    waiter = threading.Thread(target=sync.barrier, args=(flags, 0, 2, 1))
    waiter.start()
    waiter.join(timeout=0.2)
    assert waiter.is_alive()  # worker 1 never arrives: worker 0 waits
    flags[sync.ABORT] = 1
    waiter.join(timeout=10)
    assert not waiter.is_alive()


def test_barrier_waits_for_the_slowest_worker():
    flags, arrived = sync.new_flags(2), []

    def worker(me):
        sync.barrier(flags, me, 2, 1)
        arrived.append(me)

    first = threading.Thread(target=worker, args=(0,))
    first.start()
    first.join(timeout=0.2)
    assert arrived == []
    second = threading.Thread(target=worker, args=(1,))
    second.start()
    for thread in (first, second):
        thread.join(timeout=10)
    assert sorted(arrived) == [0, 1]


@pytest.fixture
def blas_at_three_threads():
    """The OpenBLAS thread-count setters, each set to 3 for the test and put back after it."""
    setters = schedule._blas_setters()
    if not setters:
        pytest.skip("no bundled OpenBLAS whose thread count numrnn sets here")
    before = [setter(3) for setter in setters]
    yield setters
    for setter, n in zip(setters, before):
        setter(n)


def test_single_threaded_blas_sets_one_thread_and_restores_the_callers_count(blas_at_three_threads):
    setters = blas_at_three_threads
    with schedule.single_threaded_blas():
        assert [setter(1) for setter in setters] == [1] * len(setters)
    assert [setter(3) for setter in setters] == [3] * len(setters)
    with pytest.raises(RuntimeError), schedule.single_threaded_blas():
        raise RuntimeError("restored on the way out of an error too")
    assert [setter(3) for setter in setters] == [3] * len(setters)


def test_overlapping_single_threaded_blas_blocks_restore_the_count_when_the_last_one_leaves(blas_at_three_threads):
    # OpenBLAS's pthreads builds keep one count for the process: the workers of one call share it, so the
    # first block out must not put the caller's count back while another still runs.
    setters = blas_at_three_threads
    inside, leave = threading.Event(), threading.Event()

    def other_worker():
        with schedule.single_threaded_blas():
            inside.set()
            leave.wait(10)

    thread = threading.Thread(target=other_worker)
    try:
        first = schedule.single_threaded_blas()
        first.__enter__()
        thread.start()
        assert inside.wait(10)
        first.__exit__(None, None, None)  # the first block out, the other still inside
        assert [setter(1) for setter in setters] == [1] * len(setters)
        leave.set()
        thread.join(10)
        assert [setter(3) for setter in setters] == [3] * len(setters)
    finally:
        leave.set()


def test_auto_policy_times_both_schedules_for_calls_at_the_edge_of_the_splits_gain(monkeypatch):
    monkeypatch.delenv("NUMRNN_SCHEDULE", raising=False)
    monkeypatch.setattr(schedule, "cores", lambda: 2)
    monkeypatch.setattr(schedule, "packed_product_rows", lambda: schedule.PACKED_PRODUCT_MAX_ROWS)
    tiny = simple_stack([CellSpec("lstm", 64)], 32)  # 64 KiB, 49 kFLOP a step
    schedule_, workers, measured = schedule.Scheduler(tiny).plan(50, 1)
    assert (schedule_, workers) == ("serial", 1)
    assert measured.options == (("serial", 1), ("units", 2))
    assert schedule.Scheduler(tiny).plan(50, 2)[2].options == (("serial", 1), ("units", 2))  # 4.9 MFLOP: no batch
    assert schedule.Scheduler(tiny).plan(11, 1)[2].options == (("serial", 1), ("units", 2))  # 0.54 MFLOP
    assert schedule.Scheduler(tiny).plan(10, 1)[2] is None  # 0.49 MFLOP
    assert isinstance(schedule.Scheduler(tiny).plan(50, 3)[2], schedule.CloseCallsChoice)  # past the timed rows
    assert schedule.Scheduler(tiny).plan(129, 1)[2] is None  # BLAS projects the input
    assert schedule.Scheduler(simple_stack([CellSpec("lstm", 48)], 32)).plan(100, 1)[2] is None  # 36 KiB
    assert schedule.Scheduler(simple_stack([CellSpec("lstm", 72)], 32)).plan(100, 1)[2] is None  # 36 units a worker
    assert schedule.Scheduler(simple_stack([CellSpec("lstm", 64)], 32, dtype="float64")).plan(50, 1)[2] is None
    latency = schedule.Scheduler(simple_stack([CellSpec("lstm", 256)], 256)).plan(100, 1)
    assert latency[:2] == ("units", 2)  # while its calls come close; serial after a pause
    assert (latency[2].split, latency[2].otherwise) == (("units", 2), ("serial", 1))
    # 96 KiB, 48 units a worker: timed but for its projection, whose split sums may differ from serial's
    assert schedule.Scheduler(simple_stack([CellSpec("lstm", 96, proj_units=64)], 32)).plan(50, 1)[2] is None
    monkeypatch.setenv("NUMRNN_SCHEDULE", "serial")
    assert schedule.Scheduler(tiny).plan(50, 1) == ("serial", 1, None)
    monkeypatch.delenv("NUMRNN_SCHEDULE")
    monkeypatch.setattr(schedule, "packed_product_rows", lambda: 0)  # BLAS takes every product
    assert schedule.Scheduler(tiny).plan(50, 1)[2] is None
    monkeypatch.setattr(schedule, "cores", lambda: 1)
    assert schedule.Scheduler(tiny).plan(50, 1) == ("serial", 1, None)


def _unwarmed_choice(*options) -> schedule.MeasuredChoice:
    """A MeasuredChoice of ``options`` with one untimed call an option a round, as calls of a warm-up or longer
    get (test_measured_choice_warms_each_option_before_timing_it)."""
    choice = schedule.MeasuredChoice(options)
    choice.WARM_SECONDS = 0.0
    return choice


def test_measured_choice_times_each_option_then_runs_the_faster_and_times_both_again_every_round():
    serial, units = ("serial", 1), ("units", 2)
    choice = _unwarmed_choice(serial, units)
    samples, round_calls = choice.SAMPLES, choice.ROUND_CALLS
    clock, seconds = 100.0, {serial: 3.0, units: 2.0}

    def call():
        option, timed = choice.pick(clock)
        if timed:
            choice.record(option, seconds[option])
        return option, timed

    assert call() == (serial, True)  # no call before it: the static option, timed to learn when it ends
    assert choice.typical() == {}  # and not counted
    first_round = [call() for _ in range(2 * (samples + 1))]
    assert first_round == [(serial, False)] + [(serial, True)] * samples + [(units, False)] + [(units, True)] * samples
    assert choice.typical() == {serial: 3.0, units: 2.0}
    assert [call() for _ in range(2 * round_calls)] == [(units, False)] * 2 * round_calls  # no round: too soon
    clock += 2 * choice.ROUND_SECONDS
    assert [call() for _ in range(4)] == [(serial, False), (serial, True), (units, False), (units, True)]
    clock += 2 * choice.ROUND_SECONDS
    assert [call() for _ in range(round_calls - 1)] == [(units, False)] * (round_calls - 1)  # too few calls
    assert call() == (serial, False)  # the round's first call
    assert [call() for _ in range(3)] == [(serial, True), (units, False), (units, True)]

    def round_():
        nonlocal clock
        clock += 2 * choice.ROUND_SECONDS
        return [option for option, _ in (call() for _ in range(round_calls + 3))][-4:]

    seconds[units] = 300.0  # a split call whose partner's core was busy: left out, not a median's middle
    assert round_() == [serial, serial, units, units]
    seconds[units] = 20.0
    assert round_() == [serial, serial, units, units]
    assert choice.typical()[units] == 2.0  # 300 and 20 are over three times the 2.0 still among the last three
    assert choice.best == units
    seconds[units] = 4.0  # the host moved the threads: the split is slower now
    assert round_() == [serial, serial, units, units]  # 300, 20, 4: both over three times 4 left out
    assert choice.best == serial
    seconds[units] = 2.0  # and faster again: two calls tell
    assert round_() == [units, units, serial, serial]  # the other option first
    assert choice.best == serial
    assert round_() == [units, units, serial, serial]
    assert choice.typical()[units] == 2.0
    assert choice.best == units


def _clocked_calls(choice: schedule.MeasuredChoice, seconds: dict):
    """``call(ran=True, pause=0.0)``: one call of ``choice`` on a clock that each call advances by its option's
    ``seconds`` (after ``pause``), reported as ``Kernel.__call__`` reports it (``ran``: whether it ran as picked);
    it returns ``(option, timed)``."""
    clock = 0.0

    def call(ran=True, pause=0.0):
        nonlocal clock
        clock += pause
        option, timed = choice.pick(clock)
        if timed:
            choice.record(option, seconds[option], counted=ran)
        elif not ran:
            choice.ran_otherwise(option)
        clock += seconds[option]
        return option, timed

    return call


def test_measured_choice_warms_each_option_before_timing_it():
    # Short calls: an option's calls in a round stay untimed until WARM_SECONDS have passed since its first
    # (the split's partner runs slow for a while after serial calls).
    serial, units = ("serial", 1), ("units", 2)
    choice = schedule.MeasuredChoice((serial, units))
    warm, samples = choice.WARM_SECONDS, choice.SAMPLES
    seconds = {serial: warm / 3.5, units: warm / 2.5}  # warmed in 4 and 3 calls
    call = _clocked_calls(choice, seconds)
    assert call() == (serial, True)  # no call before it: the static option, outside the rounds
    first_round = [call() for _ in range(4 + samples + 3 + samples)]
    assert first_round == [(serial, False)] * 4 + [(serial, True)] * samples + [(units, False)] * 3 + [
        (units, True)] * samples
    assert choice.typical() == seconds and choice.best == serial
    calls = [call() for _ in range(round(2 * choice.ROUND_SECONDS / seconds[serial]))]
    start = calls.index((units, False))  # the next round: the other option first
    assert calls[:start] == [(serial, False)] * start
    assert calls[start:start + 9] == [(units, False)] * 3 + [(units, True)] + [(serial, False)] * 4 + [
        (serial, True)]
    assert calls[start + 9:] == [(serial, False)] * (len(calls) - start - 9)


def test_a_warm_up_starts_again_after_a_call_that_ran_otherwise_or_a_pause():
    # An untimed split call that declined partners still waking (or compiled) warmed nothing, nor did the calls
    # before a pause: the option's warm-up starts again at its next call in the round.
    serial, units = ("serial", 1), ("units", 2)
    choice = schedule.MeasuredChoice((serial, units))
    step, samples = choice.WARM_SECONDS / 3.5, choice.SAMPLES  # warmed in 4 calls
    call = _clocked_calls(choice, {serial: step, units: step})
    assert call() == (serial, True)  # no call before it: the static option, outside the rounds
    assert [call() for _ in range(4 + samples)] == [(serial, False)] * 4 + [(serial, True)] * samples
    assert call(ran=False) == (units, False)  # the split's first call of the round declined its partners
    assert [call() for _ in range(2)] == [(units, False)] * 2
    assert call(pause=10 * schedule.CLOSE_CALL_SECONDS) == (serial, True)  # after a pause, outside the round
    assert [call() for _ in range(5)] == [(units, False)] * 4 + [(units, True)]
    assert call(ran=False) == (units, True)  # a timed call that ran otherwise: put back, the warm-up again
    assert [call() for _ in range(5)] == [(units, False)] * 4 + [(units, True)]


def test_a_timed_call_that_ran_otherwise_goes_back_to_its_round():
    # A round's timed split call whose partners were still waking ran serial: its time is not the split's,
    # and the next call takes its place, up to RETRIES times a round.
    serial, units = ("serial", 1), ("units", 2)
    choice = _unwarmed_choice(serial, units)
    clock = 100.0

    def call(split_declined=False):
        option, timed = choice.pick(clock)
        if timed:
            choice.record(option, 2.0 if option == units else 3.0, counted=not (split_declined and option == units))
        return option, timed

    call()  # after a pause: the static option, outside the rounds
    assert [call() for _ in range(5)] == [(serial, False)] + [(serial, True)] * 3 + [(units, False)]
    assert call(split_declined=True) == (units, True)  # put back
    retried = [call(split_declined=True) for _ in range(choice.RETRIES - 1)]
    assert retried == [(units, True)] * (choice.RETRIES - 1)
    assert [call() for _ in range(3)] == [(units, True)] * 3  # the last retry, then the round's two left
    assert choice.typical() == {serial: 3.0, units: 2.0}
    assert call() == (units, False)  # the round is over: untimed calls of the best
    clock += 2 * choice.ROUND_SECONDS
    calls = [call(split_declined=True) for _ in range(2 * choice.ROUND_CALLS + choice.RETRIES)]
    start = calls.index((serial, False))  # the next round
    assert calls[start:start + choice.RETRIES + 5] == [(serial, False), (serial, True), (units, False)] + [
        (units, True)] * (choice.RETRIES + 1) + [(units, False)]  # its timed split call and RETRIES retries


def test_measured_choice_runs_the_static_option_for_calls_after_a_pause():
    # The partners sleep a few milliseconds after a split call: a call that comes CLOSE_CALL_SECONDS or
    # more after the last one ended takes the static option, outside the rounds, timed but not counted.
    serial, units = ("serial", 1), ("units", 2)
    choice = _unwarmed_choice(serial, units)
    clock, seconds = 0.0, {serial: 2e-4, units: 1e-4}

    def call(pause=0.0, timing=True):
        nonlocal clock
        clock += pause
        option, timed = choice.pick(clock)
        if timed and timing:
            choice.record(option, seconds[option])
        clock += seconds[option]
        return option, timed

    assert call() == (serial, True)
    assert [call()[0] for _ in range(2 * (choice.SAMPLES + 1))] == [serial] * 4 + [units] * 4  # the first round
    assert choice.best == units and call() == (units, False)
    typical = choice.typical()
    pause = schedule.CLOSE_CALL_SECONDS
    assert call(pause) == (serial, True) and call() == (units, False)  # after a pause, then close again
    assert call(pause - 1e-4) == (units, False)  # still close: the last call's end counts, not its start
    assert call(pause, timing=False) == (serial, True)  # a call that did not run as picked (no record) ...
    assert call(pause - seconds[serial]) == (units, False)  # ... is taken to end after its option's typical time
    assert choice.typical() == typical  # none of these counted


#: A stack in the measured zone on its own: 64 and 110 KiB recurrent matrices, 32 and 48 units a worker.
MEASURED = simple_stack([CellSpec("lstm", 64), CellSpec("gru", 96)], 32, masking="carry")


def _measured_kernel(monkeypatch, batch: int):
    """:data:`MEASURED`'s kernel with a fresh scheduler on two cores, ``NUMRNN_SCHEDULE`` unset."""
    if schedule.packed_product_rows() < batch:
        pytest.skip("BLAS takes the per-step products here: such calls are not measured")
    monkeypatch.delenv("NUMRNN_SCHEDULE", raising=False)
    monkeypatch.setattr(schedule, "cores", lambda: 2)
    kernel = get_kernel(MEASURED)
    monkeypatch.setattr(kernel, "_scheduler", schedule.Scheduler(MEASURED))
    monkeypatch.setattr(schedule, "CLOSE_CALL_SECONDS", 60.0)  # the calls come close, whatever packing them takes
    monkeypatch.setattr(schedule.MeasuredChoice, "WARM_SECONDS", 0.0)  # one untimed call an option a round
    return kernel


def _split_calls(monkeypatch) -> list:
    """The split kernels' functions that the partners ran, one per split call from now on (however it got there).

    No call declines sleeping partners (``Partners.run``'s ``decline``): these
    tests count split calls, and whether the partners are awake when a call
    comes depends on the host (test_partners covers the declines).
    """
    calls, run = [], Partners.run

    def spy(team, function, lead, workers, decline=False):
        calls.append(function)
        return run(team, function, lead, workers)

    monkeypatch.setattr(Partners, "run", spy)
    return calls


@pytest.mark.parametrize("batch", [1, 2])
def test_measured_calls_run_both_schedules_with_the_same_results(batch, monkeypatch):
    # A measured shape runs the static choice and the unit split call by call: the results must not
    # depend on which ran (every output sums its terms in the same order on both), bit for bit.
    kernel = _measured_kernel(monkeypatch, batch)
    assert kernel._scheduler.plan(24, batch)[2] is not None
    splits = _split_calls(monkeypatch)
    rng = np.random.default_rng(11)
    weights = fan_in_weights(MEASURED, rng)
    x = rng.standard_normal((24, batch, MEASURED.input_size)).astype(np.float32)
    mask = rng.random((24, batch)) > 0.3
    initial = [tuple(rng.standard_normal((batch, n)).astype(np.float32) for n in c.state_sizes)
               for c in MEASURED.cells]
    expected, expected_states = run_stack(MEASURED, weights, x, mask=mask, initial_states=initial)
    first, first_states = _run_kernel(MEASURED, weights, x, mask, None, initial)
    assert_matches_reference(MEASURED, first, first_states, expected, expected_states)
    for _ in range(2 * schedule.MeasuredChoice.SAMPLES + 2):
        assert_bit_equal(*_run_kernel(MEASURED, weights, x, mask, None, initial), first, first_states)
    assert len(splits) >= schedule.MeasuredChoice.SAMPLES + 1  # the split really ran
    assert set(kernel._scheduler.plan(24, batch)[2].typical()) == set(kernel._scheduler.plan(24, batch)[2].options)


def test_measured_calls_that_find_the_split_busy_time_only_the_static_choice(monkeypatch):
    # Another thread's split call holds the partners: a measured call picked for the split runs the
    # static choice instead, and its time must not count as the split's.
    kernel = _measured_kernel(monkeypatch, 1)
    rng = np.random.default_rng(12)
    weights = fan_in_weights(MEASURED, rng)
    x = rng.standard_normal((24, 1, MEASURED.input_size)).astype(np.float32)
    mask = rng.random((24, 1)) > 0.3
    initial = [tuple(np.zeros((1, n), np.float32) for n in c.state_sizes) for c in MEASURED.cells]
    held, release = threading.Event(), threading.Event()

    def hold_split_lock():
        with kernels._SPLIT_LOCK:
            held.set()
            release.wait(30)

    holder = threading.Thread(target=hold_split_lock)
    holder.start()
    try:
        assert held.wait(30)
        for _ in range(2 * schedule.MeasuredChoice.SAMPLES + 2):
            _run_kernel(MEASURED, weights, x, mask, None, initial)
    finally:
        release.set()
        holder.join(30)
    measured = kernel._scheduler.plan(24, 1)[2]
    assert set(measured.typical()) == {("serial", 1)}
    assert measured.best == ("serial", 1)


def test_close_calls_split_and_spaced_ones_take_the_batch_rule(monkeypatch):
    units, serial = ("units", 2), ("serial", 1)
    choice = schedule.CloseCallsChoice(units, serial)
    assert choice.pick(10.0) == (serial, True)  # the first call: the partners are asleep
    choice.record(serial, 0.001)
    assert choice.pick(10.0025) == (units, True)  # 1.5 ms after the last call ended
    choice.record(units, 0.001)
    assert choice.pick(10.0035 + schedule.CLOSE_CALL_SECONDS) == (serial, True)
    choice.record(serial, 0.001)
    monkeypatch.setattr(schedule, "CLOSE_CALL_SECONDS", 0.0)
    assert choice.pick(10.008) == (serial, True)  # 0.5 ms after: not close when nothing is


def _static_calls_after_pauses(choice, times, clock: float = 10.0) -> float:
    """A call after a pause of ``choice``'s static option for each of ``times`` (its seconds); the clock after."""
    for seconds in times:
        clock += 10 * schedule.CLOSE_CALL_SECONDS
        option, _ = choice.pick(clock)
        assert option == choice._static
        choice.record(option, seconds)
        clock += seconds
    return clock + 10 * schedule.CLOSE_CALL_SECONDS


@pytest.mark.parametrize("static", [("serial", 1), ("batch", 2)])
def test_long_calls_split_after_a_pause(static):
    # Waking the partners costs less than the split saves on a long call; a fresh sample of the static option
    # now and then lets a shape whose calls the host held up become short again. Only a serial static option
    # declines partners still asleep (a batch split's threads would run beside them).
    units, declines = ("units", 2), static == ("serial", 1)
    short, long = 1e-3, 0.019
    samples = schedule.CloseCallsChoice.STATIC_SAMPLES
    for make in (lambda: schedule.CloseCallsChoice(units, static), lambda: schedule.MeasuredChoice((static, units))):
        choice = make()
        if isinstance(choice, schedule.MeasuredChoice):
            choice.best, choice._round = units, []  # past its first round, the split timed faster
        clock = _static_calls_after_pauses(choice, [short] * samples)
        assert not choice.long_calls and choice.pick(clock)[0] == static
        choice.record(static, short)
        clock = _static_calls_after_pauses(choice, [long] * samples, clock + short)
        assert choice.long_calls and choice.declines == declines
        for _ in range(3):  # after pauses, within the refresh time: split, waiting for the partners
            assert choice.pick(clock)[0] == units and not choice.declines
            choice.record(units, long / 2)
            clock += long / 2 + 10 * schedule.CLOSE_CALL_SECONDS
        clock += schedule.STATIC_REFRESH_SECONDS
        _static_calls_after_pauses(choice, [short], clock)  # the fresh sample: a short call
        assert not choice.long_calls and choice.declines == declines


def test_a_batch_split_static_option_counts_shorter_calls_as_long():
    # The batch split wakes a thread of its own after a pause: the unit split pays where the calls are shorter.
    assert schedule.PAUSE_SPLIT_BATCH_SECONDS < 3e-3 < schedule.PAUSE_SPLIT_SECONDS
    for static, long in [(("serial", 1), False), (("batch", 2), True)]:
        choice = schedule.CloseCallsChoice(("units", 2), static)
        clock = _static_calls_after_pauses(choice, [3e-3] * choice.STATIC_SAMPLES)
        assert choice.long_calls == long
        assert choice.pick(clock)[0] == (("units", 2) if long else static)


def test_one_slow_call_does_not_make_a_shape_long():
    # The shortest of the static option's last calls counts: a call the host held up decides nothing, and the
    # split's calls, or calls that ran otherwise than picked, say nothing of the static option's.
    units, serial = ("units", 2), ("serial", 1)
    choice = schedule.CloseCallsChoice(units, serial)
    ended = _static_calls_after_pauses(choice, [1e-3, 0.019, 0.019]) - 10 * schedule.CLOSE_CALL_SECONDS
    assert not choice.long_calls
    assert choice.pick(ended)[0] == units  # close calls split
    choice.record(units, 0.019)
    assert choice.pick(ended + 0.019)[0] == units
    choice.record(units, 0.019, counted=False)
    assert not choice.long_calls
    clock = ended + 0.038 + 10 * schedule.CLOSE_CALL_SECONDS
    assert choice.pick(clock)[0] == serial
    choice.record(serial, 0.019, counted=False)  # ran otherwise (a compile): no sample
    assert not choice.long_calls
    clock = _static_calls_after_pauses(choice, [0.019], clock + 0.019)
    assert choice.long_calls and choice.pick(clock)[0] == units


def _gaps(choice, calls, start: float = 10.0) -> list:
    """``choice``'s :attr:`wake` at each of ``calls``, ``(gap before the call, its seconds)``, from ``start``."""
    clock, wakes = start, []
    for gap, seconds in calls:
        clock += gap
        option, timed = choice.pick(clock)
        wakes.append(choice.wake)
        if timed:
            choice.record(option, seconds)
        clock += seconds
    return wakes


def test_a_call_after_a_pause_wakes_the_partners_where_calls_come_in_bursts():
    # A burst: a call after a pause, then close ones. The next burst's first call wakes the partners for its
    # second; calls that come evenly spaced (two after a pause in a row) wake none.
    units, serial = ("units", 2), ("serial", 1)
    pause, close = 10 * schedule.CLOSE_CALL_SECONDS, 0.0
    burst = [(pause, 1e-3), (close, 1e-3), (close, 1e-3)]
    assert _gaps(schedule.CloseCallsChoice(units, serial), burst * 2) == [None] * 3 + [units, None, None]
    spaced = [(pause, 1e-3)] * 3
    # The first spaced call still takes the burst before it for one, and wakes them; the others do not.
    assert _gaps(schedule.CloseCallsChoice(units, serial), burst + spaced + burst) == [None] * 3 + [units] + [None] * 5
    # Where the static option runs on the batch rule's threads, the partners would take their cores: none, and a
    # close call with the partners asleep waits for them (it does not decline them).
    batch_static = schedule.CloseCallsChoice(units, ("batch", 2))
    assert _gaps(batch_static, burst * 2) == [None] * 6
    assert not batch_static.declines and schedule.CloseCallsChoice(units, serial).declines


def test_a_measured_shape_wakes_the_partners_only_while_the_split_is_its_best():
    units, serial = ("units", 2), ("serial", 1)
    choice = schedule.MeasuredChoice((serial, units))
    pause = 10 * schedule.CLOSE_CALL_SECONDS
    burst = [(pause, 1e-3)] + [(0.0, 1e-3)] * 3
    assert _gaps(choice, burst * 2)[4] is None  # the best is still the static option
    choice.best = units
    assert _gaps(choice, burst, start=100.0)[0] == units
    batch_static = schedule.MeasuredChoice((("batch", 2), units))
    batch_static.best = units
    assert _gaps(batch_static, burst * 2)[4] is None and not batch_static.declines


#: A small batch's stack: LSTM(48) (36 KiB, 24 units a worker) with lengths, then GRU(40) (19 KiB).
SMALL_BATCH = simple_stack([CellSpec("lstm", 48), CellSpec("gru", 40)], 24, masking="lengths")


def _small_batch_calls(monkeypatch, batch: int, seed: int):
    """:data:`SMALL_BATCH`'s kernel with a fresh scheduler on two cores (every call after the first close), and
    a function that makes one call of ``batch`` rows and checks it against the oracle."""
    if schedule.packed_product_rows() < batch:
        pytest.skip("BLAS takes the per-step products here: small batches take the batch rule")
    monkeypatch.delenv("NUMRNN_SCHEDULE", raising=False)
    monkeypatch.setattr(schedule, "cores", lambda: 2)
    monkeypatch.setattr(schedule, "CLOSE_CALL_SECONDS", 60.0)
    kernel = get_kernel(SMALL_BATCH)
    monkeypatch.setattr(kernel, "_scheduler", schedule.Scheduler(SMALL_BATCH))
    rng = np.random.default_rng(seed)
    weights = fan_in_weights(SMALL_BATCH, rng)
    x = rng.standard_normal((30, batch, SMALL_BATCH.input_size)).astype(np.float32)
    lengths = rng.integers(1, 31, batch).astype(np.int64)
    initial = [tuple(rng.standard_normal((batch, n)).astype(np.float32) for n in c.state_sizes)
               for c in SMALL_BATCH.cells]
    expected, expected_states = run_stack(SMALL_BATCH, weights, x, lengths=lengths, initial_states=initial)
    assert isinstance(kernel._scheduler.plan(30, batch)[2], schedule.CloseCallsChoice)

    def call():
        got, got_states = _run_kernel(SMALL_BATCH, weights, x, None, lengths, initial)
        assert_matches_reference(SMALL_BATCH, got, got_states, expected, expected_states)

    return kernel, call


@pytest.mark.parametrize("batch", [8, 32])
def test_a_small_batch_splits_its_units_when_its_calls_come_close(batch, monkeypatch):
    kernel, call = _small_batch_calls(monkeypatch, batch, seed=batch)
    splits = _split_calls(monkeypatch)
    for count in range(3):
        call()
        assert len(splits) == count  # the first call ran the batch rule's schedule, the later ones split
    monkeypatch.setattr(schedule, "CLOSE_CALL_SECONDS", 0.0)  # calls far apart
    call()
    assert len(splits) == 2


def test_a_first_call_leaves_its_shape_ended_when_it_returns(monkeypatch):
    # The first call compiles, then runs itself again through __call__, which records its end; the outer call
    # recorded its own time, compile included, from the inner call's start: an end in the future, so that the
    # next call counted as close after a real pause.
    kernel, call = _small_batch_calls(monkeypatch, 8, seed=5)
    compile_for = kernel._compile_for
    monkeypatch.setattr(kernel, "compile_seconds", None)
    monkeypatch.setattr(kernel, "_compile_for", lambda args: time.sleep(0.2) or compile_for(args))
    call()
    assert kernel.compile_seconds >= 0.2
    assert kernel._scheduler.plan(30, 8)[2]._ends_at <= time.perf_counter()


def test_a_close_call_declines_sleeping_partners_and_a_burst_wakes_them(monkeypatch):
    # A guarded shape's close call that finds the partners asleep runs without them (the batch rule's
    # schedule) and wakes them for the next one, rather than wait while the host wakes their CPU; and a
    # burst's first call wakes them itself.
    kernel, call = _small_batch_calls(monkeypatch, 8, seed=3)
    choice = kernel._scheduler.plan(30, 8)[2]
    assert choice.otherwise == ("serial", 1)
    # Partners evicted below stand for partners asleep long since, not ones a declined call has just woken.
    monkeypatch.setattr(partners_module, "SLEPT_AGAIN_SECONDS", 0.0)
    stood_by, stand_by = [], Partners.stand_by
    monkeypatch.setattr(Partners, "stand_by", lambda team, function, *a: stood_by.append(function)
                        or stand_by(team, function, *a))
    call(), call()  # after a pause (serial), then close: the split compiled, its shape's buffers kept
    team, split = kernels._partners(), kernel._split_kernels[choice.split]
    assert split._shared
    stood_by.clear()  # the close call may have found the partners asleep already
    sync.evict_partners(team.ctl, team.workers)
    declined = team.declined_calls
    call()
    assert team.declined_calls == declined + 1 and stood_by == [split.function]
    sync.evict_partners(team.ctl, team.workers)
    monkeypatch.setattr(schedule, "CLOSE_CALL_SECONDS", 0.0)  # calls far apart ...
    choice._bursts = True  # ... in a shape whose calls come in bursts: the call wakes the partners
    call()
    assert choice.wake == choice.split and stood_by == [split.function] * 2
    assert team.declined_calls == declined + 1
