"""Input checks shared by every facade: each error names the argument, the expected and the received."""

from __future__ import annotations

import numpy as np


def to_numpy(value):
    """A torch tensor (duck-typed: ``.detach().cpu().numpy()``) as an ndarray; anything else unchanged.

    Duck typing keeps torch an optional dependency: numrnn never imports it.
    """
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach") and hasattr(value, "cpu") and hasattr(value, "numpy"):
        return value.detach().cpu().numpy()
    return value


DTYPES = ("float32", "float64")


def normalize_dtype(owner: str, dtype) -> str:
    """``"float32"`` or ``"float64"`` from a NumPy spelling, a TF dtype, a torch dtype or a Keras dtype policy
    (object or config); ValueError otherwise.

    TF dtypes are read through ``as_numpy_dtype`` and torch ones by name
    (``torch.float64``, ``torch.double``), so neither library is imported.
    A policy must compute in the dtype it keeps its variables in: a mixed
    one (``"mixed_float16"``) is refused. ``None`` is refused too (NumPy
    would read it as float64): callers give their own default.
    """
    given = dtype
    if isinstance(dtype, dict):  # a serialized policy: {"class_name": "DTypePolicy", "config": {"name": ...}}
        config = dtype.get("config")
        dtype = config.get("name") if isinstance(config, dict) else None
    elif hasattr(dtype, "compute_dtype") and hasattr(dtype, "variable_dtype"):  # a Keras policy object
        dtype = dtype.compute_dtype if dtype.compute_dtype == dtype.variable_dtype else None
    dtype = getattr(dtype, "as_numpy_dtype", dtype)
    name = None
    if dtype is not None:
        try:
            name = np.dtype(dtype).name
        except (TypeError, ValueError):
            short = str(dtype).rsplit(".", 1)[-1]
            name = {"float": "float32", "double": "float64"}.get(short, short)
    if name not in DTYPES:
        raise ValueError(f"{owner}: dtype must be 'float32' or 'float64'; got {given!r}")
    return name


def check_dtype_if_given(owner: str, dtype) -> None:
    """ValueError unless ``dtype`` is ``None`` or what :func:`normalize_dtype` reads (a container's Keras dtype,
    accepted as configs hold it: its cells' dtype is the one it runs in)."""
    if dtype is not None:
        normalize_dtype(owner, dtype)


#: The dtypes the kernels run in, as NumPy's (singleton) descriptors: a check by identity is the cheapest.
_NUMPY_DTYPES = {name: np.dtype(name) for name in DTYPES}


def as_real_array(name: str, value, dtype: str) -> np.ndarray:
    """``value`` (array-like or torch tensor) as an array of ``dtype``; TypeError for non-numeric or complex data."""
    if type(value) is np.ndarray and value.dtype is _NUMPY_DTYPES.get(dtype):
        return value  # the common case, first (a facade's step checks its input and states)
    try:
        array = np.asarray(to_numpy(value))
    except Exception as exc:  # ragged lists and the like
        raise TypeError(f"{name}: expected a numeric array; got {type(value).__name__} ({exc})") from None
    if array.dtype.kind not in "fiub":
        raise TypeError(f"{name}: expected a real numeric array; got dtype {array.dtype}")
    return array.astype(dtype, copy=False)


def as_shaped_array(name: str, value, shape: tuple, dtype: str) -> np.ndarray:
    """A fresh C-contiguous array of ``dtype`` and exactly ``shape`` (states, state_dict entries)."""
    if type(value) is np.ndarray and value.dtype is _NUMPY_DTYPES.get(dtype) and value.shape == shape:
        return value.copy()  # the common case, first: a state at each step of a stream
    array = as_real_array(name, value, dtype)
    if array.shape != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}; got {array.shape}")
    return np.array(array, order="C", copy=True)


def check_ndim(name: str, array: np.ndarray, ndim: int, layout: str) -> None:
    """ValueError unless ``array`` has ``ndim`` dimensions (``layout`` describes them)."""
    if array.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D array {layout}; got shape {array.shape}")


def check_sequence_input(name: str, x: np.ndarray, layout: str, input_size: int | None) -> None:
    """A 3-D input with at least one step, row and feature and, once built, the built feature size."""
    check_ndim(name, x, 3, layout)
    if 0 in x.shape:
        raise ValueError(f"{name}: batch, time and feature sizes must be at least 1; got shape {x.shape}")
    if input_size is not None and x.shape[2] != input_size:
        raise ValueError(f"{name}: expected {input_size} features (the layer was built for them); got {x.shape[2]}")


def as_mask(name: str, mask, batch: int, steps: int) -> np.ndarray:
    """A ``(batch, time)`` boolean mask; integer 0/1 masks are accepted."""
    array = np.asarray(to_numpy(mask))
    if array.dtype.kind == "b":
        pass
    elif array.dtype.kind in "iu" and np.isin(array, (0, 1)).all():
        array = array.astype(bool)
    else:
        raise TypeError(f"{name}: expected a boolean (or 0/1 integer) array; got dtype {array.dtype}")
    if array.shape != (batch, steps):
        raise ValueError(f"{name}: expected shape (batch, time) = {(batch, steps)}; got {array.shape}")
    return array


def as_lengths(name: str, lengths, batch: int, steps: int, minimum: int = 0) -> np.ndarray:
    """Per-sequence lengths: ``(batch,)`` integers in ``[minimum, steps]`` (torch tensors accepted)."""
    array = np.asarray(to_numpy(lengths))
    if array.dtype.kind not in "iuf" or (array.dtype.kind == "f" and not np.all(np.mod(array, 1) == 0)):
        raise TypeError(f"{name}: expected integers; got dtype {array.dtype}")
    if array.shape != (batch,):
        raise ValueError(f"{name}: expected shape (batch,) = ({batch},); got {array.shape}")
    if array.size and (array.min() < minimum or array.max() > steps):  # before a cast, which wraps huge floats
        raise ValueError(
            f"{name}: every length must lie in [{minimum}, {steps}] (the time size is {steps}); got {array.tolist()}"
        )
    return np.ascontiguousarray(array, dtype=np.int64)


def check_finite(owner: str, name: str, array: np.ndarray) -> None:
    """ValueError if a weight holds NaN or infinity."""
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{owner}: {name} holds NaN or infinite values; weights must be finite")


def check_cell_chain(owner: str, label: str, cells, features: int) -> None:
    """Raise unless every built cell of a stack was built for the width it gets: ``features`` for the first cell,
    the output size of the cell below for the others (``label``: how the stack's cells are named, ``cells``)."""
    width, source = features, "the input"
    for i, cell in enumerate(cells):
        if cell.input_size is not None and cell.input_size != width:
            raise ValueError(f"{owner}: {label}[{i}] ({cell.name}) was built for {cell.input_size} input features; "
                             f"{source} gives it {width}")
        width, source = cell.output_size, f"{label}[{i}]"


def read_only_copies(arrays: dict, dtype: str) -> dict:
    """Contiguous copies of ``arrays`` in ``dtype``, each read-only: a cell's weights, changed only by assignment,
    which also drops their pack (an array edited in place would leave the kernels on the old values)."""
    copies = {}
    for name, array in arrays.items():
        copy = np.array(array, dtype=dtype, order="C", copy=True)
        copy.flags.writeable = False
        copies[name] = copy
    return copies


def dropout_rate(owner: str, name: str, value) -> float:
    """A dropout fraction in ``[0, 1]`` (accepted for ported code; numrnn applies no dropout)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) \
            or not 0 <= value <= 1:
        raise ValueError(f"{owner}: {name} must be a number in [0, 1]; got {value!r}")
    return float(value)


def refuse_training_dropout(owner: str, rates: list[tuple[str, float]], remedy: str) -> None:
    """For a call in training mode: ValueError if any of the named ``rates`` would apply dropout. numrnn runs
    inference only, so it would return the result without dropout where the framework returns one with it
    (``remedy``: what to do instead)."""
    applied = [(name, rate) for name, rate in rates if rate > 0]
    if applied:
        given = ", ".join(f"{name}={rate}" for name, rate in applied)
        raise ValueError(f"{owner}: a training call would apply dropout ({given}); numrnn runs inference only and "
                         f"applies none: {remedy}")
