"""Kernel cache (memory + disk), compile, dispatch and weight packing."""

from numrnn.runtime.kernels import Kernel, clear_memory_cache, get_kernel, kernel_for, pack_cell, pack_weights

__all__ = ["Kernel", "clear_memory_cache", "get_kernel", "kernel_for", "pack_cell", "pack_weights"]
