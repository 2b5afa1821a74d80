"""The input projection on AMX tiles (``numrnn.runtime.amx``): exact packing, float32 accuracy, every schedule alike.

A float32 matrix is packed as the three bfloat16 parts whose sum it is;
the packing and its inverse run anywhere. The tile product itself runs only
where the CPU has AMX-BF16 and Linux grants the tile state: those tests
skip elsewhere (``amx.why_not()`` says why).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from reference import run_stack
from test_grid import assert_bit_equal, assert_matches_reference, fan_in_weights

from codegen.cells import pack, packed_names, split_packed, tiles_name
from codegen.spec import BlockSpec, CellSpec, DirectionSpec, StackSpec, simple_stack
from codegen.targets.cpu import TILE_MIN_STEPS, layers_of, stages_past
from numrnn import bench
from numrnn.runtime import amx, get_kernel, pack_weights

ON_TILES = pytest.mark.skipif(amx.why_not() is not None, reason=f"no AMX tile product here: {amx.why_not()}")

#: Forward and reversed LSTM(128) on 256 inputs: input kernels of 256 x 512, the smallest that are tiled.
BIDIR = StackSpec(blocks=(BlockSpec((DirectionSpec((CellSpec("lstm", 128),)),
                                     DirectionSpec((CellSpec("lstm", 128),), "full")), "concat"),), input_size=256)


def _awkward(rng, shape) -> np.ndarray:
    """Normal values with zeros, negative zeros, huge and tiny magnitudes among them.

    The tiniest whose three parts are all normal numbers (2**-110 up): below,
    a part under 2**-126 is a subnormal, which the tile unit reads as zero
    (an error under 1.2e-38).
    """
    matrix = rng.standard_normal(shape).astype(np.float32)
    flat = matrix.reshape(-1)
    flat[::7] = 0.0
    flat[1::11] = -0.0
    flat[2::13] = np.float32(2.0 ** -110)
    flat[3::17] = np.float32(3.4e38)
    flat[4::19] = np.float32(-3e-32)
    return matrix


@pytest.mark.parametrize("shape", [(37, 45), (256, 512), (300, 520), (1, 1)])
def test_tiles_hold_the_matrix_exactly(shape):
    matrix = _awkward(np.random.default_rng(sum(shape)), shape)
    tiles = amx.pack_tiles(matrix)
    assert tiles.dtype == np.float32 and tiles.ctypes.data % 64 == 0
    np.testing.assert_array_equal(amx.untile(tiles, *shape), matrix)  # to the bit (a zero's sign aside)


def test_a_process_without_tiles_computes_from_them_in_float32():
    # What a kernel handed tiles packed elsewhere calls where the tiles cannot run: the product of the matrix
    # they hold (as numpy's float32 dot computes it), not zeros or garbage.
    rng = np.random.default_rng(5)
    a = rng.standard_normal((40, 300)).astype(np.float32)
    matrix = rng.standard_normal((300, 520)).astype(np.float32)
    tiles = amx.pack_tiles(matrix)
    out = np.full((40, 520), np.nan, np.float32)
    amx._product_without_tiles(a.ctypes.data, 40, 300, tiles.ctypes.data, tiles.size, out.ctypes.data, 40, 520)
    np.testing.assert_array_equal(out, a @ matrix)


def test_only_large_float32_kernels_are_tiled(monkeypatch):
    monkeypatch.setattr(amx, "enabled", lambda: True)
    monkeypatch.setattr(amx, "pack_tiles", lambda matrix: np.ones(1, matrix.dtype))
    big = np.zeros((amx.MIN_INPUTS, amx.MIN_OUTPUTS), np.float32)
    assert amx.tiles_for(big).size == 1
    assert amx.tiles_for(big.astype(np.float64)).size == 0
    assert amx.tiles_for(big[:-1]).size == 0 and amx.tiles_for(big[:, :-1]).size == 0
    assert amx.tiles_for(big[:-1], wanted=True).size == 1  # a unit split worker's slice of a tiled kernel
    assert amx.tiles_for(big, wanted=False).size == 0
    monkeypatch.setattr(amx, "enabled", lambda: False)
    assert amx.tiles_for(big).size == 0
    # A worker's slice of a kernel tiled elsewhere is tiled here too: every schedule then runs the stand-in.
    assert amx.tiles_for(big, wanted=True).size == 1


def test_numrnn_amx_chooses(monkeypatch):
    monkeypatch.setenv("NUMRNN_AMX", "0")
    assert not amx.enabled()
    monkeypatch.setenv("NUMRNN_AMX", "sometimes")
    with pytest.raises(ValueError, match="NUMRNN_AMX must be 'auto', '0' or '1'; got 'sometimes'"):
        amx.enabled()
    monkeypatch.setitem(amx._state, "why_not", "the CPU has no AMX-BF16")
    monkeypatch.setenv("NUMRNN_AMX", "auto")
    assert not amx.enabled()
    monkeypatch.setenv("NUMRNN_AMX", "1")
    with pytest.raises(RuntimeError, match="NUMRNN_AMX=1, but .* cannot run here: the CPU has no AMX-BF16"):
        amx.enabled()


def _operands(data: str, rows: int, depth: int, columns: int, rng):
    if data == "normal":
        return (rng.standard_normal((rows, depth)).astype(np.float32),
                (rng.standard_normal((depth, columns)) / np.sqrt(depth)).astype(np.float32))
    if data == "positive":  # every term of one sign: parts cut short would all pull one way
        return rng.random((rows, depth)).astype(np.float32), rng.random((depth, columns)).astype(np.float32)
    value = np.uint32(0x3F80FFFF).view(np.float32)  # 1 + 2**-8 - 2**-23: large middle and low parts
    return np.full((rows, depth), value, np.float32), np.full((depth, columns), value, np.float32)


@ON_TILES
@pytest.mark.parametrize("data", ["normal", "positive", "constant"])
@pytest.mark.parametrize("rows, depth, columns", [(37, 300, 520), (256, 512, 2048), (300, 257, 1000), (1, 256, 512)])
def test_tile_product_is_as_close_to_float64_as_sgemm(rows, depth, columns, data):
    a, b = _operands(data, rows, depth, columns, np.random.default_rng(rows + depth))
    out = np.full((rows, columns), np.nan, np.float32)
    amx.tile_product(a, amx.pack_tiles(b), out)
    exact = a.astype(np.float64) @ b.astype(np.float64)
    tile_error, blas_error = np.abs(out - exact).max(), np.abs(a @ b - exact).max()
    assert tile_error <= 2 * blas_error + 1e-7, (tile_error, blas_error)


@ON_TILES
def test_single_products_are_within_float32_rounding_of_the_exact_one():
    # One term a sum (k = 1): the six part products, added in float32 (five roundings), and what they leave
    # out stay within a few of float32's roundings of the product (2**-24), and do not lean one way. Parts
    # cut short (the significand's bytes) left out up to 2**-21, all toward zero: 4.7e-7, mean -4.6e-8 here.
    rng = np.random.default_rng(14)
    bits = np.concatenate([[0x3F80FFFF, 0x3FFFFFFF, 0x3F807FFF, 0xBF80FFFF],
                           rng.integers(0x3F000000, 0x40000000, 60)]).astype(np.uint32)
    values = bits.view(np.float32)
    a, b = values[:, None].copy(), values[None, :].copy()
    out = np.empty((values.size, values.size), np.float32)
    amx.tile_product(a, amx.pack_tiles(b), out)
    error = out / (a.astype(np.float64) * b.astype(np.float64)) - 1
    assert np.abs(error).max() <= 2.0 ** -22 and abs(error.mean()) <= 2.0 ** -27


@ON_TILES
def test_rows_with_infinities_or_nans_come_out_as_in_float32():
    rng = np.random.default_rng(8)
    a = rng.standard_normal((40, 300)).astype(np.float32)
    a[3, 7], a[5, 0], a[9, 2], a[33, 299] = np.inf, -np.inf, np.nan, np.inf
    b = rng.standard_normal((300, 520)).astype(np.float32)
    out = np.empty((40, 520), np.float32)
    amx.tile_product(a, amx.pack_tiles(b), out)
    expected = a @ b
    np.testing.assert_array_equal(np.isnan(out), np.isnan(expected))
    np.testing.assert_array_equal(np.sign(out[np.isinf(expected)]), np.sign(expected[np.isinf(expected)]))
    finite = ~np.isin(np.arange(40), [3, 5, 9, 33])
    np.testing.assert_allclose(out[finite], expected[finite], rtol=0, atol=1e-4)


def test_tile_product_refuses_what_it_cannot_run(monkeypatch):
    a, out = np.zeros((4, 40), np.float32), np.zeros((4, 50), np.float32)
    monkeypatch.setitem(amx._state, "why_not", None)  # the size is checked before any tile runs
    with pytest.raises(ValueError, match=r"tiles must be 6144 float32 values \(pack_tiles of a 40 x 50 matrix\)"):
        amx.tile_product(a, np.zeros(10, np.float32), out)
    monkeypatch.setitem(amx._state, "why_not", "the CPU has no AMX-BF16")
    with pytest.raises(RuntimeError, match="tile_product: the AMX tile product cannot run here: the CPU has no"):
        amx.tile_product(a, amx.pack_tiles(np.zeros((40, 50), np.float32)), out)


@ON_TILES
def test_each_output_sums_alike_whatever_rows_and_columns_come_with_it():
    # So a batch split (rows) and a unit split (columns of each gate) give the whole product's bits.
    rng = np.random.default_rng(9)
    a = rng.standard_normal((200, 300)).astype(np.float32)
    b = rng.standard_normal((300, 600)).astype(np.float32)
    whole = np.empty((200, 600), np.float32)
    amx.tile_product(a, amx.pack_tiles(b), whole)
    rows = np.empty((45, 600), np.float32)
    amx.tile_product(np.ascontiguousarray(a[150:195]), amx.pack_tiles(b), rows)
    np.testing.assert_array_equal(rows, whole[150:195])
    columns = np.r_[5:70, 300:333, 599]
    part = np.empty((200, columns.size), np.float32)
    amx.tile_product(a, amx.pack_tiles(np.ascontiguousarray(b[:, columns])), part)
    np.testing.assert_array_equal(part, whole[:, columns])


def _call(spec, packed, x, initial, schedule, monkeypatch, lengths=None):
    """The kernel's output and states (per cell, two: LSTMs) under ``schedule``."""
    monkeypatch.setenv("NUMRNN_SCHEDULE", schedule)
    states = [np.array(s) for cell_states in initial for s in cell_states]
    out = get_kernel(spec)(x, lengths, states, packed)
    return out, [tuple(states[2 * i: 2 * i + 2]) for i in range(len(spec.cells))]


def _draw(spec, seed, steps, batch):
    rng = np.random.default_rng(seed)
    weights = fan_in_weights(spec, rng)
    x = rng.standard_normal((steps, batch, spec.input_size)).astype(np.float32)
    initial = [tuple(rng.standard_normal((batch, n)).astype(np.float32) for n in c.state_sizes) for c in spec.cells]
    return weights, x, initial


@ON_TILES
@pytest.mark.parametrize("steps, batch", [(40, 32), (TILE_MIN_STEPS, 4)], ids=["staged", "whole"])
def test_kernels_project_on_tiles_alike_in_every_schedule(steps, batch, monkeypatch):
    weights, x, initial = _draw(BIDIR, steps, steps, batch)
    packed = pack_weights(BIDIR, weights)
    names = [name for cell in BIDIR.cells for name in packed_names(cell)]
    assert all(a.size > 0 for a, name in zip(packed, names) if name == tiles_name("wx"))
    expected, expected_states = run_stack(BIDIR, weights, x, initial_states=initial)
    serial = _call(BIDIR, packed, x, initial, "serial", monkeypatch)
    assert_matches_reference(BIDIR, *serial, expected, expected_states)
    for schedule in ("batch", "directions", "units"):
        assert_bit_equal(*_call(BIDIR, packed, x, initial, schedule, monkeypatch), *serial)


@ON_TILES
@pytest.mark.parametrize("steps, batch", [(40, 32), (TILE_MIN_STEPS, 4)], ids=["staged", "whole"])
def test_kernels_read_the_tiles(steps, batch, monkeypatch):
    # Tiles of another kernel change the outputs: the projection reads them, not the float32 kernel or its
    # panels. The unit split tiles its workers' slices of the kernel again (as it cuts the panels again).
    staged = stages_past(layers_of(BIDIR)[0], "float32")
    assert (staged is not None and steps * batch > staged) == (steps == 40)
    weights, x, initial = _draw(BIDIR, 3, steps, batch)
    packed = pack_weights(BIDIR, weights)
    swapped = list(packed)
    at = packed_names(BIDIR.cells[0]).index(tiles_name("wx"))
    swapped[at] = amx.pack_tiles(-weights[0]["kernel"])
    for schedule in ("serial", "batch", "directions"):
        got, _ = _call(BIDIR, swapped, x, initial, schedule, monkeypatch)
        honest, _ = _call(BIDIR, packed, x, initial, schedule, monkeypatch)
        assert np.abs(got - honest)[:, :, :128].max() > 0.1, schedule
    workers = get_kernel(dataclasses.replace(BIDIR, unit_split=2))._worker_weights(packed)
    kernel = weights[0]["kernel"]
    for me in range(2):
        columns = np.concatenate([np.arange(g * 128 + 64 * me, g * 128 + 64 * (me + 1)) for g in range(4)])
        np.testing.assert_array_equal(workers[at][me], amx.pack_tiles(kernel[:, columns]))


@ON_TILES
def test_small_or_float64_layers_keep_their_float32_projection():
    spec = simple_stack([CellSpec("lstm", 128)], 128)  # 128 x 512: fewer inputs than the tiles take
    packed = pack_weights(spec, fan_in_weights(spec, np.random.default_rng(4)))
    assert packed[packed_names(spec.cells[0]).index(tiles_name("wx"))].size == 0
    wide = simple_stack([CellSpec("lstm", 128)], 256, dtype="float64")
    assert pack_weights(wide, fan_in_weights(wide, np.random.default_rng(0)))[2].size == 0


def test_cells_of_512_outputs_and_more_pack_their_input_kernel_s_tiles_after_its_panels():
    # Smaller cells have no slot for tiles: their kernels take one argument fewer (streaming's LSTM(32)).
    assert packed_names(CellSpec("gru", 171))[:3] == ["wx", "wx_panels", "wx_tiles"]
    assert packed_names(CellSpec("lstm", 127))[:3] == ["wx", "wx_panels", "b"]
    assert packed_names(CellSpec("simple", 511))[:3] == ["wx", "wx_panels", "b"]
    spec = simple_stack([CellSpec("lstm", 32)], 32)
    assert len(pack_weights(spec, fan_in_weights(spec, np.random.default_rng(0)))) == len(packed_names(spec.cells[0]))


def test_the_bench_machine_line_says_whether_projections_run_on_tiles(monkeypatch):
    monkeypatch.setenv("NUMRNN_AMX", "auto")
    monkeypatch.setitem(amx._state, "why_not", "the CPU has no AMX-BF16")
    assert "; AMX tiles: off (the CPU has no AMX-BF16); " in bench.machine_line(100.0)
    monkeypatch.setitem(amx._state, "why_not", None)
    assert "; AMX tiles: on; " in bench.machine_line(100.0)
    monkeypatch.setenv("NUMRNN_AMX", "0")
    assert "; AMX tiles: off (NUMRNN_AMX=0); " in bench.machine_line(100.0)


@ON_TILES
def test_calls_shorter_than_a_tile_of_steps_keep_the_float32_projection(monkeypatch):
    # A streaming step or a short call projects as it did (a tile takes 32 rows); a call of 16 steps on tiles.
    weights, x, initial = _draw(BIDIR, 10, 16, 4)
    packed = pack_weights(BIDIR, weights)
    untiled = [np.zeros(0, np.float32) if name == tiles_name("wx") else array
               for array, name in zip(packed, [n for cell in BIDIR.cells for n in packed_names(cell)])]
    for steps, same in ((1, True), (TILE_MIN_STEPS - 1, True), (TILE_MIN_STEPS, False)):
        tiled, _ = _call(BIDIR, packed, x[:steps], initial, "serial", monkeypatch)
        plain, _ = _call(BIDIR, untiled, x[:steps], initial, "serial", monkeypatch)
        assert np.array_equal(tiled, plain) == same, steps


@ON_TILES
def test_one_row_workers_do_not_fuse_a_tiled_projection(monkeypatch):
    # The suite fuses wherever it may (NUMRNN_FUSED_PROJECTION=1): the batch split's one-row workers would fuse
    # their projection, serial's two rows project on tiles, and the two would differ.
    monkeypatch.setenv("NUMRNN_FUSED_PROJECTION", "1")
    spec = simple_stack([CellSpec("lstm", 128)], 256)
    weights, x, initial = _draw(spec, 11, 20, 2)
    packed = pack_weights(spec, weights)
    serial = _call(spec, packed, x, initial, "serial", monkeypatch)
    assert_bit_equal(*_call(spec, packed, x, initial, "batch", monkeypatch), *serial)


@ON_TILES
@pytest.mark.parametrize("lengths", [[30, 0, 7, 29, 1, 30, 15, 3], [20, 3, 17, 20, 1, 0, 9, 20]],
                         ids=["30_steps", "20_steps"])
def test_masked_kernels_project_their_live_rows_on_tiles(lengths, monkeypatch):
    # bidir_masked's path: the rows some step reads are gathered, projected (here on tiles), moved back. At 20
    # steps of 8 rows (160) a call is short enough for the panels whole, but it projects on tiles, and so do
    # the batch split's workers of 80 rows.
    spec = dataclasses.replace(BIDIR, masking="lengths")
    lengths = np.array(lengths, np.int64)
    weights, x, initial = _draw(spec, int(lengths[0]), int(lengths[0]), 8)
    packed = pack_weights(spec, weights)
    expected, expected_states = run_stack(spec, weights, x, lengths=lengths, initial_states=initial)
    serial = _call(spec, packed, x, initial, "serial", monkeypatch, lengths)
    assert_matches_reference(spec, *serial, expected, expected_states)
    for schedule in ("directions", "batch"):
        assert_bit_equal(*_call(spec, packed, x, initial, schedule, monkeypatch, lengths), *serial)
    swapped = list(packed)
    swapped[packed_names(spec.cells[0]).index(tiles_name("wx"))] = amx.pack_tiles(-weights[0]["kernel"])
    got = _call(spec, swapped, x, initial, "serial", monkeypatch, lengths)[0]
    assert np.abs(got - serial[0])[:, :, :128].max() > 0.1


@ON_TILES
def test_tiles_of_another_kernel_are_refused(monkeypatch):
    weights, x, initial = _draw(BIDIR, 13, 20, 4)
    packed = pack_weights(BIDIR, weights)
    at = packed_names(BIDIR.cells[0]).index(tiles_name("wx"))
    packed[at] = amx.pack_tiles(np.zeros((256, 256), np.float32))
    for schedule in ("serial", "directions"):
        with pytest.raises(ValueError, match="not the tiles of"):
            _call(BIDIR, packed, x, initial, schedule, monkeypatch)


def test_a_tiled_pack_is_not_cut_without_its_tiler():
    cell = CellSpec("lstm", 128)
    packed = pack(cell, fan_in_weights(simple_stack([cell], 3), np.random.default_rng(0))[0], "float32",
                  lambda matrix, wanted: amx.pack_tiles(matrix))
    with pytest.raises(ValueError, match="split_packed: the cell's input kernel has tiles; pass the tiling"):
        split_packed(cell, packed, 0, 2)
    halves = split_packed(cell, packed, 1, 2, amx.tiles_for)
    kernel = halves[packed_names(cell).index("wx")]
    np.testing.assert_array_equal(amx.untile(halves[packed_names(cell).index("wx_tiles")], *kernel.shape), kernel)
