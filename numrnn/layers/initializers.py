"""Keras's default initializers for recurrent cells (glorot_uniform, orthogonal, zeros)."""

from __future__ import annotations

import numpy as np


def glorot_uniform(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Uniform in ``[-l, l]`` with ``l = sqrt(6 / (fan_in + fan_out))``."""
    limit = np.sqrt(6.0 / (shape[0] + shape[1]))
    return rng.uniform(-limit, limit, size=shape)


def orthogonal(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """A (semi-)orthogonal matrix from the QR decomposition of a normal one."""
    rows, cols = shape
    a = rng.standard_normal((max(rows, cols), min(rows, cols)))
    q, r = np.linalg.qr(a)
    q *= np.sign(np.diag(r))
    return q.T if rows < cols else q
