"""``numrnn compare`` as an asv benchmark: the seed-000 stack per loop mode and sequence length.

``time_run`` is the steady-state call (the kernel is compiled or loaded from
the cache in ``setup``); the ``track_*`` methods repeat the CLI's cold-compile
and cached-load measurements in fresh processes with an empty kernel cache, so
their history shows compile-time regressions of each mode.
"""

from codegen.spec import UNROLL_CEILING
from numrnn.compare import MODES, StackOptions, make_inputs, measure_mode
from numrnn.runtime import get_kernel

OPTIONS = StackOptions()  # seed 000: 3×GRU(120) on 2 features, batch 128


class StaticVsDynamic:
    """Dynamic loop, partial unroll and full static unroll of 3×GRU(120), B=128, over T."""

    params = (list(MODES), [8, 32, 128, 196])
    param_names = ["mode", "steps"]
    timeout = 600

    def setup(self, mode, steps):
        if mode == "static" and steps > UNROLL_CEILING:
            raise NotImplementedError
        self.kernel = get_kernel(OPTIONS.mode_spec(mode, steps))
        self.args = make_inputs(self.kernel.spec, steps, OPTIONS.batch)
        self.kernel(*self.args)

    def time_run(self, mode, steps):
        """One call of the warm kernel."""
        self.kernel(*self.args)

    def track_cold_compile(self, mode, steps):
        """First call with an empty cache in a fresh process (numba compile)."""
        return measure_mode(OPTIONS, mode, steps, repeat=1)["compile_s"]

    track_cold_compile.unit = "seconds"

    def track_cached_load(self, mode, steps):
        """First call in a fresh process on a warm cache (numba cache load)."""
        return measure_mode(OPTIONS, mode, steps, repeat=1)["cached_load_s"]

    track_cached_load.unit = "seconds"

    def track_compile_peak_memory(self, mode, steps):
        """Peak RSS above the start while compiling cold."""
        return measure_mode(OPTIONS, mode, steps, repeat=1)["compile_peak_mib"]

    track_compile_peak_memory.unit = "MiB"

    def track_artifact_size(self, mode, steps):
        """Compiled machine code numba keeps on disk for the kernel."""
        return measure_mode(OPTIONS, mode, steps, repeat=1)["artifact_bytes"] / 1024

    track_artifact_size.unit = "KiB"
