"""Compile time, measured apart from run time: a cold compile vs a load from the warm disk cache.

Both time ``get_kernel(spec)`` plus the first call (which is where numba
compiles or loads its cached machine code), on the seed000 stack
(3xGRU(120), dynamic loop) and on a static unroll of T=16, in the
benchmark's process. :class:`WarmStart` times what a user's new process
waits for: from ``import numrnn`` to the first result of a Keras-style layer
whose kernel is in the disk cache, numba's own import and set-up included;
:class:`ColdStart` the same on a machine whose cache is empty (numrnn's
shared entries compile then too, in a helper process beside the kernel).
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap

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


#: A new process's first result, Keras-style: ``import numrnn``, build the layer (its default initializers
#: run), set weights, call. Prints the seconds of the import and of the rest.
_WARM_START_SCRIPT = textwrap.dedent("""
    import sys, time
    started = time.perf_counter()
    import numpy as np
    import numrnn
    imported = time.perf_counter()
    units, cells, batch, steps, features = (int(a) for a in sys.argv[1:6])
    cell = numrnn.LSTMCell if sys.argv[6] == "lstm" else numrnn.GRUCell
    layer = numrnn.RNN(numrnn.StackedRNNCells([cell(units) for _ in range(cells)]), return_sequences=True)
    x = np.random.default_rng(0).standard_normal((batch, steps, features)).astype(np.float32)
    layer.build(x.shape)
    rng = np.random.default_rng(1)
    layer.set_weights([rng.uniform(-0.1, 0.1, w.shape).astype(np.float32) for w in layer.get_weights()])
    layer(x)
    print(imported - started, time.perf_counter() - imported)
""")

#: units, cells, batch, steps, features, cell kind
WARM_START_STACKS = {
    "tiny64": (64, 1, 1, 50, 32, "lstm"),
    "seed000": (120, 3, 128, 196, 2, "gru"),
}


class WarmStart:
    """A fresh process's first result with the kernel in the disk cache: seconds after ``import numrnn``.

    The median of three fresh processes, after one that fills the cache.
    """

    params = list(WARM_START_STACKS)
    param_names = ["stack"]
    timeout = 300

    def setup(self, name):
        self.samples = [self._fresh_process(name) for _ in range(4)][1:]

    def _fresh_process(self, name, env=None) -> tuple[float, float]:
        args = [str(a) for a in WARM_START_STACKS[name]]
        result = subprocess.run([sys.executable, "-c", _WARM_START_SCRIPT, *args], capture_output=True, text=True,
                                check=True, env=env)
        imported, first_result = result.stdout.split()
        return float(imported), float(first_result)

    def track_first_result_after_import(self, name):
        """Seconds from the end of ``import numrnn`` to the first result (median of three processes)."""
        return statistics.median(first for _, first in self.samples)

    track_first_result_after_import.unit = "seconds"

    def track_import(self, name):
        """Seconds ``import numrnn`` takes in a new process (numba is not imported yet)."""
        return statistics.median(imported for imported, _ in self.samples)

    track_import.unit = "seconds"


class ColdStart(WarmStart):
    """A fresh process's first result on an empty cache folder: seconds after ``import numrnn``.

    The median of three fresh processes, each with a new folder: the shared
    entries compile (in a helper process) as well as the kernel.
    """

    params = ["seed000"]

    def setup(self, name):
        self.samples = []
        for _ in range(3):
            with tempfile.TemporaryDirectory(prefix="numrnn-asv-cold-") as folder:
                self.samples.append(self._fresh_process(name, {**os.environ, disk_cache.CACHE_ENV: folder}))
