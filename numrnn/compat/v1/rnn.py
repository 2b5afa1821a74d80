"""TF1-style sequence functions: ``dynamic_rnn``, ``static_rnn``, ``bidirectional_dynamic_rnn``.

Each lowers its cells to one :class:`codegen.spec.StackSpec` block and runs the
generated kernel. TF1 semantics kept exactly:

- ``sequence_length``: outputs past a sequence's length are zero and its
  state is copied through (spec ``masking="lengths"``);
- ``bidirectional_dynamic_rnn`` reverses only each sequence's valid prefix
  (``reverse_sequence``; spec ``reverse="valid"``), or the whole time axis
  without ``sequence_length`` (``reverse="full"``); ``outputs_bw`` is
  re-aligned with the input time axis;
- ``static_rnn`` runs the statically unrolled kernel (``unroll=T``), as TF1
  builds one graph node per step.

Arguments that only steer TF1's graph building (``parallel_iterations``,
``swap_memory``, ``scope``) are accepted and ignored.
"""

from __future__ import annotations

import logging

import numpy as np

from codegen.spec import UNROLL_CEILING, BlockSpec, DirectionSpec, StackSpec
from numrnn.compat.v1.cells import RNNCell
from numrnn.runtime import kernel_for
from numrnn.validation import as_lengths, as_real_array, check_ndim, check_sequence_input, normalize_dtype

log = logging.getLogger("numrnn")


def _check_cell(name: str, cell) -> RNNCell:
    if not isinstance(cell, RNNCell):
        raise TypeError(f"{name}: expected a numrnn.compat.v1 cell (BasicRNNCell, BasicLSTMCell, LSTMCell, GRUCell "
                        f"or MultiRNNCell); got {type(cell).__name__}")
    return cell


def _run_dtype(fn: str, dtype, cells) -> str:
    """The dtype to compute in: ``dtype`` if given, else the cells' (where TF1 would demand ``dtype``)."""
    return cells[0].dtype if dtype is None else normalize_dtype(f"{fn}: dtype", dtype)


def _time_major_input(fn: str, inputs, dtype: str, time_major: bool) -> np.ndarray:
    layout = "(time, batch, features)" if time_major else "(batch, time, features)"
    x = as_real_array(f"{fn}: inputs", inputs, dtype)
    check_sequence_input(f"{fn}: inputs", x, layout, None)
    return x if time_major else x.transpose(1, 0, 2)  # copied by the kernel where its schedule needs


def _initial_states(fn: str, name: str, cell: RNNCell, given, batch: int, dtype: str) -> list[np.ndarray]:
    if given is None:
        return [np.zeros((batch, n), dtype) for leaf in cell.leaves() for n in leaf.cell_spec().state_sizes]
    return cell.flatten_state(given, f"{fn}: {name}", batch, dtype)


def _run(directions, xt: np.ndarray, lengths, states: list, dtype: str, unroll: bool,
         time_major: bool = True) -> np.ndarray:
    """Run one block of ``(cell, reverse)`` directions; ``states`` (flat, per direction) are updated in place.

    The output is time-major, or batch-major unless ``time_major``.
    """
    cells = [cell for cell, _ in directions]
    layout = tuple((tuple(leaf.cell_spec() for leaf in cell.leaves()), reverse) for cell, reverse in directions)
    steps = xt.shape[0]
    if unroll and steps > UNROLL_CEILING:
        log.info("static_rnn: %d steps exceed the static unroll ceiling of %d; running the loop kernel", steps,
                 UNROLL_CEILING)
    static = steps if unroll and steps <= UNROLL_CEILING else None
    masking = "none" if lengths is None else "lengths"

    def spec() -> StackSpec:
        block = BlockSpec(tuple(DirectionSpec(specs, reverse) for specs, reverse in layout),
                          merge=None if len(layout) == 2 else "concat")
        return StackSpec(blocks=(block,), input_size=xt.shape[2], dtype=dtype, masking=masking,
                         return_sequences=True, unroll=static)

    kernel = kernel_for(("tf1", layout, xt.shape[2], dtype, masking, static), spec)
    weights = [a for cell in cells for a in cell.packed_weights(dtype)]
    flat = [s for per_direction in states for s in per_direction]
    if time_major:
        return kernel(xt, lengths, flat, weights)
    return kernel.call_batch_major(xt, lengths, flat, weights)


def _lengths(fn: str, sequence_length, batch: int, steps: int):
    if sequence_length is None:
        return None
    return as_lengths(f"{fn}: sequence_length", sequence_length, batch, steps)


def dynamic_rnn(cell, inputs, sequence_length=None, initial_state=None, dtype=None, parallel_iterations=None,
                swap_memory=False, time_major=False, scope=None):
    """TF1 ``tf.nn.dynamic_rnn``: run ``cell`` over ``inputs``; returns ``(outputs, state)``.

    ``inputs``: ``(batch, time, features)``, or ``(time, batch, features)``
    with ``time_major``. ``sequence_length``: optional ``(batch,)`` lengths
    in ``[0, time]``: outputs past them are zero, states stop there.
    ``initial_state``: TF1's state structure (``cell.zero_state`` shape),
    zeros if omitted. ``dtype`` is the compute dtype (default: the cell's).
    ``state`` is the final state in TF1's structure (``LSTMStateTuple(c, h)``
    per LSTM cell, a tuple for ``MultiRNNCell``).
    """
    fn = "dynamic_rnn"
    cell = _check_cell(f"{fn}: cell", cell)
    dtype = _run_dtype(fn, dtype, [cell])
    xt = _time_major_input(fn, inputs, dtype, bool(time_major))
    steps, batch = xt.shape[0], xt.shape[1]
    cell.ensure_built(f"{fn}: inputs", xt.shape[2])
    lengths = _lengths(fn, sequence_length, batch, steps)
    states = _initial_states(fn, "initial_state", cell, initial_state, batch, dtype)
    y = _run([(cell, "none")], xt, lengths, [states], dtype, unroll=False, time_major=bool(time_major))
    return y, cell.pack_state(states)


def static_rnn(cell, inputs, initial_state=None, dtype=None, sequence_length=None, scope=None):
    """TF1 ``tf.nn.static_rnn``: ``inputs`` is a list of ``(batch, features)`` arrays, one per step.

    Returns ``(outputs, state)``: a list of ``(batch, output_size)`` arrays and
    the final state in TF1's structure. ``sequence_length`` works as in
    :func:`dynamic_rnn`. Runs the statically unrolled kernel (up to
    ``numrnn.UNROLL_CEILING`` steps; longer lists use the loop).
    """
    fn = "static_rnn"
    cell = _check_cell(f"{fn}: cell", cell)
    dtype = _run_dtype(fn, dtype, [cell])
    if not isinstance(inputs, (list, tuple)) or not inputs:
        raise TypeError(f"{fn}: inputs must be a non-empty list of (batch, features) arrays, one per time step; "
                        f"got {type(inputs).__name__}" + (" (empty)" if isinstance(inputs, (list, tuple)) else ""))
    steps = [as_real_array(f"{fn}: inputs[{t}]", a, dtype) for t, a in enumerate(inputs)]
    for t, a in enumerate(steps):
        check_ndim(f"{fn}: inputs[{t}]", a, 2, "(batch, features)")
        if a.shape != steps[0].shape:
            raise ValueError(f"{fn}: inputs[{t}]: expected shape {steps[0].shape} (that of inputs[0]); got {a.shape}")
    xt = np.ascontiguousarray(np.stack(steps))
    check_sequence_input(f"{fn}: inputs", xt, "(time, batch, features)", None)
    batch = xt.shape[1]
    cell.ensure_built(f"{fn}: inputs", xt.shape[2])
    lengths = _lengths(fn, sequence_length, batch, len(steps))
    states = _initial_states(fn, "initial_state", cell, initial_state, batch, dtype)
    y = _run([(cell, "none")], xt, lengths, [states], dtype, unroll=True)
    return list(y), cell.pack_state(states)


def bidirectional_dynamic_rnn(cell_fw, cell_bw, inputs, sequence_length=None, initial_state_fw=None,
                              initial_state_bw=None, dtype=None, parallel_iterations=None, swap_memory=False,
                              time_major=False, scope=None):
    """TF1 ``tf.nn.bidirectional_dynamic_rnn``: returns ``((outputs_fw, outputs_bw), (state_fw, state_bw))``.

    The backward cell reads each sequence's valid prefix (all of it without
    ``sequence_length``) from its end; ``outputs_bw`` is aligned with the input
    time axis, zero past each length. Layouts as in :func:`dynamic_rnn`.
    """
    fn = "bidirectional_dynamic_rnn"
    cell_fw = _check_cell(f"{fn}: cell_fw", cell_fw)
    cell_bw = _check_cell(f"{fn}: cell_bw", cell_bw)
    dtype = _run_dtype(fn, dtype, [cell_fw])
    xt = _time_major_input(fn, inputs, dtype, bool(time_major))
    steps, batch = xt.shape[0], xt.shape[1]
    cell_fw.ensure_built(f"{fn}: inputs", xt.shape[2])
    cell_bw.ensure_built(f"{fn}: inputs", xt.shape[2])
    lengths = _lengths(fn, sequence_length, batch, steps)
    states_fw = _initial_states(fn, "initial_state_fw", cell_fw, initial_state_fw, batch, dtype)
    states_bw = _initial_states(fn, "initial_state_bw", cell_bw, initial_state_bw, batch, dtype)
    y = _run([(cell_fw, "none"), (cell_bw, "full" if lengths is None else "valid")], xt, lengths,
             [states_fw, states_bw], dtype, unroll=False, time_major=bool(time_major))
    width = cell_fw.output_size
    outputs = (np.ascontiguousarray(y[..., :width]), np.ascontiguousarray(y[..., width:]))
    return outputs, (cell_fw.pack_state(states_fw), cell_bw.pack_state(states_bw))
