"""Compile and run generated kernels: one compile per spec per process, a disk cache across processes."""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from codegen import StackSpec, generate_source
from codegen.cells import pack
from codegen.targets.cpu import condition_args
from numrnn.runtime.cache import import_module, module_path, write_if_changed

log = logging.getLogger("numrnn")
if os.environ.get("NUMRNN_DEBUG") and not log.handlers:
    _handler = logging.StreamHandler()
    _handler.setFormatter(logging.Formatter("numrnn: %(message)s"))
    log.addHandler(_handler)
    log.setLevel(logging.DEBUG)

_KERNELS: dict[StackSpec, Kernel] = {}
_LOCK = threading.Lock()


@dataclass
class Kernel:
    """A generated, importable kernel for one spec.

    ``codegen_seconds``: time to generate and write the source;
    ``compile_seconds``: time of the first call (numba compile, or a load from
    its disk cache), ``None`` until then.
    """

    spec: StackSpec
    source: str
    path: str
    function: object
    codegen_seconds: float
    compile_seconds: float | None = None
    _first_call_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __call__(self, x: np.ndarray, condition, states: list[np.ndarray], weights: list[np.ndarray]) -> np.ndarray:
        """Run on time-major ``x``; ``states`` are updated in place; returns ``(T, B, W)`` or ``(B, W)``.

        ``condition`` is the ``(T, B)`` bool mask, the ``(B,)`` int64 lengths,
        or ``None``, per the spec's masking. Inputs must already be validated
        and C-contiguous in the spec's dtype (the facades do that).
        """
        T, B = x.shape[0], x.shape[1]
        if self.spec.unroll is not None and T != self.spec.unroll:
            raise ValueError(f"{self.spec.kernel_name()}: this kernel is statically unrolled for "
                             f"{self.spec.unroll} time steps; got {T}")
        rows = T if self.spec.return_sequences else 1
        y = np.empty((rows, B, self.spec.output_size), dtype=self.spec.dtype)
        cond = [condition] if condition_args(self.spec) else []
        if self.compile_seconds is None:
            with self._first_call_lock:
                start = time.perf_counter()
                self.function(x, *cond, *states, *weights, y)
                if self.compile_seconds is None:
                    self.compile_seconds = time.perf_counter() - start
                    log.debug("first call of %s took %.2f s (compile or cache load)", self.spec.kernel_name(),
                              self.compile_seconds)
        else:
            self.function(x, *cond, *states, *weights, y)
        return y if self.spec.return_sequences else y[0]


def get_kernel(spec: StackSpec) -> Kernel:
    """The kernel for ``spec``, generated and imported once per process (memoized)."""
    kernel = _KERNELS.get(spec)
    if kernel is not None:
        return kernel
    with _LOCK:
        kernel = _KERNELS.get(spec)
        if kernel is None:
            kernel = _build(spec)
            _KERNELS[spec] = kernel
    return kernel


def _build(spec: StackSpec) -> Kernel:
    start = time.perf_counter()
    source = generate_source(spec)
    path = module_path(spec)
    written = write_if_changed(path, source)
    module = import_module(path, f"numrnn_generated_{spec.cache_key()}")
    elapsed = time.perf_counter() - start
    log.debug("kernel cache miss for %s: source %s %s (%.3f s)", spec.kernel_name(),
              "written to" if written else "reused from", path, elapsed)
    return Kernel(spec, source, str(path), getattr(module, spec.kernel_name()), elapsed)


def pack_weights(spec: StackSpec, logical: list[dict]) -> list[np.ndarray]:
    """Logical weights of every cell (``spec.cells`` order) -> the kernel's weight arguments."""
    return [array for cell, weights in zip(spec.cells, logical) for array in pack(cell, weights, spec.dtype)]


def clear_memory_cache() -> None:
    """Forget the in-process kernels (the disk cache stays); for tests and benchmarks."""
    with _LOCK:
        _KERNELS.clear()
