"""Compile time, measured apart from run time: a cold compile vs a load from the warm disk cache.

Both time ``get_kernel(spec)`` plus the first call (which is where numba
compiles or loads its cached machine code), on the seed000 stack
(3xGRU(120), dynamic loop) and on a static unroll of T=16.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

import numpy as np

from codegen.spec import CellSpec, simple_stack  # noqa: I001
from numrnn.runtime import cache as disk_cache
from numrnn.runtime import clear_memory_cache, get_kernel, pack_weights

from . import common  # noqa: F401 - sets NUMRNN_CACHE_DIR before numrnn is imported
from .common import random_weights

SPECS = {
    "seed000_dynamic": lambda: simple_stack([CellSpec("gru", 120)] * 3, 2),
    "lstm64_unroll16": lambda: simple_stack([CellSpec("lstm", 64)], 32, unroll=16),
}


def _first_result(spec, weights, x):
    kernel = get_kernel(spec)
    states = [np.zeros((x.shape[1], n), spec.dtype) for cell in spec.cells for n in cell.state_sizes]
    return kernel(x, None, states, weights)


def _forget_modules():
    """Drop the in-process kernels and their imported modules, so the next get_kernel imports afresh."""
    clear_memory_cache()
    for name in [n for n in sys.modules if n.startswith("numrnn_generated_")]:
        del sys.modules[name]


class CompileCold:
    """First result with an empty cache directory: code generation, numba compile, run."""

    params = list(SPECS)
    param_names = ["spec"]
    number = 1
    repeat = 3
    warmup_time = 0

    def setup(self, name):
        self.spec = SPECS[name]()
        self.weights = pack_weights(self.spec, random_weights(self.spec))
        self.x = np.zeros((self.spec.unroll or 16, 4, self.spec.input_size), np.float32)
        self.dir = tempfile.mkdtemp(prefix="numrnn-asv-compile-")
        self._env = os.environ.get(disk_cache.CACHE_ENV)
        os.environ[disk_cache.CACHE_ENV] = self.dir
        _forget_modules()

    def teardown(self, name):
        _forget_modules()
        if self._env is None:
            os.environ.pop(disk_cache.CACHE_ENV, None)
        else:
            os.environ[disk_cache.CACHE_ENV] = self._env
        shutil.rmtree(self.dir, ignore_errors=True)

    def time_first_result(self, name):
        _first_result(self.spec, self.weights, self.x)


class CompileWarmCache(CompileCold):
    """First result when the disk cache already holds the module and numba's machine code."""

    def setup(self, name):
        super().setup(name)
        _first_result(self.spec, self.weights, self.x)  # fill the fresh cache directory
        _forget_modules()
