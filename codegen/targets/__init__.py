"""Code-generation targets: ``cpu`` (numba ``@njit``) and ``cuda`` (numba.cuda)."""
