"""Keras's weight initializers, in NumPy: what a cell's ``kernel_initializer``, ``recurrent_initializer`` and
``bias_initializer`` may name.

An initializer is given as Keras takes it: a name (``"glorot_uniform"`` or
``"GlorotUniform"``), a serialized config (``{"class_name": "Orthogonal",
"config": {"gain": 1.0, "seed": None}}``, as a Keras layer's ``get_config()``
holds it), or a callable ``f(shape, dtype=...)`` such as a Keras initializer
object, whose result is converted with ``np.asarray``. The distributions are
Keras's; the numbers are NumPy's, so a seed gives the same weights in every
numrnn process but not the ones Keras draws with it.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import numpy as np

#: Keras draws a truncated normal's values within two standard deviations; this is the standard deviation of
#: a unit normal so truncated (Keras's VarianceScaling divides by it to keep the variance asked for).
TRUNCATED_UNIT_STDDEV = 0.87962566103423978

#: Keras's initializer names (snake case) -> (kind, default parameters). CamelCase class names map onto these.
KERAS_INITIALIZERS = {
    "zeros": ("zeros", {}),
    "ones": ("ones", {}),
    "constant": ("constant", {"value": 0.0}),
    "random_uniform": ("uniform", {"minval": -0.05, "maxval": 0.05}),
    "random_normal": ("normal", {"mean": 0.0, "stddev": 0.05}),
    "truncated_normal": ("truncated", {"mean": 0.0, "stddev": 0.05}),
    "variance_scaling": ("variance", {"scale": 1.0, "mode": "fan_in", "distribution": "truncated_normal"}),
    "glorot_uniform": ("variance", {"scale": 1.0, "mode": "fan_avg", "distribution": "uniform"}),
    "glorot_normal": ("variance", {"scale": 1.0, "mode": "fan_avg", "distribution": "truncated_normal"}),
    "he_uniform": ("variance", {"scale": 2.0, "mode": "fan_in", "distribution": "uniform"}),
    "he_normal": ("variance", {"scale": 2.0, "mode": "fan_in", "distribution": "truncated_normal"}),
    "lecun_uniform": ("variance", {"scale": 1.0, "mode": "fan_in", "distribution": "uniform"}),
    "lecun_normal": ("variance", {"scale": 1.0, "mode": "fan_in", "distribution": "truncated_normal"}),
    "orthogonal": ("orthogonal", {"gain": 1.0}),
    "identity": ("identity", {"gain": 1.0}),
}
_ALIASES = {"zero": "zeros", "one": "ones", "uniform": "random_uniform", "normal": "random_normal",
            "orthogonal_initializer": "orthogonal", "identity_initializer": "identity"}
#: Keras 3.15's fan options: accepted while unset (None), which is all numrnn computes fans for.
_UNSET_OPTIONS = ("input_axes", "output_axes")

Draw = Callable[[tuple, str], np.ndarray]


def make_initializer(owner: str, argument: str, value) -> Draw:
    """A function ``draw(shape, dtype) -> ndarray`` for the initializer ``value`` given as ``argument``.

    ValueError for an unknown name, an unknown or out-of-range parameter; TypeError for anything else.
    """
    if isinstance(value, type):  # a Keras initializer class, which Keras makes with its defaults
        value = value()
    if callable(value) and not isinstance(value, (str, dict)):
        return _call_user_initializer(owner, argument, value)
    name, params = _name_and_params(owner, argument, value)
    key = _snake(name)
    key = _ALIASES.get(key, key)
    if key not in KERAS_INITIALIZERS:
        raise ValueError(f"{owner}: {argument}: unknown initializer {name!r}; expected one of "
                         f"{', '.join(sorted(KERAS_INITIALIZERS))}, a Keras initializer config or a callable")
    kind, defaults = KERAS_INITIALIZERS[key]
    seed = params.pop("seed", None)
    for option in _UNSET_OPTIONS:
        if params.pop(option, None) is not None:
            raise ValueError(f"{owner}: {argument}: {option} is not supported (fans come from a 2-D shape)")
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise ValueError(f"{owner}: {argument}: {name!r} takes {sorted(defaults) + ['seed']}; got {unknown}")
    settings = {**defaults, **params}
    if settings.get("distribution") == "normal":  # Keras's older spelling
        settings["distribution"] = "truncated_normal"
    _check_settings(owner, argument, kind, settings)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
        raise ValueError(f"{owner}: {argument}: seed must be a non-negative integer or None; got {seed!r}")

    def draw(shape: tuple, dtype: str) -> np.ndarray:
        rng = np.random.default_rng(seed)  # a seeded initializer gives the same values every call, as in Keras
        return _DRAWERS[kind](owner, argument, rng, tuple(shape), **settings)

    return draw


def _name_and_params(owner: str, argument: str, value) -> tuple[str, dict]:
    if isinstance(value, str):
        return value, {}
    if isinstance(value, dict) and isinstance(value.get("class_name"), str):
        params = value.get("config") or {}
        if not isinstance(params, dict):
            raise ValueError(f"{owner}: {argument}: the config's 'config' must be a dict; got {params!r}")
        return value["class_name"], dict(params)
    raise TypeError(f"{owner}: {argument}: expected an initializer name, a Keras initializer config "
                    f"({{'class_name': ..., 'config': ...}}) or a callable; got {value!r}")


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def _check_settings(owner: str, argument: str, kind: str, settings: dict) -> None:
    for key, value in settings.items():
        if key in ("mode", "distribution"):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
                or not np.isfinite(value):
            raise ValueError(f"{owner}: {argument}: {key} must be a finite number; got {value!r}")
    if kind in ("normal", "truncated") and settings["stddev"] <= 0:
        raise ValueError(f"{owner}: {argument}: stddev must be positive; got {settings['stddev']!r}")
    if kind == "uniform" and settings["minval"] > settings["maxval"]:
        raise ValueError(f"{owner}: {argument}: minval must not exceed maxval; got {settings['minval']!r} > "
                         f"{settings['maxval']!r}")
    if kind == "variance":
        if settings["scale"] <= 0:
            raise ValueError(f"{owner}: {argument}: scale must be positive; got {settings['scale']!r}")
        if settings["mode"] not in ("fan_in", "fan_out", "fan_avg"):
            raise ValueError(f"{owner}: {argument}: mode must be 'fan_in', 'fan_out' or 'fan_avg'; "
                             f"got {settings['mode']!r}")
        if settings["distribution"] not in ("truncated_normal", "untruncated_normal", "uniform"):
            raise ValueError(f"{owner}: {argument}: distribution must be 'truncated_normal', "
                             f"'untruncated_normal' or 'uniform'; got {settings['distribution']!r}")


def _call_user_initializer(owner: str, argument: str, function) -> Draw:
    def draw(shape: tuple, dtype: str) -> np.ndarray:
        values = np.asarray(function(tuple(shape), dtype=dtype), dtype=np.float64)
        if values.shape != tuple(shape):
            raise ValueError(f"{owner}: {argument} returned shape {values.shape} for shape {tuple(shape)}")
        return values

    return draw


def _fans(shape: tuple) -> tuple[int, int]:
    """Keras's fans: a vector's are its length; a matrix's its rows (in) and columns (out)."""
    if len(shape) == 1:
        return shape[0], shape[0]
    return shape[0], shape[1]


def _truncated(owner, argument, rng, shape, *, mean, stddev):
    """Normal values redrawn until each lies within two standard deviations of the mean."""
    values = rng.standard_normal(shape)
    outside = np.abs(values) > 2.0
    while outside.any():
        values[outside] = rng.standard_normal(int(outside.sum()))
        outside = np.abs(values) > 2.0
    return mean + stddev * values


def _constant(owner, argument, rng, shape, *, value):
    return np.full(shape, float(value))


def _zeros(owner, argument, rng, shape):
    return np.zeros(shape)


def _ones(owner, argument, rng, shape):
    return np.ones(shape)


def _uniform(owner, argument, rng, shape, *, minval, maxval):
    return rng.uniform(minval, maxval, size=shape)


def _normal(owner, argument, rng, shape, *, mean, stddev):
    return rng.normal(mean, stddev, size=shape)


def _variance(owner, argument, rng, shape, *, scale, mode, distribution):
    fan_in, fan_out = _fans(shape)
    fan = {"fan_in": fan_in, "fan_out": fan_out, "fan_avg": (fan_in + fan_out) / 2.0}[mode]
    variance = scale / max(1.0, fan)
    if distribution == "uniform":
        limit = np.sqrt(3.0 * variance)
        return rng.uniform(-limit, limit, size=shape)
    if distribution == "untruncated_normal":
        return rng.normal(0.0, np.sqrt(variance), size=shape)
    return _truncated(owner, argument, rng, shape, mean=0.0, stddev=np.sqrt(variance) / TRUNCATED_UNIT_STDDEV)


def _orthogonal(owner, argument, rng, shape, *, gain):
    """A (semi-)orthogonal matrix from the QR decomposition of a normal one, as Keras makes it."""
    if len(shape) != 2:
        raise ValueError(f"{owner}: {argument}: an orthogonal initializer needs a 2-D shape; got {shape}")
    rows, cols = shape
    q, r = np.linalg.qr(rng.standard_normal((max(rows, cols), min(rows, cols))))
    q *= np.sign(np.diag(r))
    return gain * (q.T if rows < cols else q)


def _identity(owner, argument, rng, shape, *, gain):
    if len(shape) != 2:
        raise ValueError(f"{owner}: {argument}: an identity initializer needs a 2-D shape; got {shape}")
    return gain * np.eye(*shape)


_DRAWERS = {"zeros": _zeros, "ones": _ones, "constant": _constant, "uniform": _uniform, "normal": _normal,
            "truncated": _truncated, "variance": _variance, "orthogonal": _orthogonal, "identity": _identity}


def glorot_uniform(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Uniform in ``[-l, l]`` with ``l = sqrt(6 / (fan_in + fan_out))`` (the TF1-style cells' kernels)."""
    return _variance(None, None, rng, shape, scale=1.0, mode="fan_avg", distribution="uniform")
