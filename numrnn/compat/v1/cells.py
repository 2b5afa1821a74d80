"""TF1-style cells: ``BasicRNNCell``, ``BasicLSTMCell``, ``LSTMCell``, ``GRUCell``, ``MultiRNNCell``.

A cell holds its weights in numrnn's logical layout and shows them in TF1's
variable order and shapes (``get_weights``/``set_weights``, names from
``weight_names``). States use TF1's structures: an ``LSTMStateTuple(c, h)``
per LSTM cell, a bare ``(batch, units)`` array otherwise, a tuple of those for
``MultiRNNCell``. Calling a cell runs one step through a generated kernel
unrolled for one step, the same code path as a whole sequence.
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import numpy as np

from codegen.spec import ACTIVATIONS, CellSpec, simple_stack
from numrnn.compat.weights import tf1_cell_arrays, tf1_cell_weights, tf1_weight_names
from numrnn.layers.cells import BUILD_LOCK, checked_initializer, feature_size
from numrnn.layers.initializers import glorot_uniform, make_initializer
from numrnn.runtime import kernel_for, pack_cell
from numrnn.validation import (
    as_real_array,
    as_shaped_array,
    check_cell_chain,
    check_finite,
    check_ndim,
    normalize_dtype,
    read_only_copies,
)


class LSTMStateTuple(NamedTuple):
    """TF1's LSTM state: ``c`` (cell state) first, then ``h`` (the output)."""

    c: object
    h: object


def normalize_activation(owner: str, activation) -> str:
    """A TF1 activation: ``None`` (tanh), a name, or a function named like one (``np.tanh``, ``tf.nn.relu``)."""
    if activation is None:
        return "tanh"
    name = activation if isinstance(activation, str) else getattr(activation, "__name__", None)
    if name not in ACTIVATIONS:
        raise ValueError(f"{owner}: activation must be None or one of {', '.join(map(repr, ACTIVATIONS))} "
                         f"(a name or a function of that name); got {activation!r}")
    return name


def _positive_int(owner: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"{owner}: {name} must be a positive integer; got {value!r}")
    return int(value)


def _real(owner: str, name: str, value) -> float:
    """``float(value)``, or a ValueError naming ``name`` (bools and strings, which ``float`` takes, too)."""
    if not isinstance(value, (bool, str, bytes)):
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    raise ValueError(f"{owner}: {name} must be a real number; got {value!r}")


class RNNCell:
    """What every TF1-style cell and ``MultiRNNCell`` offer: weights, states, a one-step call."""

    # -- to be provided by the subclasses ------------------------------------------------------
    def leaves(self) -> list[LeafCell]:
        """The plain cells, bottom to top (a plain cell is its own only leaf)."""
        raise NotImplementedError

    @property
    def state_size(self):
        """TF1's ``state_size`` structure."""
        raise NotImplementedError

    def flatten_state(self, state, name: str, batch: int, dtype: str) -> list[np.ndarray]:
        """A TF1 state structure -> fresh engine state arrays (per leaf ``h`` or ``h, c``), validated."""
        raise NotImplementedError

    def pack_state(self, flat: list[np.ndarray]):
        """Engine state arrays -> TF1's state structure (inverse of :meth:`flatten_state`)."""
        raise NotImplementedError

    def weight_names(self) -> list[str]:
        """TF1 variable names (without the outer ``rnn/`` scope and ``:0``), in :meth:`get_weights` order."""
        raise NotImplementedError

    # -- shared --------------------------------------------------------------------------------
    @property
    def output_size(self) -> int:
        """Width of the output (``num_proj`` for a projected LSTM, else ``num_units``) of the top cell."""
        return self.leaves()[-1].output_size

    @property
    def dtype(self) -> str:
        """The weights' dtype."""
        return self.leaves()[0].dtype

    @property
    def input_size(self) -> int | None:
        """Feature size the cell was built for, or ``None``."""
        return self.leaves()[0].input_size

    @property
    def built(self) -> bool:
        """Whether every weight exists."""
        return all(leaf.built for leaf in self.leaves())

    def build(self, inputs_shape) -> None:
        """Create TF1-default weights for inputs whose last dimension (or the int given) is the feature size, for
        the cells that have none (weights already set stay)."""
        width = feature_size(f"{type(self).__name__}.build", inputs_shape, "inputs_shape")
        for leaf in self.leaves():
            if not leaf.built:
                leaf.build(width)
            width = leaf.output_size

    def ensure_built(self, name: str, features: int) -> None:
        """Build for ``features`` if needed, else check the feature size matches."""
        if not self.built:
            with BUILD_LOCK:
                if not self.built:
                    check_cell_chain(name, "leaves", self.leaves(), features)  # before building around them
                    self.build(features)
        if features != self.input_size:
            raise ValueError(f"{name}: expected {self.input_size} features (the cell was built for them); "
                             f"got {features}")
        check_cell_chain(name, "leaves", self.leaves(), features)

    def get_weights(self) -> list[np.ndarray]:
        """The TF1 variables' values in creation order (``tf.trainable_variables()`` order)."""
        return [w for leaf in self.leaves() for w in leaf.get_weights()]

    def set_weights(self, weights) -> None:
        """Set every variable from a list in :meth:`get_weights` order and TF1 shapes; builds if needed.

        The input size comes from the first kernel (``[x, h] @ W`` has
        ``input_size + output_size`` rows). Nothing is assigned unless every
        array is valid.
        """
        owner = f"{type(self).__name__}.set_weights"
        if isinstance(weights, dict) or not isinstance(weights, (list, tuple)):
            raise TypeError(f"{owner}: weights must be a list of arrays in TF1 variable order "
                            f"({', '.join(self.weight_names())}); got {type(weights).__name__}")
        counts = [len(leaf.weight_names()) for leaf in self.leaves()]
        if len(weights) != sum(counts):
            raise ValueError(f"{owner}: expected {sum(counts)} arrays ({', '.join(self.weight_names())}); "
                             f"got {len(weights)}")
        converted, start, width = [], 0, None
        for leaf, n in zip(self.leaves(), counts):
            logical = leaf.convert_tf1_weights(list(weights[start: start + n]), owner, width, start)
            converted.append(logical)
            width, start = leaf.output_size, start + n
        for leaf, logical in zip(self.leaves(), converted):
            leaf.assign_logical(logical)

    def count_params(self) -> int:
        """Number of scalar weights."""
        return int(sum(w.size for w in self.get_weights()))

    def zero_state(self, batch_size, dtype=None):
        """Zeros in TF1's state structure for ``batch_size`` rows."""
        owner = f"{type(self).__name__}.zero_state"
        batch = _positive_int(owner, "batch_size", batch_size)
        dtype = self.dtype if dtype is None else normalize_dtype(owner, dtype)
        sizes = [n for leaf in self.leaves() for n in leaf.cell_spec().state_sizes]
        return self.pack_state([np.zeros((batch, n), dtype=dtype) for n in sizes])

    def packed_weights(self, dtype: str) -> list[np.ndarray]:
        """Every leaf's kernel arguments in ``dtype`` (cached per leaf until its weights change)."""
        return [a for leaf in self.leaves() for a in leaf.packed(dtype)]

    def __call__(self, inputs, state, scope=None):
        """One time step: ``(output, new_state)``, like TF1's ``cell(inputs, state)``.

        ``inputs`` is ``(batch, features)``; ``state`` is in TF1's structure
        (see :meth:`zero_state`); ``scope`` is accepted and ignored.
        """
        owner = type(self).__name__
        x = as_real_array(f"{owner}: inputs", inputs, self.dtype)
        check_ndim(f"{owner}: inputs", x, 2, "(batch, features)")
        self.ensure_built(f"{owner}: inputs", x.shape[1])
        states = self.flatten_state(state, f"{owner}: state", x.shape[0], self.dtype)
        specs, dtype = tuple(leaf.cell_spec() for leaf in self.leaves()), self.dtype
        kernel = kernel_for(("tf1 step", dtype, x.shape[1], specs),
                            lambda: simple_stack(specs, x.shape[1], dtype=dtype, return_sequences=False, unroll=1))
        output = kernel(np.ascontiguousarray(x[None]), None, states, self.packed_weights(dtype))
        return output, self.pack_state(states)


def _state_leaf(name: str, value, shape: tuple[int, int], dtype: str) -> np.ndarray:
    if isinstance(value, (tuple, list)):
        raise ValueError(f"{name}: expected an array of shape {shape}; got a {type(value).__name__} of "
                         f"{len(value)} items")
    return as_shaped_array(name, value, shape, dtype)


class LeafCell(RNNCell):
    """Base of the plain TF1-style cells (everything but ``MultiRNNCell``).

    :meth:`build` draws the weights with the initializers a cell was given
    (``GRUCell``'s ``kernel_initializer`` and ``bias_initializer``,
    ``LSTMCell``'s ``initializer``: a Keras name or config, or a callable
    ``f(shape, dtype=...)`` such as a TF initializer object; see
    :mod:`numrnn.layers.initializers`), else with TF1's defaults:
    glorot-uniform kernels, zero biases, a GRU's gate bias one.
    """

    kind = ""
    scope_name = ""
    # Class-level defaults also serve cells pickled before these options existed.
    kernel_initializer = None
    bias_initializer = None

    def __init__(self, num_units, activation=None, reuse=None, name=None, dtype=None):
        owner = type(self).__name__
        self.num_units = _positive_int(owner, "num_units", num_units)
        self.activation = normalize_activation(owner, activation)
        self.name = name or self.scope_name
        self._dtype = "float32" if dtype is None else normalize_dtype(owner, dtype)
        self._input_size: int | None = None
        self._logical: dict | None = None
        self._packed: dict = {}

    def cell_spec(self) -> CellSpec:
        """This cell as a :class:`codegen.spec.CellSpec`."""
        return _cell_spec(self.kind, self.num_units, activation=self.activation)

    def leaves(self) -> list[LeafCell]:
        """``[self]``."""
        return [self]

    @property
    def state_size(self):
        """``num_units``."""
        return self.num_units

    @property
    def output_size(self) -> int:
        """Width of the output."""
        return self.cell_spec().output_size

    @property
    def dtype(self) -> str:
        """The weights' dtype."""
        return self._dtype

    @property
    def input_size(self) -> int | None:
        """Feature size the cell was built for, or ``None``."""
        return self._input_size

    @property
    def built(self) -> bool:
        """Whether the weights exist."""
        return self._logical is not None

    def weight_names(self) -> list[str]:
        """``<name>/kernel``, ``<name>/bias``, ... in TF1 creation order."""
        return [f"{self.name}/{n}" for n in tf1_weight_names(self.cell_spec())]

    # -- weights -----------------------------------------------------------------------------
    def build(self, inputs_shape) -> None:
        """Create TF1-default weights: glorot-uniform kernels, zero biases (GRU gate bias one)."""
        size = feature_size(f"{type(self).__name__}.build", inputs_shape, "inputs_shape")
        rng = np.random.default_rng()
        owner = type(self).__name__
        kernels, biases = (None if value is None else make_initializer(owner, argument, value)
                           for argument, value in self._initializer_arguments)
        arrays = [self._initial(rng, n, shape, biases if n.endswith("bias") else kernels)
                  for n, shape in self._tf1_shapes(size)]
        self.assign_logical(tf1_cell_weights(self.cell_spec(), size, arrays))

    @property
    def _initializer_arguments(self) -> tuple[tuple[str, object], tuple[str, object]]:
        """``(argument, value)`` of the kernels' initializer and of the biases', as the constructor names them."""
        return ("kernel_initializer", self.kernel_initializer), ("bias_initializer", self.bias_initializer)

    def _tf1_shapes(self, input_size: int) -> list[tuple[str, tuple]]:
        spec, rows = self.cell_spec(), input_size + self.output_size
        gu = spec.gates * spec.units
        shapes = {"kernel": (rows, gu), "bias": (gu,), "gates/kernel": (rows, 2 * spec.units),
                  "gates/bias": (2 * spec.units,), "candidate/kernel": (rows, spec.units),
                  "candidate/bias": (spec.units,), "w_f_diag": (spec.units,), "w_i_diag": (spec.units,),
                  "w_o_diag": (spec.units,), "projection/kernel": (spec.units, spec.output_size)}
        return [(n, shapes[n]) for n in tf1_weight_names(spec)]

    def _initial(self, rng, name: str, shape: tuple, draw) -> np.ndarray:
        """Variable ``name``'s first values: ``draw(shape, dtype)`` where the cell was given an initializer."""
        if draw is not None:
            return draw(shape, self._dtype)
        if name == "gates/bias":  # TF1 GRUCell starts with open gates
            return np.ones(shape)
        if name.endswith("bias"):
            return np.zeros(shape)
        if len(shape) == 1:
            return glorot_uniform(rng, (shape[0], shape[0]))[0]
        return glorot_uniform(rng, shape)

    def convert_tf1_weights(self, arrays: list, owner: str, input_size: int | None, first: int = 0) -> dict:
        """Validate this cell's TF1 arrays (count, shapes, finiteness) into logical weights, without assigning.

        ``input_size`` defaults to the built size, else to the kernel's rows
        minus the output size; ``first`` numbers the arrays in messages.
        """
        spec, names = self.cell_spec(), tf1_weight_names(self.cell_spec())
        arrays = [as_real_array(f"{owner}: weights[{first + i}]", a, self._dtype)
                  for i, a in enumerate(arrays)]
        kernel = arrays[0]
        if input_size is None:
            input_size = self._input_size
        if input_size is None:
            if kernel.ndim != 2 or kernel.shape[0] <= self.output_size:
                raise ValueError(f"{owner}: weights[{first}] ({self.name}/{names[0]}) must be 2-D with more than "
                                 f"{self.output_size} rows (input_size + {self.output_size}); got shape {kernel.shape}")
            input_size = kernel.shape[0] - self.output_size
        try:
            logical = tf1_cell_weights(spec, input_size, arrays)
        except ValueError as exc:
            detail = str(exc).split(": ", 1)[-1]
            for i, n in enumerate(names):  # name the array by its place in the caller's list and TF1 name
                detail = detail.replace(f"arrays[{i}] ({n})", f"weights[{first + i}] ({self.name}/{n})")
            raise ValueError(f"{owner}: {detail}") from None
        for i, (array, name) in enumerate(zip(arrays, names)):  # the caller's arrays, by their TF1 names
            check_finite(owner, f"weights[{first + i}] ({self.name}/{name})", array)
        return logical

    def assign_logical(self, logical: dict) -> None:
        """Adopt already-validated logical weights (the input size is read from the kernel)."""
        self._input_size = int(logical["kernel"].shape[0])
        self._logical = read_only_copies(logical, self._dtype)
        self._packed = {}

    def logical_weights(self) -> dict:
        """The weights in numrnn's logical layout: a new dict of the read-only arrays the kernels are packed from
        (``set_weights`` changes them)."""
        self._require_built("logical_weights")
        return dict(self._logical)

    def get_weights(self) -> list[np.ndarray]:
        """TF1 variables in creation order and shape (see :meth:`weight_names`)."""
        self._require_built("get_weights")
        return [np.asarray(a, dtype=self._dtype) for a in tf1_cell_arrays(self.cell_spec(), self._logical)]

    def __getstate__(self) -> dict:
        # Packs are made again after unpickling, as the Keras-style cells' are (their panels' width is the process's).
        return {**self.__dict__, "_packed": {}}

    def __setstate__(self, state: dict) -> None:
        # Unpickled (or deep-copied) arrays come back writeable; the weights stay read-only (logical_weights).
        self.__dict__.update(state)
        if self._logical is not None:
            self._logical = read_only_copies(self._logical, self._dtype)

    def packed(self, dtype: str) -> list[np.ndarray]:
        """The kernel's weight arguments for this cell in ``dtype`` (cached)."""
        self._require_built("packed")
        logical = self._logical
        kept = self._packed.get(dtype)
        if kept is None or kept[0] is not logical:  # kept with its weights, as the Keras-style cells keep it
            kept = self._packed[dtype] = (logical, pack_cell(self.cell_spec(), logical, dtype))
        return kept[1]

    def _require_built(self, what: str) -> None:
        if not self.built:
            raise ValueError(f"{type(self).__name__}.{what}: the cell has no weights yet; call it, "
                             "build(input_size) or set_weights() first")

    # -- states ------------------------------------------------------------------------------
    def flatten_state(self, state, name, batch, dtype):
        """A ``(batch, num_units)`` array -> ``[h]``."""
        return [_state_leaf(name, state, (batch, self.num_units), dtype)]

    def pack_state(self, flat):
        """``[h]`` -> ``h``."""
        return flat[0]


class BasicRNNCell(LeafCell):
    """TF1 ``BasicRNNCell``: ``h = activation([x, h] @ kernel + bias)``."""

    kind = "simple"
    scope_name = "basic_rnn_cell"


class GRUCell(LeafCell):
    """TF1 ``GRUCell``: gates ``r, u`` from ``[x, h]``, candidate from ``[x, r * h]`` (reset before the matmul)."""

    kind = "gru"
    scope_name = "gru_cell"

    def __init__(self, num_units, activation=None, reuse=None, kernel_initializer=None, bias_initializer=None,
                 name=None, dtype=None):
        super().__init__(num_units, activation=activation, reuse=reuse, name=name, dtype=dtype)
        self.kernel_initializer = _initializer(type(self).__name__, "kernel_initializer", kernel_initializer)
        self.bias_initializer = _initializer(type(self).__name__, "bias_initializer", bias_initializer)

    def cell_spec(self) -> CellSpec:
        """A reset-before GRU."""
        return _cell_spec("gru", self.num_units, activation=self.activation, reset_after=False)


class _LSTMBase(LeafCell):
    kind = "lstm"

    @property
    def state_size(self):
        """``LSTMStateTuple(c=num_units, h=output_size)``."""
        return LSTMStateTuple(self.num_units, self.output_size)

    def flatten_state(self, state, name, batch, dtype):
        """``LSTMStateTuple(c, h)`` (or any ``(c, h)`` pair) -> ``[h, c]``."""
        if not isinstance(state, (tuple, list)) or len(state) != 2:
            got = (f"a {type(state).__name__} of {len(state)} items" if isinstance(state, (tuple, list))
                   else f"{type(state).__name__}")
            raise ValueError(f"{name}: expected an LSTMStateTuple(c, h) with c {(batch, self.num_units)} and "
                             f"h {(batch, self.output_size)}; got {got}")
        c = _state_leaf(f"{name}.c", state[0], (batch, self.num_units), dtype)
        h = _state_leaf(f"{name}.h", state[1], (batch, self.output_size), dtype)
        return [h, c]

    def pack_state(self, flat):
        """``[h, c]`` -> ``LSTMStateTuple(c, h)``."""
        return LSTMStateTuple(c=flat[1], h=flat[0])

    def _lstm_spec(self, **options) -> CellSpec:
        """``CellSpec("lstm", ...)`` of this cell; a bad option is a ``ValueError`` named after the cell's class."""
        try:
            return _cell_spec("lstm", self.num_units, activation=self.activation, **options)
        except ValueError as exc:
            raise ValueError(f"{type(self).__name__}: {str(exc).split(': ', 1)[-1]}") from None


def _initializer(owner: str, argument: str, value):
    """``None`` (TF1's default) or the initializer as a cell keeps it (:func:`checked_initializer`)."""
    return None if value is None else checked_initializer(owner, argument, value)


#: The cells' specs, one object for equal options: a step's call makes them again (making one checks every
#: option), then hashes them (:func:`numrnn.runtime.kernel_for`).
_cell_spec = lru_cache(maxsize=256)(CellSpec)


def _check_state_is_tuple(owner: str, state_is_tuple) -> None:
    if not state_is_tuple:
        raise ValueError(f"{owner}: state_is_tuple=False (concatenated states) is not supported; got "
                         f"{state_is_tuple!r}. Use the default state_is_tuple=True.")


class BasicLSTMCell(_LSTMBase):
    """TF1 ``BasicLSTMCell``: gates ``i, j, f, o`` from ``[x, h]``, ``forget_bias`` added at run time."""

    scope_name = "basic_lstm_cell"

    def __init__(self, num_units, forget_bias=1.0, state_is_tuple=True, activation=None, reuse=None, name=None,
                 dtype=None):
        super().__init__(num_units, activation=activation, reuse=reuse, name=name, dtype=dtype)
        _check_state_is_tuple(type(self).__name__, state_is_tuple)
        self.forget_bias = _real(type(self).__name__, "forget_bias", forget_bias)
        self.cell_spec()  # validates forget_bias now, not at the first call

    def cell_spec(self) -> CellSpec:
        """An LSTM with a run-time forget bias."""
        return self._lstm_spec(forget_bias=self.forget_bias)


class LSTMCell(_LSTMBase):
    """TF1 ``LSTMCell``: ``BasicLSTMCell`` plus peepholes, cell clipping and an output projection.

    The output-gate peephole reads the new (clipped) ``c``; with ``num_proj``
    the output and ``h`` are ``(o * tanh(c)) @ projection``. ``initializer``
    draws the kernel, the peephole diagonals and the projection (biases start
    at zero). ``proj_clip`` and sharding are not supported.
    """

    scope_name = "lstm_cell"

    def __init__(self, num_units, use_peepholes=False, cell_clip=None, initializer=None, num_proj=None,
                 proj_clip=None, num_unit_shards=None, num_proj_shards=None, forget_bias=1.0, state_is_tuple=True,
                 activation=None, reuse=None, name=None, dtype=None):
        super().__init__(num_units, activation=activation, reuse=reuse, name=name, dtype=dtype)
        owner = type(self).__name__
        _check_state_is_tuple(owner, state_is_tuple)
        for arg, value in (("proj_clip", proj_clip), ("num_unit_shards", num_unit_shards),
                           ("num_proj_shards", num_proj_shards)):
            if value is not None:
                raise ValueError(f"{owner}: {arg} is not supported; expected None, got {value!r}")
        self.use_peepholes = bool(use_peepholes)
        self.cell_clip = None if cell_clip is None else _real(owner, "cell_clip", cell_clip)
        self.num_proj = None if num_proj is None else _positive_int(owner, "num_proj", num_proj)
        self.forget_bias = _real(owner, "forget_bias", forget_bias)
        self.initializer = _initializer(owner, "initializer", initializer)
        self.cell_spec()  # validates cell_clip and forget_bias now, not at the first call

    @property
    def _initializer_arguments(self) -> tuple[tuple[str, object], tuple[str, object]]:
        # TF1's LSTMCell draws its kernel, peephole diagonals and projection with ``initializer``; biases are zeros.
        return ("initializer", self.initializer), ("bias_initializer", None)

    def cell_spec(self) -> CellSpec:
        """An LSTM with this cell's peepholes, clip, projection and forget bias."""
        return self._lstm_spec(peephole=self.use_peepholes, cell_clip=self.cell_clip, proj_units=self.num_proj,
                               forget_bias=self.forget_bias)


class MultiRNNCell(RNNCell):
    """TF1 ``MultiRNNCell``: cells run one above the other at every step; the state is a tuple of theirs."""

    def __init__(self, cells, state_is_tuple=True):
        owner = type(self).__name__
        _check_state_is_tuple(owner, state_is_tuple)
        if not isinstance(cells, (list, tuple)) or not cells:
            raise ValueError(f"{owner}: cells must be a non-empty list of cells; got {cells!r}")
        for i, cell in enumerate(cells):
            if not isinstance(cell, RNNCell):
                raise TypeError(f"{owner}: cells[{i}] must be a numrnn.compat.v1 cell (BasicRNNCell, "
                                f"BasicLSTMCell, LSTMCell, GRUCell, MultiRNNCell); got {type(cell).__name__}")
        seen = {}
        for i, cell in enumerate(cells):
            for leaf in cell.leaves():
                if id(leaf) in seen:
                    raise ValueError(f"{owner}: cells[{i}] reuses the cell object of cells[{seen[id(leaf)]}]; "
                                     "create one cell per layer (e.g. [LSTMCell(n) for _ in range(k)], not "
                                     "[LSTMCell(n)] * k)")
                seen[id(leaf)] = i
        self.cells = list(cells)

    def leaves(self) -> list[LeafCell]:
        """Every plain cell, bottom to top (nested ``MultiRNNCell`` flattened)."""
        return [leaf for cell in self.cells for leaf in cell.leaves()]

    @property
    def state_size(self):
        """A tuple of the cells' ``state_size``."""
        return tuple(cell.state_size for cell in self.cells)

    def weight_names(self) -> list[str]:
        """``multi_rnn_cell/cell_<i>/<cell name>/...`` in creation order."""
        return [f"multi_rnn_cell/cell_{i}/{n}" for i, cell in enumerate(self.cells) for n in cell.weight_names()]

    def flatten_state(self, state, name, batch, dtype):
        """A tuple with one state per cell -> the engine arrays of every leaf."""
        if not isinstance(state, (tuple, list)) or isinstance(state, LSTMStateTuple) or len(state) != len(self.cells):
            got = (f"a {type(state).__name__} of {len(state)} items" if isinstance(state, (tuple, list))
                   else type(state).__name__)
            raise ValueError(f"{name}: expected a tuple of {len(self.cells)} states (one per cell of the "
                             f"MultiRNNCell, state_size {self.state_size}); got {got}")
        return [a for i, (cell, s) in enumerate(zip(self.cells, state))
                for a in cell.flatten_state(s, f"{name}[{i}]", batch, dtype)]

    def pack_state(self, flat):
        """Engine arrays -> a tuple of the cells' states."""
        states, start = [], 0
        for cell in self.cells:
            n = sum(len(leaf.cell_spec().state_names) for leaf in cell.leaves())
            states.append(cell.pack_state(flat[start: start + n]))
            start += n
        return tuple(states)
