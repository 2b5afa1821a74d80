"""Every golden fixture straight through the generated kernel: spec + packed weights, no facade.

This is the kernel-level check of every variant the fixtures exercise (peepholes,
cell clip, projection, forget bias, lengths masking, valid-prefix reversal,
multi-block bidirectional), dynamic loop and static unroll.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from golden_fixtures import fixture_names, load_case

from numrnn.runtime.kernels import get_kernel, pack_weights

TOLERANCE = 1e-5


def _initial_states(spec, B: int) -> list:
    return [tuple(np.zeros((B, n), dtype=spec.dtype) for n in cell.state_sizes) for cell in spec.cells]


def _run_case(name: str, unroll: bool, packed_product_rows: int | None = None, monkeypatch=None) -> None:
    case = load_case(name)
    spec = case.spec
    T = case.calls[0].x.shape[0]
    spec = dataclasses.replace(spec, unroll=T if unroll else None)
    kernel, weights = get_kernel(spec), pack_weights(spec, case.weights)
    if packed_product_rows is not None:  # force one recurrent-product path (packed product or BLAS) for B > 1
        monkeypatch.setattr(kernel, "_small", packed_product_rows)
    states = None
    for k, call in enumerate(case.calls):
        B = call.x.shape[1]
        if call.initial_states is not None:
            states = [tuple(np.array(s, dtype=spec.dtype, copy=True) for s in st) for st in call.initial_states]
        elif states is None or not case.stateful:
            states = _initial_states(spec, B)
        if spec.masking in ("carry", "zero"):
            cond = np.ascontiguousarray(call.mask, dtype=bool)
        elif spec.masking == "lengths":
            cond = np.ascontiguousarray(call.lengths, dtype=np.int64)
        else:
            cond = None
        flat = [np.ascontiguousarray(s) for st in states for s in st]
        output = kernel(np.ascontiguousarray(call.x, dtype=spec.dtype), cond, flat, weights)
        it = iter(flat)
        states = [tuple(next(it) for _ in cell.state_names) for cell in spec.cells]
        got = case.flatten(output, states)
        assert len(got) == len(call.expected)
        for j, (g, e) in enumerate(zip(got, call.expected)):
            assert g.shape == e.shape, f"call {k} out_{j}: shape {g.shape} != {e.shape}"
            err = float(np.max(np.abs(np.asarray(g, dtype=np.float64) - e)))
            assert err <= TOLERANCE, f"call {k} out_{j}: max abs error {err:.3g}"


@pytest.mark.parametrize("name", fixture_names())
def test_kernel_dynamic(name):
    _run_case(name, unroll=False)


@pytest.mark.parametrize("name", fixture_names())
def test_kernel_unrolled(name):
    _run_case(name, unroll=True)


@pytest.mark.parametrize("rows", [0, 1 << 20], ids=["blas", "packed"])
@pytest.mark.parametrize("name", fixture_names())
def test_kernel_products(name, rows, monkeypatch):
    _run_case(name, unroll=False, packed_product_rows=rows, monkeypatch=monkeypatch)
