"""Keras-style cells: ``SimpleRNNCell``, ``LSTMCell``, ``GRUCell`` and ``StackedRNNCells``.

A cell holds its weights (logical layout, see ``codegen.spec``) and its
options; calling it runs one time step through a generated kernel unrolled
for one step, the same code path as a whole sequence.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import numpy as np

from codegen.spec import ACTIVATIONS, CellSpec, simple_stack
from numrnn.compat.weights import keras_cell_arrays, keras_cell_weights
from numrnn.layers.initializers import make_initializer
from numrnn.runtime import kernel_for, pack_cell
from numrnn.validation import (
    as_real_array,
    as_shaped_array,
    check_cell_chain,
    check_dtype_if_given,
    check_finite,
    check_ndim,
    dropout_rate,
    normalize_dtype,
    read_only_copies,
    refuse_training_dropout,
)

#: Held while a first call builds default weights: concurrent first calls of one layer or cell build them
#: once and all run on them (each used to draw its own, and most got weights the layer did not keep).
BUILD_LOCK = threading.RLock()


def normalize_activation(owner: str, name: str, value) -> str:
    """A Keras activation name (``None`` means ``"linear"``); ValueError for unknown ones."""
    value = "linear" if value is None else value
    if value not in ACTIVATIONS:
        raise ValueError(f"{owner}: {name} must be one of {', '.join(map(repr, ACTIVATIONS))}; got {value!r}")
    return value


def _own_copy(value):
    """``value`` with its dicts and lists copied (configs, which the caller may edit), objects shared."""
    if isinstance(value, dict):
        return {key: _own_copy(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_own_copy(item) for item in value)
    return value


def checked_initializer(owner: str, argument: str, value):
    """An initializer argument as a cell keeps it: checked now, so that an unknown name or parameter fails here
    and not at build, its dicts and lists copied (a config the caller may edit)."""
    make_initializer(owner, argument, value)
    return _own_copy(value)


def _positive_units(owner: str, units) -> int:
    if isinstance(units, bool) or not isinstance(units, (int, np.integer)) or units <= 0:
        raise ValueError(f"{owner}: units must be a positive integer; got {units!r}")
    return int(units)


def feature_size(owner: str, input_shape, name: str = "input_shape") -> int:
    """The feature size ``input_shape`` (the argument ``name``) gives: an int, or a shape whose last entry it is;
    a ValueError otherwise."""
    if isinstance(input_shape, (int, np.integer)):
        size = input_shape
    else:
        try:
            size = tuple(input_shape)[-1]
        except (TypeError, IndexError):
            raise ValueError(f"{owner}: {name} must be the feature size or a shape ending with it; "
                             f"got {input_shape!r}") from None
    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or size <= 0:
        raise ValueError(f"{owner}: {name}'s last entry, the feature size, must be a positive integer; got {size!r}")
    return int(size)


def weight_list(owner: str, weights) -> list:
    """``weights`` as a list: a sequence of arrays in Keras order, or an object array of them (``np.save`` of a
    ``get_weights()`` list); a TypeError for anything else (a numeric array would split into its rows)."""
    is_sequence = isinstance(weights, Sequence) and not isinstance(weights, (str, bytes))
    if not is_sequence and not (isinstance(weights, np.ndarray) and weights.dtype == object and weights.ndim == 1):
        raise TypeError(f"{owner}: weights must be a list of arrays in Keras order (kernel, recurrent_kernel and "
                        f"bias of each cell); got {type(weights).__name__}")
    return list(weights)


def one_step(owner: str, cells: list, inputs, states: list) -> tuple[np.ndarray, list[np.ndarray]]:
    """Run ``cells`` (a stack, bottom first) for one time step through a one-step unrolled kernel.

    ``states`` is flat (per cell ``h``, or ``h, c``); unbuilt cells are built
    for the input's feature size. Returns the output and fresh state arrays.
    """
    dtype = cells[0].dtype
    x = as_real_array(f"{owner}: inputs", inputs, dtype)
    check_ndim(f"{owner}: inputs", x, 2, "(batch, features)")
    if not all(cell.built for cell in cells):
        with BUILD_LOCK:
            width = x.shape[1]
            for cell in cells:
                if not cell.built:
                    cell.build(width)
                width = cell.output_size
    if x.shape[1] != cells[0].input_size:
        raise ValueError(f"{owner}: inputs: expected {cells[0].input_size} features; got {x.shape[1]}")
    check_cell_chain(owner, "cells", cells, x.shape[1])
    specs = tuple(c.cell_spec() for c in cells)
    kernel = kernel_for(("keras step", dtype, x.shape[1], specs),
                        lambda: simple_stack(specs, x.shape[1], dtype=dtype, return_sequences=False, unroll=1))
    sizes = kernel.state_sizes
    if len(states) != len(sizes):
        raise ValueError(f"{owner}: states: expected {len(sizes)} arrays; got {len(states)}")
    fresh = [as_shaped_array(f"{owner}: states[{i}]", states[i], (x.shape[0], sizes[i]), dtype)
             for i in range(len(sizes))]
    weights = [array for cell in cells for array in cell.packed()]
    return kernel(np.ascontiguousarray(x[None]), None, fresh, weights), fresh


class RNNCell:
    """Base of the Keras-style cells: weights, build, one-step call, config.

    Besides its own options, each cell takes Keras's other constructor
    arguments. ``kernel_initializer``, ``recurrent_initializer`` and
    ``bias_initializer`` make the weights that :meth:`build` draws (see
    :mod:`numrnn.layers.initializers`). The regularizers, constraints,
    ``seed`` and ``trainable`` act only in training, which numrnn does not
    do: they are kept for :meth:`get_config` and change nothing.
    ``dropout`` and ``recurrent_dropout`` (each in ``[0, 1]``) likewise
    change nothing at inference, as in Keras; a call with ``training=True``
    on a cell that has either is refused, since numrnn applies no dropout.
    """

    kind = ""
    # Class-level defaults also serve cells pickled before these options existed.
    kernel_initializer = "glorot_uniform"
    recurrent_initializer = "orthogonal"
    bias_initializer = "zeros"
    dropout = 0.0
    recurrent_dropout = 0.0
    training_only: dict = {}

    def __init__(self, units, *, activation="tanh", recurrent_activation="sigmoid", use_bias=True,
                 dtype="float32", reset_after=True, name=None, kernel_initializer="glorot_uniform",
                 recurrent_initializer="orthogonal", bias_initializer="zeros", dropout=0.0, recurrent_dropout=0.0,
                 seed=None, trainable=True, kernel_regularizer=None, recurrent_regularizer=None,
                 bias_regularizer=None, kernel_constraint=None, recurrent_constraint=None, bias_constraint=None):
        owner = type(self).__name__
        self.units = _positive_units(owner, units)
        self.activation = normalize_activation(owner, "activation", activation)
        self.recurrent_activation = normalize_activation(owner, "recurrent_activation", recurrent_activation)
        self.use_bias = bool(use_bias)
        self.reset_after = bool(reset_after)
        self.dtype = "float32" if dtype is None else normalize_dtype(owner, dtype)  # None: Keras's floatx
        self.name = name or owner.lower()
        for argument, value in (("kernel_initializer", kernel_initializer),
                                ("recurrent_initializer", recurrent_initializer),
                                ("bias_initializer", bias_initializer)):
            setattr(self, argument, checked_initializer(owner, argument, value))
        self.dropout = dropout_rate(owner, "dropout", dropout)
        self.recurrent_dropout = dropout_rate(owner, "recurrent_dropout", recurrent_dropout)
        self.training_only = _own_copy({
            "seed": seed, "trainable": trainable, "kernel_regularizer": kernel_regularizer,
            "recurrent_regularizer": recurrent_regularizer, "bias_regularizer": bias_regularizer,
            "kernel_constraint": kernel_constraint, "recurrent_constraint": recurrent_constraint,
            "bias_constraint": bias_constraint,
        })
        self.input_size: int | None = None
        self._logical: dict | None = None
        self._packed: tuple[dict, list[np.ndarray]] | None = None

    # -- description -------------------------------------------------------------------------
    def cell_spec(self) -> CellSpec:
        """This cell as a :class:`codegen.spec.CellSpec`: the same object while the options it is made of stay."""
        options = (self.kind, self.units, self.activation, self.recurrent_activation, self.use_bias,
                   self.reset_after if self.kind == "gru" else True)
        kept = self.__dict__.get("_spec")
        if kept is None or kept[0] != options:
            kept = self._spec = (options, CellSpec(*options))
        return kept[1]

    @property
    def state_size(self):
        """Keras's ``state_size``: ``units``, or ``[units, units]`` for LSTM."""
        return self.units

    @property
    def output_size(self) -> int:
        """Width of the output."""
        return self.units

    @property
    def built(self) -> bool:
        """Whether the weights exist."""
        return self._logical is not None

    # -- weights -----------------------------------------------------------------------------
    def build(self, input_shape) -> None:
        """Create weights with the cell's initializers for inputs whose last dimension is the feature size."""
        size = feature_size(f"{type(self).__name__}.build", input_shape)
        shapes = self.cell_spec().weight_shapes(size)
        logical = {"kernel": self._draw("kernel_initializer", shapes["kernel"]),
                   "recurrent_kernel": self._draw("recurrent_initializer", shapes["recurrent_kernel"])}
        if self.use_bias:
            logical.update(self._initial_biases())
        self._assign(size, logical)

    def _draw(self, argument: str, shape: tuple) -> np.ndarray:
        return make_initializer(type(self).__name__, argument, getattr(self, argument))(shape, self.dtype)

    def _initial_biases(self) -> dict:
        return {"bias": self._draw("bias_initializer", (self.cell_spec().gates * self.units,))}

    def _assign(self, input_size: int, logical: dict) -> None:
        self.input_size = input_size
        self._logical = read_only_copies(logical, self.dtype)
        self._packed = None

    def get_weights(self) -> list[np.ndarray]:
        """Keras order and shapes: kernel, recurrent_kernel[, bias]."""
        self._require_built("get_weights")
        return keras_cell_arrays(self.cell_spec(), self._logical)

    def set_weights(self, weights) -> None:
        """Set weights from Keras order and shapes; builds the cell if needed (feature size from the kernel)."""
        logical = self.convert_keras_weights(weights, f"{type(self).__name__}.set_weights", self.input_size)
        self.assign_logical(logical)

    def convert_keras_weights(self, weights, owner: str, input_size: int | None) -> dict:
        """Validate Keras-order arrays (count, shapes, finiteness) into logical weights, without assigning."""
        arrays = [as_real_array(f"{owner}: weights[{i}]", w, self.dtype)
                  for i, w in enumerate(weight_list(owner, weights))]
        if arrays and arrays[0].ndim == 2 and arrays[0].shape[0] == 0:
            raise ValueError(f"{owner}: kernel has shape {arrays[0].shape}; it needs a row per input feature")
        if input_size is not None and arrays and arrays[0].ndim == 2 and arrays[0].shape[0] != input_size:
            expected = self.cell_spec().weight_shapes(input_size)["kernel"]
            raise ValueError(f"{owner}: kernel has shape {arrays[0].shape}; expected {expected}")
        try:
            logical = keras_cell_weights(self.cell_spec(), arrays)
        except ValueError as exc:
            raise ValueError(f"{owner}: {str(exc).split(': ', 1)[-1]}") from None
        for name, array in logical.items():
            check_finite(owner, name, array)
        return logical

    def assign_logical(self, logical: dict) -> None:
        """Adopt already-validated logical weights (the input size is read from the kernel)."""
        self._assign(logical["kernel"].shape[0], logical)

    def logical_weights(self) -> dict:
        """The weights in numrnn's logical layout: a new dict of the read-only arrays the kernels are packed from
        (``set_weights`` or ``assign_logical`` change them)."""
        self._require_built("logical_weights")
        return dict(self._logical)

    def __getstate__(self) -> dict:
        # The pack is made again after unpickling: its panels are as wide as this process's vectors
        # (codegen.cells.common.vector_bytes), which another process or machine may not share.
        return {**self.__dict__, "_packed": None, "_spec": None}  # the spec too: a later numrnn's may differ

    def __setstate__(self, state: dict) -> None:
        # Unpickled (or deep-copied) arrays come back writeable; the weights stay read-only (logical_weights).
        self.__dict__.update(state)
        if self._logical is not None:
            self._logical = read_only_copies(self._logical, self.dtype)

    def packed(self) -> list[np.ndarray]:
        """The kernel's weight arguments for this cell, packed once per weight change.

        The pack is kept with the weights it was made from, in one assignment:
        a call that packed the old weights while another thread set new ones
        cannot leave its pack in place for the calls after ``set_weights``.
        """
        self._require_built("packed")
        logical = self._logical
        kept = self._packed
        if kept is None or kept[0] is not logical:
            kept = self._packed = (logical, pack_cell(self.cell_spec(), logical, self.dtype))
        return kept[1]

    def count_params(self) -> int:
        """Number of scalar weights."""
        self._require_built("count_params")
        return int(sum(a.size for a in self._logical.values()))

    def _require_built(self, what: str) -> None:
        if not self.built:
            raise ValueError(f"{type(self).__name__}.{what}: the cell has no weights yet; call build(input_shape) "
                             "or set_weights() first")

    # -- running -----------------------------------------------------------------------------
    def get_initial_state(self, batch_size: int) -> list[np.ndarray]:
        """Zero states, one array per entry of :attr:`state_size`."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 0:
            raise ValueError(f"{type(self).__name__}.get_initial_state: batch_size must be an integer >= 0; "
                             f"got {batch_size!r}")
        sizes = self.state_size if isinstance(self.state_size, list) else [self.state_size]
        return [np.zeros((batch_size, n), dtype=self.dtype) for n in sizes]

    def __call__(self, inputs, states, training=None):
        """One time step: ``(output, new_states)``, like Keras's ``cell(inputs, states)``.

        ``states`` is a list (``[h]``, or ``[h, c]`` for LSTM) or, for one-state
        cells, a bare array; the new states come back in the same form.
        ``training`` is accepted as Keras code passes it; a true one is
        refused on a cell with dropout (numrnn applies none), else it
        changes nothing.
        """
        check_inference(type(self).__name__, training, [self])
        nested = isinstance(states, (list, tuple))
        output, fresh = one_step(type(self).__name__, [self], inputs, list(states) if nested else [states])
        return output, (fresh if nested or len(fresh) > 1 else fresh[0])

    # -- config ------------------------------------------------------------------------------
    def get_config(self) -> dict:
        """Constructor arguments (Keras names), initializers and training-only options as given."""
        return _own_copy({
            "units": self.units, "activation": self.activation, "use_bias": self.use_bias, "dtype": self.dtype,
            "name": self.name, "kernel_initializer": self.kernel_initializer,
            "recurrent_initializer": self.recurrent_initializer, "bias_initializer": self.bias_initializer,
            "dropout": self.dropout, "recurrent_dropout": self.recurrent_dropout, **self.training_only})

    @classmethod
    def from_config(cls, config: dict):
        """Inverse of :meth:`get_config` (weights are not part of the config)."""
        return cls(**config)


class SimpleRNNCell(RNNCell):
    """Fully-connected recurrence ``h = activation(x W + h U + b)``."""

    kind = "simple"

    def __init__(self, units, activation="tanh", use_bias=True, dtype="float32", name=None, **keras_options):
        super().__init__(units, activation=activation, use_bias=use_bias, dtype=dtype, name=name, **keras_options)


class LSTMCell(RNNCell):
    """Long short-term memory cell, Keras gate order ``i, f, c, o``; states ``[h, c]``.

    ``unit_forget_bias`` (Keras's default): the forget gate's bias starts at
    one, whatever ``bias_initializer`` gives the other gates.
    """

    kind = "lstm"
    unit_forget_bias = True

    def __init__(self, units, activation="tanh", recurrent_activation="sigmoid", use_bias=True,
                 dtype="float32", name=None, unit_forget_bias=True, **keras_options):
        super().__init__(units, activation=activation, recurrent_activation=recurrent_activation,
                         use_bias=use_bias, dtype=dtype, name=name, **keras_options)
        self.unit_forget_bias = bool(unit_forget_bias)

    @property
    def state_size(self):
        """``[units, units]`` (h, c)."""
        return [self.units, self.units]

    def _initial_biases(self) -> dict:
        if not self.unit_forget_bias:
            return super()._initial_biases()
        # As Keras draws it: the input gate's part, ones for the forget gate, then the last two gates' part.
        u = self.units
        parts = [self._draw("bias_initializer", (u,)), np.ones(u), self._draw("bias_initializer", (2 * u,))]
        return {"bias": np.concatenate(parts)}

    def get_config(self) -> dict:
        """Constructor arguments (Keras names)."""
        return {**super().get_config(), "recurrent_activation": self.recurrent_activation,
                "unit_forget_bias": self.unit_forget_bias}


class GRUCell(RNNCell):
    """Gated recurrent unit, Keras gate order ``z, r, h``; ``reset_after`` as in Keras 3 (default) or not."""

    kind = "gru"

    def __init__(self, units, activation="tanh", recurrent_activation="sigmoid", use_bias=True,
                 reset_after=True, dtype="float32", name=None, **keras_options):
        super().__init__(units, activation=activation, recurrent_activation=recurrent_activation,
                         use_bias=use_bias, reset_after=reset_after, dtype=dtype, name=name, **keras_options)

    def _initial_biases(self) -> dict:
        if not self.reset_after:
            return super()._initial_biases()
        # Keras draws reset_after's biases as one (2, 3 * units) array: input row, then recurrent row.
        both = self._draw("bias_initializer", (2, 3 * self.units))
        return {"bias": both[0], "recurrent_bias": both[1]}

    def get_config(self) -> dict:
        """Constructor arguments (Keras names)."""
        return {**super().get_config(), "recurrent_activation": self.recurrent_activation,
                "reset_after": self.reset_after}


CELL_CLASSES = {cls.__name__: cls for cls in (SimpleRNNCell, LSTMCell, GRUCell)}


def check_inference(owner: str, training, cells: list[RNNCell]) -> None:
    """Refuse a training call (``training`` true) to cells with dropout, which numrnn does not apply."""
    if training:
        rates = [(f"{cell.name}.{name}", getattr(cell, name))  # a list: cells may share a name
                 for cell in cells for name in ("dropout", "recurrent_dropout")]
        refuse_training_dropout(owner, rates, "call it with training=False or None")


def serialize(item) -> dict:
    """``{"class_name": ..., "config": ...}`` like Keras's serialization: a cell, ``StackedRNNCells`` or a layer."""
    return {"class_name": type(item).__name__, "config": item.get_config()}


def deserialize_cell(data: dict):
    """Inverse of :func:`serialize` for a cell or ``StackedRNNCells``."""
    name = data.get("class_name")
    if name == "StackedRNNCells":
        return StackedRNNCells.from_config(data["config"])
    if name not in CELL_CLASSES:
        raise ValueError(f"from_config: unknown cell class {name!r}; expected one of {sorted(CELL_CLASSES)}")
    return CELL_CLASSES[name].from_config(data["config"])


class StackedRNNCells:
    """A list of cells used as one: ``RNN(StackedRNNCells(cells))`` is ``RNN(cells)``.

    ``dtype`` and ``trainable`` are accepted as Keras configs hold them; the
    cells' own dtype is the one they run in (as in Keras, which casts a
    stack's inputs to its cells' dtype).
    """

    name = "stacked_rnn_cells"

    def __init__(self, cells, name=None, trainable=True, dtype=None):
        cells = list(cells)
        if not cells:
            raise ValueError("StackedRNNCells: cells must hold at least one cell")
        for i, cell in enumerate(cells):
            if not isinstance(cell, RNNCell):
                raise TypeError(f"StackedRNNCells: cells[{i}] must be a SimpleRNNCell, LSTMCell or GRUCell; "
                                f"got {type(cell).__name__}")
        dtypes = {cell.dtype for cell in cells}
        if len(dtypes) > 1:
            raise ValueError(f"StackedRNNCells: all cells must share one dtype; got {sorted(dtypes)}")
        check_dtype_if_given("StackedRNNCells", dtype)
        self.cells = cells
        self.name = name or type(self).name

    @property
    def state_size(self) -> list:
        """Per-cell state sizes."""
        return [cell.state_size for cell in self.cells]

    @property
    def output_size(self) -> int:
        """Width of the last cell's output."""
        return self.cells[-1].output_size

    def get_initial_state(self, batch_size: int) -> list[list[np.ndarray]]:
        """Per-cell zero states."""
        return [cell.get_initial_state(batch_size) for cell in self.cells]

    def __call__(self, inputs, states, training=None):
        """One time step of the whole stack: ``(output, new_states)``, states per cell as given.

        ``training``: as for a cell's call.
        """
        check_inference("StackedRNNCells", training, self.cells)
        if not isinstance(states, (list, tuple)) or len(states) != len(self.cells):
            raise ValueError(f"StackedRNNCells: states: expected a list of {len(self.cells)} per-cell states; "
                             f"got {type(states).__name__}")
        per_cell = [list(s) if isinstance(s, (list, tuple)) else [s] for s in states]
        output, fresh = one_step("StackedRNNCells", self.cells, inputs, [a for s in per_cell for a in s])
        grouped, start = [], 0
        for given, cell_states in zip(states, per_cell):
            part = fresh[start: start + len(cell_states)]
            grouped.append(part if isinstance(given, (list, tuple)) else part[0])
            start += len(cell_states)
        return output, grouped

    def get_config(self) -> dict:
        """``{"cells": [serialized cell, ...], "name": ...}``."""
        return {"cells": [serialize(cell) for cell in self.cells], "name": self.name}

    @classmethod
    def from_config(cls, config: dict):
        """Inverse of :meth:`get_config`; also reads a Keras ``StackedRNNCells`` config."""
        config = dict(config)
        return cls([deserialize_cell(c) for c in config.pop("cells")], **config)
