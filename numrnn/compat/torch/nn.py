"""PyTorch-style recurrent modules: ``RNN``, ``LSTM``, ``GRU`` with PyTorch's kwargs, state_dict and layouts.

``num_layers`` layers of one or two directions lower to that many blocks of a
:class:`codegen.spec.StackSpec` (each block reads the previous block's
concatenated output). Weights are kept under PyTorch's ``state_dict`` keys and
shapes, as NumPy arrays; torch tensors are accepted wherever arrays are (duck
typed, torch is never imported). Calls are inference only: ``dropout`` is
accepted and ignored, as in ``module.eval()``; a multi-layer module with
``dropout`` put in ``train()`` mode refuses calls instead of running them
without the dropout PyTorch would apply.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import NamedTuple

import numpy as np

from codegen.spec import BlockSpec, CellSpec, DirectionSpec, StackSpec
from numrnn.compat.weights import torch_layer_weights
from numrnn.runtime import Kernel, kernel_for, pack_weights
from numrnn.runtime.policy import normalize_unroll, resolve_unroll
from numrnn.validation import (
    as_lengths,
    as_real_array,
    as_shaped_array,
    check_finite,
    check_sequence_input,
    dropout_rate,
    normalize_dtype,
    refuse_training_dropout,
)

_PARAMS = ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")


def _stacked(states: list[np.ndarray]) -> np.ndarray:
    """The call's fresh per-layer states as one ``(layers, ...)`` array: one layer's as a view (a third of
    ``np.stack``'s time, in a call of one step)."""
    return states[0][None] if len(states) == 1 else np.stack(states)


class IncompatibleKeys(NamedTuple):
    """What :meth:`RNNBase.load_state_dict` returns, like PyTorch's: keys it lacked and keys it did not use."""

    missing_keys: list
    unexpected_keys: list


def _int_at_least(owner: str, name: str, value, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{owner}: {name} must be an integer >= {low}; got {value!r}")
    return int(value)


class RNNBase:
    """What ``RNN``, ``LSTM`` and ``GRU`` share: constructor checks, state_dict, the kernel call."""

    kind = ""

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
                 bidirectional=False, proj_size=0, device=None, dtype=None, *, nonlinearity="tanh", unroll=False):
        owner = type(self).__name__
        self.input_size = _int_at_least(owner, "input_size", input_size, 1)
        self.hidden_size = _int_at_least(owner, "hidden_size", hidden_size, 1)
        self.num_layers = _int_at_least(owner, "num_layers", num_layers, 1)
        self.proj_size = _int_at_least(owner, "proj_size", proj_size, 0)
        if self.proj_size and self.kind != "lstm":
            raise ValueError(f"{owner}: proj_size argument is only supported for LSTM, not RNN or GRU; "
                             f"got proj_size={proj_size!r}")
        if self.proj_size >= self.hidden_size:
            raise ValueError(f"{owner}: proj_size has to be smaller than hidden_size ({self.hidden_size}); "
                             f"got {proj_size!r}")
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"{owner}: nonlinearity must be 'tanh' or 'relu'; got {nonlinearity!r}")
        if device is not None and not str(device).startswith("cpu"):
            raise ValueError(f"{owner}: device must be None or 'cpu' (numrnn runs these modules on the CPU); "
                             f"got {device!r}")
        self.bias = bool(bias)
        self.batch_first = bool(batch_first)
        self.dropout = dropout_rate(owner, "dropout", dropout)  # inference only: never applied
        self.bidirectional = bool(bidirectional)
        self.nonlinearity = nonlinearity
        self.unroll = normalize_unroll(owner, unroll)
        self.dtype = "float32" if dtype is None else normalize_dtype(owner, dtype)
        self.training = False
        self._params = self._initial_params()
        self._version = 0
        self._packed: tuple[int, list[np.ndarray]] | None = None  # (version, packed weights)

    # -- structure -----------------------------------------------------------------------------
    @property
    def num_directions(self) -> int:
        """2 if bidirectional, else 1."""
        return 2 if self.bidirectional else 1

    @property
    def output_size(self) -> int:
        """Width of ``h`` (``proj_size`` if set, else ``hidden_size``)."""
        return self.proj_size or self.hidden_size

    def cell_spec(self) -> CellSpec:
        """The cell every layer and direction runs."""
        if self.kind == "simple":
            return CellSpec("simple", self.hidden_size, activation=self.nonlinearity, use_bias=self.bias)
        if self.kind == "lstm":
            return CellSpec("lstm", self.hidden_size, use_bias=self.bias, proj_units=self.proj_size or None)
        return CellSpec("gru", self.hidden_size, use_bias=self.bias, reset_after=True)

    def spec(self, steps: int = 1, packed: bool = False) -> StackSpec:
        """The spec this module runs: one block per layer; ``packed`` (lengths given) reverses valid prefixes."""
        cell = self.cell_spec()
        reverses = ("none", "valid" if packed else "full")[: self.num_directions]
        block = BlockSpec(tuple(DirectionSpec((cell,), reverse) for reverse in reverses))
        unroll, unroll_steps = resolve_unroll(type(self).__name__, self.unroll, steps)
        return StackSpec(blocks=(block,) * self.num_layers, input_size=self.input_size, dtype=self.dtype,
                         masking="lengths" if packed else "none", return_sequences=True,
                         unroll=unroll, unroll_steps=unroll_steps)

    def _suffixes(self) -> list[str]:
        """``l0``, ``l0_reverse``, ``l1``, ... in PyTorch's (and the spec's cell) order."""
        return [f"l{layer}" + ("_reverse" if d else "") for layer in range(self.num_layers)
                for d in range(self.num_directions)]

    def param_shapes(self) -> OrderedDict:
        """Every ``state_dict`` key with its shape, in PyTorch's order."""
        gh = self.cell_spec().gates * self.hidden_size
        shapes = OrderedDict()
        for suffix in self._suffixes():
            layer_in = self.input_size if suffix.startswith("l0") else self.num_directions * self.output_size
            shapes[f"weight_ih_{suffix}"] = (gh, layer_in)
            shapes[f"weight_hh_{suffix}"] = (gh, self.output_size)
            if self.bias:
                shapes[f"bias_ih_{suffix}"] = (gh,)
                shapes[f"bias_hh_{suffix}"] = (gh,)
            if self.proj_size:
                shapes[f"weight_hr_{suffix}"] = (self.proj_size, self.hidden_size)
        return shapes

    def _initial_params(self) -> OrderedDict:
        # PyTorch's reset_parameters: every weight uniform in +-1/sqrt(hidden_size)
        rng, k = np.random.default_rng(), 1.0 / np.sqrt(self.hidden_size)
        return OrderedDict((key, rng.uniform(-k, k, shape).astype(self.dtype))
                           for key, shape in self.param_shapes().items())

    # -- weights -------------------------------------------------------------------------------
    def state_dict(self) -> OrderedDict:
        """PyTorch's keys and shapes, values as NumPy arrays (copies)."""
        return OrderedDict((key, value.copy()) for key, value in self._params.items())

    def load_state_dict(self, state_dict, strict=True, assign=False) -> IncompatibleKeys:
        """Load PyTorch ``state_dict`` values (NumPy arrays or torch tensors).

        ``strict``: missing or unexpected keys are a ValueError (otherwise
        missing keys keep their values and unexpected ones are ignored, and
        both are reported in the result). A mis-shaped or non-finite value is
        always a ValueError; nothing is assigned unless everything is valid.
        """
        owner = f"{type(self).__name__}.load_state_dict"
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"{owner}: state_dict must be a mapping of PyTorch keys to arrays; "
                            f"got {type(state_dict).__name__}")
        shapes = self.param_shapes()
        missing = [k for k in shapes if k not in state_dict]
        unexpected = [k for k in state_dict if k not in shapes]
        if strict and (missing or unexpected):
            raise ValueError(f"{owner}: state_dict keys do not match this {type(self).__name__} "
                             f"(expected {list(shapes)}); missing keys: {missing}; unexpected keys: {unexpected}")
        loaded = {}
        for key, shape in shapes.items():
            if key not in state_dict:
                continue
            loaded[key] = as_shaped_array(f"{owner}: state_dict[{key!r}]", state_dict[key], shape, self.dtype)
            check_finite(owner, f"state_dict[{key!r}]", loaded[key])
        self._params.update(loaded)
        self._version += 1
        return IncompatibleKeys(missing, unexpected)

    def logical_weights(self) -> list[dict]:
        """Logical weights per layer and direction (the spec's cell order)."""
        cell, out = self.cell_spec(), []
        for suffix in self._suffixes():
            arrays = {name: self._params[f"{name}_{suffix}"] for name in _PARAMS if f"{name}_{suffix}" in self._params}
            out.append(torch_layer_weights(cell, **arrays))
        return out

    def __getstate__(self) -> dict:
        # The pack is made again after unpickling, as the Keras-style cells' is (its panels' width is the process's).
        return {**self.__dict__, "_packed": None}

    def _packed_weights(self, spec: StackSpec) -> list[np.ndarray]:
        # The version is read before the weights and stored with the pack in one assignment, so a pack of
        # weights that load_state_dict replaced meanwhile (another thread) is made again on the next call.
        version = self._version
        kept = self._packed
        if kept is None or kept[0] != version:
            kept = self._packed = (version, pack_weights(spec, self.logical_weights()))
        return kept[1]

    def __getattr__(self, name):
        params = self.__dict__.get("_params", {})
        if name in params:
            view = params[name].view()
            view.flags.writeable = False  # writes must go through load_state_dict (it repacks)
            return view
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    # -- PyTorch conveniences ------------------------------------------------------------------
    def eval(self):
        """Inference mode (the mode a module starts in): returns ``self``."""
        self.training = False
        return self

    def train(self, mode=True):
        """Training mode: calls of a multi-layer module with ``dropout`` are then refused, as numrnn applies no
        dropout (PyTorch would between layers); others run as in ``eval()``. Returns ``self``."""
        self.training = bool(mode)
        return self

    def flatten_parameters(self) -> None:
        """No-op (weights are already packed for the kernel)."""

    # -- running -------------------------------------------------------------------------------
    def forward(self, input, hx=None, *, lengths=None):
        """Same as calling the module."""
        return self(input, hx, lengths=lengths)

    def __call__(self, input, hx=None, *, lengths=None):
        """Run the module; returns ``(output, h_n)`` (``(output, (h_n, c_n))`` for LSTM).

        ``input``: ``(T, B, input_size)``, ``(B, T, input_size)`` if
        ``batch_first``, or unbatched ``(T, input_size)``. ``hx``: ``h_0``
        ``(num_layers * num_directions, B, output_size)`` (LSTM: the pair
        ``(h_0, c_0)``, ``c_0`` with ``hidden_size`` columns), zeros if omitted.
        ``lengths``: ``(B,)`` valid lengths in ``[1, T]``, the semantics of
        ``pack_padded_sequence(..., enforce_sorted=False)`` then
        ``pad_packed_sequence(..., total_length=T)``: outputs past a length are
        zero, ``h_n``/``c_n`` are taken at each sequence's end, and the reverse
        direction starts at each sequence's last valid step.
        """
        name = type(self).__name__
        if self.training and self.num_layers > 1:  # PyTorch drops out between layers only
            refuse_training_dropout(name, [("dropout", self.dropout)], "call .eval() first")
        x = as_real_array(f"{name}: input", input, self.dtype)
        unbatched = x.ndim == 2
        if unbatched:
            if lengths is not None:
                raise ValueError(f"{name}: lengths needs a batched 3-D input; got an unbatched input of shape "
                                 f"{x.shape}")
            if 0 in x.shape:
                raise ValueError(f"{name}: input: time and feature sizes must be at least 1; got shape {x.shape}")
            x = x[:, None, :]
        layout = "(batch, time, input_size)" if self.batch_first else "(time, batch, input_size)"
        check_sequence_input(f"{name}: input", x, layout, self.input_size)
        batch_major = self.batch_first and not unbatched
        xt = x.transpose(1, 0, 2) if batch_major else x  # copied by the kernel where its schedule needs
        steps, batch = xt.shape[0], xt.shape[1]
        condition = None if lengths is None else as_lengths(f"{name}: lengths", lengths, batch, steps, minimum=1)
        states = self._initial_states(hx, batch, unbatched)
        kernel = self._kernel(steps, packed=condition is not None)
        weights = self._packed_weights(kernel.spec)
        if batch_major:
            y = kernel.call_batch_major(xt, condition, states, weights)
        else:
            y = kernel(xt, condition, states, weights)
        return self._structure(y, states, unbatched)

    def _kernel(self, steps: int, packed: bool) -> Kernel:
        """:meth:`spec`'s kernel, made once per configuration (:func:`kernel_for`)."""
        # The resolved unroll (the spec's), not the option: unroll=True and unroll=1 compare equal.
        key = ("torch", self.kind, self.input_size, self.hidden_size, self.num_layers, self.bias, self.bidirectional,
               self.proj_size, self.nonlinearity, self.dtype, resolve_unroll(type(self).__name__, self.unroll, steps),
               packed)
        return kernel_for(key, lambda: self.spec(steps, packed))

    def _state_shapes(self, batch: int) -> list[tuple]:
        n = self.num_layers * self.num_directions
        shapes = [(n, batch, self.output_size)]
        if self.kind == "lstm":
            shapes.append((n, batch, self.hidden_size))
        return shapes

    def _initial_states(self, hx, batch: int, unbatched: bool) -> list[np.ndarray]:
        """``hx`` (PyTorch layout) -> per layer and direction ``[h]`` or ``[h, c]`` engine arrays."""
        name = type(self).__name__
        shapes = self._state_shapes(batch)
        names = ["h_0", "c_0"][: len(shapes)]
        if hx is None:
            given = [np.zeros(s, dtype=self.dtype) for s in shapes]
        else:
            if self.kind == "lstm":
                if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                    got = f"a {type(hx).__name__} of {len(hx)} items" if isinstance(hx, (tuple, list)) else \
                        type(hx).__name__
                    raise ValueError(f"{name}: hx must be a tuple (h_0, c_0) for LSTM; got {got}")
                parts = list(hx)
            else:
                if isinstance(hx, (tuple, list)):
                    raise ValueError(f"{name}: hx must be one array h_0 for {name} (not a tuple); got a "
                                     f"{type(hx).__name__} of {len(hx)} items")
                parts = [hx]
            given = []
            for part, label, shape in zip(parts, names, shapes):
                array = as_real_array(f"{name}: hx {label}", part, self.dtype)
                expected = (shape[0], shape[2]) if unbatched else shape
                if array.shape != expected:
                    raise ValueError(f"{name}: hx {label}: expected shape {expected}; got {array.shape}")
                given.append(array[:, None, :] if unbatched else array)
        return [g[k].copy() for k in range(shapes[0][0]) for g in given]  # fresh C-ordered arrays

    def _structure(self, y: np.ndarray, states: list[np.ndarray], unbatched: bool):
        per = 2 if self.kind == "lstm" else 1
        h_n = _stacked(states[0::per])
        if unbatched:
            y, h_n = y[:, 0], h_n[:, 0]
        output = np.ascontiguousarray(y)
        if self.kind != "lstm":
            return output, np.ascontiguousarray(h_n)
        c_n = _stacked(states[1::per])
        if unbatched:
            c_n = c_n[:, 0]
        return output, (np.ascontiguousarray(h_n), np.ascontiguousarray(c_n))

    def extra_repr(self) -> str:
        """PyTorch-style summary of the constructor arguments."""
        parts = [f"{self.input_size}, {self.hidden_size}"]
        if self.proj_size:
            parts.append(f"proj_size={self.proj_size}")
        for key, default in (("num_layers", 1), ("bias", True), ("batch_first", False), ("dropout", 0.0),
                             ("bidirectional", False)):
            if getattr(self, key) != default:
                parts.append(f"{key}={getattr(self, key)}")
        if self.kind == "simple" and self.nonlinearity != "tanh":
            parts.append(f"nonlinearity={self.nonlinearity!r}")
        return ", ".join(parts)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"


class RNN(RNNBase):
    """PyTorch ``nn.RNN``: ``h = nonlinearity(x W_ih^T + b_ih + h W_hh^T + b_hh)``, ``nonlinearity`` tanh or relu."""

    kind = "simple"

    def __init__(self, input_size, hidden_size, num_layers=1, nonlinearity="tanh", bias=True, batch_first=False,
                 dropout=0.0, bidirectional=False, device=None, dtype=None, *, proj_size=0, unroll=False):
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         proj_size, device, dtype, nonlinearity=nonlinearity, unroll=unroll)


class LSTM(RNNBase):
    """PyTorch ``nn.LSTM``: gates ``i, f, g, o``; with ``proj_size`` ``h`` is projected by ``weight_hr``."""

    kind = "lstm"

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
                 bidirectional=False, proj_size=0, device=None, dtype=None, *, unroll=False):
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         proj_size, device, dtype, unroll=unroll)


class GRU(RNNBase):
    """PyTorch ``nn.GRU``: gates ``r, z, n``, reset applied after the recurrent product (``r * (h W_hn^T + b_hn)``)."""

    kind = "gru"

    def __init__(self, input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
                 bidirectional=False, device=None, dtype=None, *, proj_size=0, unroll=False):
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional,
                         proj_size, device, dtype, unroll=unroll)
