"""Shared set-up: a spec, its packed weights and inputs, with the kernel compiled and warmed."""

from __future__ import annotations

import os
import tempfile
import time

import numpy as np

# Kernels compiled by the suite live in their own cache, not the user's.
os.environ.setdefault("NUMRNN_CACHE_DIR", os.path.join(tempfile.gettempdir(), "numrnn-asv-cache"))

from codegen.spec import CellSpec, simple_stack  # noqa: E402
from numrnn.runtime import get_kernel, pack_weights  # noqa: E402


def grid_spec(kind: str, hidden: int, steps: int, unroll: str, input_size: int = 32):
    """One-layer stack of ``kind`` with ``hidden`` units; ``unroll`` "dynamic" or "static" (unrolled to ``steps``)."""
    return simple_stack([CellSpec(kind, hidden)], input_size, unroll=steps if unroll == "static" else None)


def random_weights(spec, seed: int = 0) -> list[dict]:
    """Logical weights, uniform in +-1/sqrt(fan_in)."""
    rng = np.random.default_rng(seed)
    out = []
    for cell, size in zip(spec.cells, spec.input_sizes()):
        out.append({name: rng.uniform(-1, 1, shp).astype(spec.dtype) / np.sqrt(shp[0])
                    for name, shp in cell.weight_shapes(size).items()})
    return out


#: Calls that warm a :class:`Runner`, and for at least :data:`WARM_MIN_SECONDS` (up to :data:`WARM_SECONDS`): a
#: shape whose schedule is timed runs each option untimed for ``MeasuredChoice.WARM_SECONDS`` and then three
#: times timed in its first round (``numrnn.runtime.schedule``; tiny64: about 40 calls, 1.2 ms), and a unit
#: split that only calls close together take runs from the second call (``CloseCallsChoice``). Each option's
#: first call compiles its kernel or loads it from the disk cache: with one warming call, ``--quick``'s one
#: timed call of latency256 was that load, 32-34 ms against 0.7.
WARM_CALLS = 10
WARM_MIN_SECONDS = 0.05
WARM_SECONDS = 1.0


class Runner:
    """A warmed kernel call on fixed inputs (states reset to zeros each call)."""

    def __init__(self, spec, x: np.ndarray, condition=None, weights=None):
        self.spec, self.x, self.condition = spec, x, condition
        self.kernel = get_kernel(spec)
        self.weights = pack_weights(spec, weights or random_weights(spec))
        B = x.shape[1]
        self.zeros = [np.zeros((B, n), spec.dtype) for cell in spec.cells for n in cell.state_sizes]
        start, calls = time.perf_counter(), 0
        while True:  # compile (or load from the disk cache) every schedule the calls take
            self()
            calls, spent = calls + 1, time.perf_counter() - start
            if spent > WARM_SECONDS or (calls >= WARM_CALLS and spent >= WARM_MIN_SECONDS):
                break

    def __call__(self):
        """One call."""
        return self.kernel(self.x, self.condition, [z.copy() for z in self.zeros], self.weights)
