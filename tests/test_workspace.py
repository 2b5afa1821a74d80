"""The kernels' workspace: ``workspace_size`` is exactly what a kernel carves, and reused workspaces stay clean.

The specs are those of ``test_grid`` (every merge, multi-block stacks, both
output modes), so no kernel compiles here that the grid does not compile too.
"""

from __future__ import annotations

import numpy as np
import pytest
from reference import run_stack
from test_grid import CASES, _inputs, _weights, assert_matches_reference

from codegen.spec import StackSpec
from numrnn.runtime import get_kernel, kernels, pack_weights

SIZE_CASES = ["bidir_concat_stack", "bidir_sum_zero", "bidir_ave_last", "bidir_none_valid_lengths",
              "torch_style_three_blocks_gru", "stack_gru_lstm_last_backwards_zero", "float64_stack_carry"]


def _raw_call(spec: StackSpec, weights, x, mask, lengths, initial, ws: np.ndarray) -> np.ndarray:
    """The generated kernel function itself, on a given workspace; returns its output buffer."""
    kernel = get_kernel(spec)
    condition = {"none": [], "carry": [mask], "zero": [mask], "lengths": [lengths]}[spec.masking]
    states = [np.array(s) for cell_states in initial for s in cell_states]
    y = np.zeros((x.shape[0] if spec.return_sequences else 1, x.shape[1], spec.output_size), spec.dtype)
    kernel.function(x, *condition, *states, *pack_weights(spec, weights), y, ws, 0)
    return y


@pytest.mark.parametrize("name", SIZE_CASES)
def test_workspace_size_is_what_the_kernel_needs(name):
    spec = CASES[name]
    rng = np.random.default_rng(3)
    weights = _weights(spec, rng)
    x, mask, lengths, initial = _inputs(spec, rng)
    T, B = x.shape[0], x.shape[1]
    size = get_kernel(spec).workspace_size(T, T if spec.return_sequences else 1, B)
    expected, _ = run_stack(spec, weights, x, mask=mask, lengths=lengths, initial_states=initial)
    got = _raw_call(spec, weights, x, mask, lengths, initial, np.full(size, np.nan, spec.dtype))
    np.testing.assert_allclose(got if spec.return_sequences else got[0], expected, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="ws: smaller than the module's workspace_size"):
        _raw_call(spec, weights, x, mask, lengths, initial, np.empty(size - 1, spec.dtype))


def test_pooled_workspaces_are_reused_and_give_clean_results(monkeypatch):
    monkeypatch.setattr(kernels, "SMALL_WORKSPACE", 0)  # every workspace from the pool, however small
    spec = CASES["torch_style_two_blocks_proj"]
    kernel = get_kernel(spec)
    rng = np.random.default_rng(4)
    weights = _weights(spec, rng)

    def run(batch):
        x, mask, lengths, initial = _inputs(spec, rng, batch)
        states = [np.array(s) for cell_states in initial for s in cell_states]
        got = kernel(x, lengths, states, pack_weights(spec, weights))
        expected, expected_states = run_stack(spec, weights, x, lengths=lengths, initial_states=initial)
        sizes = np.cumsum([0] + [len(cell.state_names) for cell in spec.cells])
        grouped = [tuple(states[a:b]) for a, b in zip(sizes[:-1], sizes[1:])]
        assert_matches_reference(spec, got, grouped, expected, expected_states)

    run(1)  # compiled (its first call borrows a one-row workspace of its own) before the pool is watched
    monkeypatch.setattr(kernel, "_workspaces", kernels.WorkspacePool())
    run(4)
    kept = list(kernel._workspaces._free)
    assert len(kept) == 1
    run(3)  # a smaller call borrows the same workspace, holding the last call's values
    assert len(kernel._workspaces._free) == 1 and kernel._workspaces._free[0] is kept[0]
    run(4)
    assert len(kernel._workspaces._free) == 1 and kernel._workspaces._free[0] is kept[0]


def test_pool_lends_a_workspace_to_one_call_at_a_time():
    pool = kernels.WorkspacePool()
    with pool.borrow(10**5, np.float32) as first, pool.borrow(10**5, np.float32) as second:
        assert first is not second and first.size == second.size == 10**5
    with pool.borrow(2 * 10**5, np.float32) as larger:
        assert larger.size == 2 * 10**5  # the free ones are too small: a new one
    with pool.borrow(10**5, np.float32) as again:
        assert again is larger  # the largest free one
    assert len(pool._free) <= kernels.cores() + 1


def test_pool_keeps_the_largest_one_per_worker_and_caller(monkeypatch):
    monkeypatch.setattr(kernels, "cores", lambda: 2)
    pool = kernels.WorkspacePool()
    sizes = [4 * 10**5, 10**5, 3 * 10**5, 2 * 10**5, 5 * 10**5]
    borrowed = [pool.borrow(size, np.float32) for size in sizes]
    arrays = [b.__enter__() for b in borrowed]
    for b in borrowed:  # all lent at once, then all returned: the smallest (not the first) goes
        b.__exit__(None, None, None)
    assert sorted(w.size for w in pool._free) == [3 * 10**5, 4 * 10**5, 5 * 10**5]
    assert all(any(w is a for a in arrays) for w in pool._free)


def test_short_calls_reuse_their_threads_workspace(monkeypatch):
    # A short serial call (every product the packed one) takes its thread's workspace, grown to the largest
    # size asked and reused, dirty, by the next calls, longer or shorter: each still gives the oracle's answer.
    spec = CASES["torch_style_two_blocks_proj"]
    kernel = get_kernel(spec)
    monkeypatch.setattr(kernel, "_small", 4)  # the packed product whatever this machine's BLAS
    rng = np.random.default_rng(5)
    weights = _weights(spec, rng)
    packed, seen = pack_weights(spec, weights), []
    for steps in (3, 7, 2, 7):
        x = rng.standard_normal((steps, 2, spec.input_size)).astype(spec.dtype)
        lengths = np.array([steps, 1], dtype=np.int64)
        states = [np.zeros((2, n), spec.dtype) for cell in spec.cells for n in cell.state_sizes]
        got = kernel(x, lengths, states, packed)
        expected, _ = run_stack(spec, weights, x, lengths=lengths)
        np.testing.assert_allclose(got if spec.return_sequences else got[0], expected, rtol=0, atol=1e-5)
        seen.append(kernel._thread_local.ws)
    assert seen[1] is seen[2] is seen[3] and seen[1].size >= kernel.workspace_size(7, 7, 2)
