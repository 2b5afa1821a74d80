"""Keras-style recurrent layers: ``RNN``, its shorthands ``SimpleRNN``/``LSTM``/``GRU``, and ``Bidirectional``.

Both layer kinds share one pipeline (:class:`RecurrentLayer`): validate the
input, lower the layer to a :class:`codegen.spec.StackSpec`, run the generated
kernel on packed weights, and return Keras 3's structure.
"""

from __future__ import annotations

import numpy as np

from codegen.spec import BlockSpec, DirectionSpec, StackSpec
from numrnn.layers.cells import (
    BUILD_LOCK,
    GRUCell,
    LSTMCell,
    RNNCell,
    SimpleRNNCell,
    StackedRNNCells,
    check_inference,
    deserialize_cell,
    feature_size,
    serialize,
    weight_list,
)
from numrnn.runtime import Kernel, get_kernel, kernel_for
from numrnn.runtime.policy import normalize_unroll, resolve_unroll
from numrnn.validation import (
    as_mask,
    as_real_array,
    as_shaped_array,
    check_cell_chain,
    check_dtype_if_given,
    check_sequence_input,
)


def _flatten(structure) -> list:
    if not isinstance(structure, (list, tuple)):
        return [structure]
    leaves = []
    for item in structure:
        if isinstance(item, (list, tuple)):
            leaves.extend(_flatten(item))
        else:
            leaves.append(item)
    return leaves


class RecurrentLayer:
    """What ``RNN`` and ``Bidirectional`` share: weights, states, the kernel call."""

    def __init__(self, *, return_sequences, return_state, stateful, unroll, time_major):
        self.return_sequences = bool(return_sequences)
        self.return_state = bool(return_state)
        self.stateful = bool(stateful)
        self.unroll = normalize_unroll(type(self).__name__, unroll)
        self.time_major = bool(time_major)
        self.states: list[np.ndarray] | None = None

    # -- to be provided by the subclass ---------------------------------------------------------
    def _directions(self) -> list[tuple[list[RNNCell], str]]:
        """``(cells, reverse)`` per direction."""
        raise NotImplementedError

    def _direction_labels(self) -> list[str]:
        """How messages name each direction's list of cells."""
        raise NotImplementedError

    def _merge(self):
        return "concat"

    def _masking(self, has_mask: bool) -> str:
        raise NotImplementedError

    def _structure(self, output: np.ndarray, states: list[np.ndarray], initial_state):
        raise NotImplementedError

    # -- structure -----------------------------------------------------------------------------
    @property
    def all_cells(self) -> list[RNNCell]:
        """Every cell, in weight order."""
        return [cell for cells, _ in self._directions() for cell in cells]

    @property
    def dtype(self) -> str:
        """The cells' dtype."""
        return self.all_cells[0].dtype

    @property
    def input_size(self) -> int | None:
        """Feature size the layer was built for, or ``None``."""
        return self.all_cells[0].input_size

    @property
    def built(self) -> bool:
        """Whether every cell has weights."""
        return all(cell.built for cell in self.all_cells)

    def build(self, input_shape) -> None:
        """Create Keras-default weights, for inputs whose last dimension is the feature size, for the cells that
        have none (as Keras builds only unbuilt sublayers: weights already set stay)."""
        features = feature_size(f"{type(self).__name__}.build", input_shape)
        for cells, _ in self._directions():
            width = features
            for cell in cells:
                if not cell.built:
                    cell.build(width)
                width = cell.output_size

    def _check_cells(self, features: int) -> None:
        """Raise unless every cell was built for the width it gets (a cell built or set apart from the layer)."""
        for (cells, _), label in zip(self._directions(), self._direction_labels()):
            check_cell_chain(type(self).__name__, label, cells, features)

    def spec(self, steps: int, masking: str = "none") -> StackSpec:
        """The spec this layer runs for ``steps`` time steps under ``masking`` (see :mod:`numrnn.runtime.policy`)."""
        unroll, unroll_steps = resolve_unroll(type(self).__name__, self.unroll, steps)
        directions = tuple(DirectionSpec(tuple(c.cell_spec() for c in cells), reverse)
                           for cells, reverse in self._directions())
        return StackSpec(
            blocks=(BlockSpec(directions, self._merge()),),
            input_size=self.input_size,
            dtype=self.dtype,
            masking=masking,
            return_sequences=self.return_sequences,
            unroll=unroll,
            unroll_steps=unroll_steps,
        )

    def _kernel(self, directions: list, features: int, steps: int, masking: str) -> Kernel:
        """The kernel of a call on ``features`` features, ``steps`` steps, ``masking``: :meth:`spec`'s, made (and
        the cells' widths checked) once per configuration (:func:`kernel_for`). ``directions``: :meth:`_directions`.
        """
        # The resolved unroll (the spec's), not the option: unroll=True and unroll=1 compare equal.
        key = ["keras layer", resolve_unroll(type(self).__name__, self.unroll, steps), masking, self.return_sequences,
               self._merge(), directions[0][0][0].dtype, features]
        for cells, reverse in directions:
            key.append(reverse)
            for cell in cells:
                key += (cell.cell_spec(), cell.input_size)
        return kernel_for(tuple(key), lambda: self._checked_spec(features, steps, masking))

    def _checked_spec(self, features: int, steps: int, masking: str) -> StackSpec:
        self._check_cells(features)
        return self.spec(steps, masking)

    def source(self, steps: int = 1, masking: str = "none") -> str:
        """The generated kernel source for ``steps`` steps (only matters when unrolled) and ``masking``."""
        self._require_built("source")
        return get_kernel(self.spec(steps, masking)).source

    # -- weights -------------------------------------------------------------------------------
    def get_weights(self) -> list[np.ndarray]:
        """Every cell's Keras weights, cell after cell."""
        self._require_built("get_weights")
        return [w for cell in self.all_cells for w in cell.get_weights()]

    def set_weights(self, weights) -> None:
        """Set every cell's weights from Keras order and shapes (builds the layer if needed)."""
        owner = f"{type(self).__name__}.set_weights"
        weights = weight_list(owner, weights)
        counts = [2 + cell.use_bias for cell in self.all_cells]
        if len(weights) != sum(counts):
            raise ValueError(f"{owner}: expected {sum(counts)} arrays ({' + '.join(map(str, counts))} for the "
                             f"{len(counts)} cells); got {len(weights)}")
        converted, start, features = [], 0, self.input_size
        for cells, _ in self._directions():
            width = features
            for cell in cells:
                n = 2 + cell.use_bias
                logical = cell.convert_keras_weights(weights[start: start + n], f"{owner}: {cell.name}", width)
                converted.append(logical)
                if features is None:  # the first kernel sets the input size of every direction
                    features = logical["kernel"].shape[0]
                width, start = cell.output_size, start + n
        for cell, logical in zip(self.all_cells, converted):
            cell.assign_logical(logical)

    def count_params(self) -> int:
        """Number of scalar weights (Keras's count)."""
        self._require_built("count_params")
        return sum(cell.count_params() for cell in self.all_cells)

    def _require_built(self, what: str) -> None:
        if not self.built:
            raise ValueError(f"{type(self).__name__}.{what}: the layer has no weights yet; call it, build(input_shape) "
                             "or set_weights() first")

    # -- states --------------------------------------------------------------------------------
    def _state_shapes(self, batch: int, sizes: tuple[int, ...] | None = None) -> list[tuple[int, int]]:
        """``(batch, width)`` of each state, cell after cell (``sizes``: the widths, if known)."""
        if sizes is None:
            sizes = [s for cell in self.all_cells for s in cell.cell_spec().state_sizes]
        return [(batch, size) for size in sizes]

    def _states_from(self, given, shapes: list[tuple[int, int]], name: str, dtype: str) -> list[np.ndarray]:
        leaves = _flatten(given)
        if len(leaves) != len(shapes):
            raise ValueError(f"{name}: expected {len(shapes)} state arrays (per cell h, or h and c for LSTM); "
                             f"got {len(leaves)}")
        return [as_shaped_array(f"{name}[{i}]", leaves[i], shapes[i], dtype) for i in range(len(shapes))]

    def reset_states(self, states=None) -> None:
        """Stateful layers: zero the kept states, or set them to ``states`` (Keras nesting or flat)."""
        if not self.stateful:
            raise ValueError(f"{type(self).__name__}.reset_states: the layer is not stateful (stateful=False)")
        if states is not None:
            leaves = _flatten(states)
            name = f"{type(self).__name__}.reset_states: states"
            if leaves and np.ndim(leaves[0]) != 2:
                raise ValueError(f"{name}[0]: expected a (batch, {self._state_shapes(0)[0][1]}) array; "
                                 f"got shape {np.shape(leaves[0])}")
            shapes = self._state_shapes(np.shape(leaves[0])[0] if leaves else 0)
            self.states = self._states_from(states, shapes, name, self.dtype)
        elif self.states is not None:
            self.states = [np.zeros_like(s) for s in self.states]

    def _initial_states(self, initial_state, batch: int, sizes: tuple[int, ...], dtype: str) -> list[np.ndarray]:
        shapes = self._state_shapes(batch, sizes)
        if initial_state is not None:
            return self._states_from(initial_state, shapes, f"{type(self).__name__}: initial_state", dtype)
        if self.stateful and self.states is not None:
            kept = self.states[0].shape[0]
            if kept != batch:
                raise ValueError(f"x: this stateful layer keeps states for batch size {kept}; got batch size "
                                 f"{batch}. Call reset_states(states) with states of the new batch size first.")
            return [s.copy() for s in self.states]
        return [np.zeros(shape, dtype=dtype) for shape in shapes]

    # -- running -------------------------------------------------------------------------------
    def __call__(self, x, mask=None, initial_state=None, training=None):
        """Run the layer on ``x`` (``(batch, time, features)``, or ``(time, batch, features)`` if time_major).

        ``mask``: optional boolean ``(batch, time)``. ``initial_state``: Keras
        nesting (per cell ``h`` or ``[h, c]``; per-cell lists for a stack) or a
        flat list. Returns Keras 3's structure. ``training`` is accepted as
        Keras code passes it; a true one is refused where a cell has dropout
        (numrnn applies none), else it changes nothing.
        """
        name = type(self).__name__
        directions = self._directions()
        cells = [cell for group, _ in directions for cell in group]
        if training:
            check_inference(name, training, cells)
        layout = "(time, batch, features)" if self.time_major else "(batch, time, features)"
        x = as_real_array(f"{name}: x", x, cells[0].dtype)
        check_sequence_input(f"{name}: x", x, layout, cells[0].input_size)
        if not all(cell.built for cell in cells):
            with BUILD_LOCK:
                if not self.built:
                    self._check_cells(x.shape[-1])  # the built cells, before any other is built around them
                    self.build(x.shape)
        xt = x if self.time_major else x.transpose(1, 0, 2)  # copied by the kernel where its schedule needs
        steps, batch = xt.shape[0], xt.shape[1]
        condition = None
        if mask is not None:
            condition = np.ascontiguousarray(as_mask(f"{name}: mask", mask, batch, steps).T)
        kernel = self._kernel(directions, x.shape[-1], steps, self._masking(mask is not None))
        states = self._initial_states(initial_state, batch, kernel.state_sizes, cells[0].dtype)
        weights = [array for cell in cells for array in cell.packed()]
        if self.return_sequences and not self.time_major:
            output = kernel.call_batch_major(xt, condition, states, weights)
        else:
            output = kernel(xt, condition, states, weights)
        if self.stateful:
            self.states = [s.copy() for s in states]
        return self._structure(output, states, initial_state)

    def _cell_states(self, cells: list[RNNCell], states: list[np.ndarray], nested: bool, given=None) -> list:
        """Flat states -> Keras's return structure: per cell ``[h]``/``[h, c]`` for a stack, else flat.

        As Keras's ``StackedRNNCells``, a one-state cell whose entry of the
        ``given`` initial state was a bare array (not in a list) gets its
        state back bare.
        """
        if not nested:
            return list(states)
        bare = _bare_entries(given, len(cells))
        grouped, start = [], 0
        for i, cell in enumerate(cells):
            n = len(cell.cell_spec().state_names)
            grouped.append(states[start] if n == 1 and i in bare else states[start: start + n])
            start += n
        return grouped


def _bare_entries(given, count: int) -> set[int]:
    """Indices of the entries of a per-cell initial state list that are single arrays rather than lists."""
    if not isinstance(given, (list, tuple)) or len(given) != count:
        return set()
    return {i for i, entry in enumerate(given) if not isinstance(entry, (list, tuple))}


class RNN(RecurrentLayer):
    """Keras ``RNN``: a cell, a list of cells or ``StackedRNNCells`` run over time.

    ``unroll``: ``False`` (dynamic loop), ``True`` (full static unroll, a
    kernel per sequence length), an integer ``k`` (k steps per loop
    iteration) or ``"auto"``; see :mod:`numrnn.runtime.policy`. ``name``,
    ``trainable`` and ``dtype`` are accepted as Keras configs hold them; the
    cells' dtype is the one the layer runs in.
    """

    name = "rnn"  # also for layers pickled before they had a name

    def __init__(self, cell, return_sequences=False, return_state=False, go_backwards=False, stateful=False,
                 unroll=False, time_major=False, zero_output_for_mask=False, name=None, trainable=True,
                 dtype=None):
        super().__init__(return_sequences=return_sequences, return_state=return_state, stateful=stateful,
                         unroll=unroll, time_major=time_major)
        check_dtype_if_given(type(self).__name__, dtype)
        if isinstance(cell, (list, tuple)):
            cell = StackedRNNCells(cell)
        if not isinstance(cell, (RNNCell, StackedRNNCells)):
            raise TypeError(f"RNN: cell must be a SimpleRNNCell, LSTMCell, GRUCell, a list of them or "
                            f"StackedRNNCells; got {type(cell).__name__}")
        self.cell = cell
        self.go_backwards = bool(go_backwards)
        self.zero_output_for_mask = bool(zero_output_for_mask)
        self.name = name or type(self).name

    @property
    def cells(self) -> list[RNNCell]:
        """The cells, bottom to top."""
        return self.cell.cells if isinstance(self.cell, StackedRNNCells) else [self.cell]

    def _directions(self):
        return [(self.cells, "full" if self.go_backwards else "none")]

    def _direction_labels(self):
        return ["cells"]

    def _masking(self, has_mask: bool) -> str:
        if not has_mask:
            return "none"
        return "zero" if self.zero_output_for_mask else "carry"

    def _structure(self, output, states, initial_state):
        # Keras returns a go_backwards sequence in processing order; the kernel stores it by input time.
        if self.go_backwards and self.return_sequences:
            axis = 0 if self.time_major else 1
            output = np.ascontiguousarray(np.flip(output, axis=axis))
        if not self.return_state:
            return output
        return (output, *self.keras_states(states, initial_state))

    def keras_states(self, states: list[np.ndarray], initial_state=None) -> list:
        """Flat states in Keras's return nesting for this layer (and the nesting of ``initial_state``, if given)."""
        return self._cell_states(self.cells, states, isinstance(self.cell, StackedRNNCells), initial_state)

    def get_config(self) -> dict:
        """Constructor arguments, the cell serialized Keras-style."""
        return {
            "cell": serialize(self.cell),
            "return_sequences": self.return_sequences, "return_state": self.return_state,
            "go_backwards": self.go_backwards, "stateful": self.stateful, "unroll": self.unroll,
            "time_major": self.time_major, "zero_output_for_mask": self.zero_output_for_mask, "name": self.name,
        }

    @classmethod
    def from_config(cls, config: dict):
        """Inverse of :meth:`get_config` (weights are not part of the config)."""
        config = dict(config)
        return cls(deserialize_cell(config.pop("cell")), **config)


_RNN_KWARGS = ("return_sequences", "return_state", "go_backwards", "stateful", "unroll", "time_major",
               "zero_output_for_mask")


class _CellLayer(RNN):
    """A layer shorthand: cell kwargs and RNN kwargs in one constructor.

    ``name`` names the layer and its cell (Keras's default names the layer
    ``"lstm"``, ``"gru"`` or ``"simple_rnn"``). ``activity_regularizer``
    (and ``use_cudnn`` for LSTM and GRU: ``"auto"`` or ``False``; numrnn
    has no cuDNN path, so ``True``, which Keras refuses where cuDNN cannot
    run, is refused) are kept for the config.
    """

    cell_class = RNNCell
    use_cudnn_option = False
    layer_options: dict = {}

    def __init__(self, units, *, activity_regularizer=None, **kwargs):
        owner = type(self).__name__
        layer_options = {"activity_regularizer": activity_regularizer}
        if self.use_cudnn_option:
            use_cudnn = kwargs.pop("use_cudnn", "auto")
            if use_cudnn not in ("auto", False):
                raise ValueError(f"{owner}: use_cudnn must be 'auto' or False (numrnn has no cuDNN path); "
                                 f"got {use_cudnn!r}")
            layer_options["use_cudnn"] = use_cudnn
        rnn_kwargs = {k: kwargs.pop(k) for k in _RNN_KWARGS if k in kwargs}
        super().__init__(self.cell_class(units, **kwargs), name=kwargs.get("name"), **rnn_kwargs)
        self.layer_options = layer_options

    def get_config(self) -> dict:
        """Cell arguments and RNN arguments, flat (Keras style)."""
        config = super().get_config()
        return {**config.pop("cell")["config"], **config, **self.layer_options}

    @classmethod
    def from_config(cls, config: dict):
        """Inverse of :meth:`get_config`."""
        return cls(**config)


class SimpleRNN(_CellLayer):
    """``RNN(SimpleRNNCell(units, ...))``."""

    cell_class = SimpleRNNCell
    name = "simple_rnn"


class LSTM(_CellLayer):
    """``RNN(LSTMCell(units, ...))``."""

    cell_class = LSTMCell
    use_cudnn_option = True
    name = "lstm"


class GRU(_CellLayer):
    """``RNN(GRUCell(units, ...))``."""

    cell_class = GRUCell
    use_cudnn_option = True
    name = "gru"


_LAYER_CLASSES = {cls.__name__: cls for cls in (RNN, SimpleRNN, LSTM, GRU)}


class Bidirectional(RecurrentLayer):
    """Keras ``Bidirectional``: the layer forward, a copy backward, outputs merged.

    ``merge_mode``: ``"concat"`` (default), ``"sum"``, ``"mul"``, ``"ave"`` or
    ``None`` (both outputs returned). As in Keras, masked steps give zero
    outputs when ``return_sequences`` is true, and the backward output is
    re-aligned with the input time axis. ``weights``, if given, are set at
    once (``set_weights``); ``name``, ``trainable`` and ``dtype`` are
    accepted as Keras configs hold them.
    """

    name = "bidirectional"
    _backward_given = False  # also for a Bidirectional pickled before it was kept

    def __init__(self, layer, merge_mode="concat", weights=None, backward_layer=None, name=None, trainable=True,
                 dtype=None):
        if not isinstance(layer, RNN):
            raise TypeError(f"Bidirectional: layer must be an RNN layer (RNN, SimpleRNN, LSTM, GRU); "
                            f"got {type(layer).__name__}")
        if merge_mode not in ("concat", "sum", "mul", "ave", None):
            raise ValueError(f"Bidirectional: merge_mode must be 'concat', 'sum', 'mul', 'ave' or None; "
                             f"got {merge_mode!r}")
        if layer.go_backwards:
            raise ValueError("Bidirectional: layer must run forward (go_backwards=False); the backward copy is "
                             "made for you")
        given_backward = backward_layer is not None
        if backward_layer is None:
            config = {**layer.get_config(), "go_backwards": True, "name": f"backward_{layer.name}"}
            backward_layer = type(layer).from_config(config)
        elif not isinstance(backward_layer, RNN) or not backward_layer.go_backwards:
            raise ValueError("Bidirectional: backward_layer must be an RNN layer with go_backwards=True")
        if layer.dtype != backward_layer.dtype:
            raise ValueError(f"Bidirectional: layer and backward_layer must share one dtype; got {layer.dtype} and "
                             f"{backward_layer.dtype}")
        for attr in ("return_sequences", "return_state", "stateful", "time_major"):
            if getattr(layer, attr) != getattr(backward_layer, attr):
                raise ValueError(f"Bidirectional: layer and backward_layer must agree on {attr}")
        widths = (layer.cells[-1].output_size, backward_layer.cells[-1].output_size)
        if merge_mode in ("sum", "mul", "ave") and widths[0] != widths[1]:
            raise ValueError(f"Bidirectional: merge_mode={merge_mode!r} needs layer and backward_layer of equal "
                             f"output sizes; got {widths[0]} and {widths[1]}")
        super().__init__(return_sequences=layer.return_sequences, return_state=layer.return_state,
                         stateful=layer.stateful, unroll=layer.unroll, time_major=layer.time_major)
        self.forward_layer, self.backward_layer = layer, backward_layer
        self.merge_mode = merge_mode
        self._backward_given = given_backward
        check_dtype_if_given("Bidirectional", dtype)
        self.name = name or type(self).name
        if weights is not None:
            self.set_weights(weights)

    def _directions(self):
        return [(self.forward_layer.cells, "none"), (self.backward_layer.cells, "full")]

    def _direction_labels(self):
        return ["layer.cells", "backward_layer.cells"]

    def _merge(self):
        return self.merge_mode

    def _masking(self, has_mask: bool) -> str:
        if not has_mask:
            return "none"
        # Keras forces zero_output_for_mask = return_sequences on both directions.
        return "zero" if self.return_sequences else "carry"

    def _structure(self, output, states, initial_state):
        if self.merge_mode is None:
            width = self.forward_layer.cells[-1].output_size
            outputs = (np.ascontiguousarray(output[..., :width]), np.ascontiguousarray(output[..., width:]))
        else:
            outputs = (output,)
        if not self.return_state:
            return outputs if self.merge_mode is None else output
        n_forward = sum(len(c.cell_spec().state_names) for c in self.forward_layer.cells)
        given = initial_state if isinstance(initial_state, (list, tuple)) else []
        half = len(given) // 2  # Keras gives each direction half of a list initial_state
        forward = self.forward_layer.keras_states(states[:n_forward], given[:half])
        backward = self.backward_layer.keras_states(states[n_forward:], given[half:])
        return (*outputs, *forward, *backward)

    def get_config(self) -> dict:
        """``{"layer": ..., "merge_mode": ...}`` with the layer serialized, and ``backward_layer`` if one was given."""
        config = {"layer": serialize(self.forward_layer), "merge_mode": self.merge_mode, "name": self.name}
        if self._backward_given:
            config["backward_layer"] = serialize(self.backward_layer)
        return config

    @classmethod
    def from_config(cls, config: dict):
        """Inverse of :meth:`get_config`; also reads a Keras ``Bidirectional`` config."""
        config = dict(config)
        layer, backward = config.pop("layer"), config.pop("backward_layer", None)
        return cls(_deserialize_layer(layer), backward_layer=None if backward is None else _deserialize_layer(backward),
                   **config)


def _deserialize_layer(data: dict) -> RNN:
    if data.get("class_name") not in _LAYER_CLASSES:
        raise ValueError(f"Bidirectional.from_config: unknown layer class {data.get('class_name')!r}")
    return _LAYER_CLASSES[data["class_name"]].from_config(data["config"])
