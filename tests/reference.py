"""Plain-NumPy oracle: every semantic numrnn offers, written step by step to be obviously right.

Nothing here is fast and nothing is clever. Weights come in the logical layout
of :meth:`codegen.spec.CellSpec.weight_shapes` (Keras layout and gate order),
sequences are time-major ``(T, B, input_size)``, everything is computed in
float64 and cast to the spec's dtype at the end. The golden fixtures pin this
module (``tests/test_reference.py``); every generated kernel is checked against it.
"""

from __future__ import annotations

import numpy as np

from codegen.spec import CellSpec, DirectionSpec, StackSpec


def activation(name: str, x):
    """Apply the activation ``name`` elementwise (Keras 3 definitions)."""
    x = np.asarray(x, dtype=np.float64)
    if name == "tanh":
        return np.tanh(x)
    if name == "sigmoid":
        with np.errstate(over="ignore"):
            return 1.0 / (1.0 + np.exp(-x))
    if name == "hard_sigmoid":  # Keras 3; Keras 2 used 0.2 * x + 0.5
        return np.clip(x / 6.0 + 0.5, 0.0, 1.0)
    if name == "relu":
        return np.maximum(x, 0.0)
    if name == "linear":
        return x
    raise ValueError(f"activation: unknown name {name!r}")


def cell_step(cell: CellSpec, w: dict, x_t, state: tuple) -> tuple:
    """One step of one cell: returns ``(output, new_state)``.

    ``w`` holds the logical weights, ``x_t`` is ``(B, in)`` and ``state`` is
    ``(h,)`` or, for LSTM, ``(h, c)``. A missing ``bias`` key means no bias.
    """
    w = {k: np.asarray(v, dtype=np.float64) for k, v in w.items()}
    x_t = np.asarray(x_t, dtype=np.float64)
    h = np.asarray(state[0], dtype=np.float64)
    bias = w.get("bias", 0.0)

    def act(v):
        return activation(cell.activation, v)

    def ract(v):
        return activation(cell.recurrent_activation, v)

    if cell.kind == "simple":
        h = act(x_t @ w["kernel"] + h @ w["recurrent_kernel"] + bias)
        return h, (h,)

    if cell.kind == "lstm":
        c = np.asarray(state[1], dtype=np.float64)
        z_i, z_f, z_c, z_o = np.split(x_t @ w["kernel"] + h @ w["recurrent_kernel"] + bias, 4, axis=-1)
        p_i, p_f, p_o = w["peephole"] if cell.peephole else (0.0, 0.0, 0.0)
        i = ract(z_i + p_i * c)
        f = ract(z_f + cell.forget_bias + p_f * c)
        c = f * c + i * act(z_c)
        if cell.cell_clip is not None:
            c = np.clip(c, -cell.cell_clip, cell.cell_clip)
        o = ract(z_o + p_o * c)  # the peephole sees the new c
        h = o * act(c)
        if cell.proj_units is not None:
            h = h @ w["projection"]
        return h, (h, c)

    # GRU, gate blocks z, r, h
    x_z, x_r, x_h = np.split(x_t @ w["kernel"] + bias, 3, axis=-1)
    if cell.reset_after:
        h_z, h_r, h_h = np.split(h @ w["recurrent_kernel"] + w.get("recurrent_bias", 0.0), 3, axis=-1)
        z = ract(x_z + h_z)
        r = ract(x_r + h_r)
        candidate = act(x_h + r * h_h)
    else:
        r_zr, r_h = np.split(w["recurrent_kernel"], [2 * cell.units], axis=-1)
        h_z, h_r = np.split(h @ r_zr, 2, axis=-1)
        z = ract(x_z + h_z)
        r = ract(x_r + h_r)
        candidate = act(x_h + (r * h) @ r_h)
    h = z * h + (1.0 - z) * candidate
    return h, (h,)


def _valid_steps(spec: StackSpec, T: int, B: int, mask, lengths) -> np.ndarray:
    """Bool ``(T, B)`` over input time: is step ``t`` of row ``b`` a real (unmasked) step?"""
    if spec.masking == "none":
        return np.ones((T, B), dtype=bool)
    if spec.masking in ("carry", "zero"):
        if mask is None:
            raise ValueError(f"run_stack: mask is required for masking={spec.masking!r}")
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != (T, B):
            raise ValueError(f"run_stack: mask must have shape (T, B) = {(T, B)}; got {mask.shape}")
        return mask
    if lengths is None:
        raise ValueError("run_stack: lengths is required for masking='lengths'")
    lengths = np.asarray(lengths)
    if lengths.shape != (B,):
        raise ValueError(f"run_stack: lengths must have shape (B,) = {(B,)}; got {lengths.shape}")
    return np.arange(T)[:, None] < lengths[None, :]


def _input_times(reverse: str, s: int, T: int, B: int, lengths) -> np.ndarray:
    """Input time read by each row at processing step ``s``.

    For ``"valid"`` a row past its length reads (and writes) time ``s``, which
    is then a padding step, so each row still visits every time exactly once.
    """
    if reverse == "none":
        return np.full(B, s)
    if reverse == "full":
        return np.full(B, T - 1 - s)
    lengths = np.asarray(lengths)
    return np.where(s < lengths, lengths - 1 - s, s)


def _run_direction(direction: DirectionSpec, masking: str, weights, x, valid, lengths, states):
    """Run one direction (its whole cell stack per step); returns (outputs, last_output, final_states).

    ``outputs`` is aligned with the input time axis.
    """
    T, B, _ = x.shape
    rows = np.arange(B)
    outputs = np.zeros((T, B, direction.output_size))
    previous = np.zeros((B, direction.output_size))  # carry masking repeats this; zeros at first
    for s in range(T):
        t = _input_times(direction.reverse, s, T, B, lengths)
        ok = valid[t, rows][:, None]
        y = x[t, rows]
        new_states = []
        for cell, w, state in zip(direction.cells, weights, states):
            y, new = cell_step(cell, w, y, state)
            new_states.append(tuple(np.where(ok, n, old) for n, old in zip(new, state)))
        states = new_states
        if masking == "carry":
            y = np.where(ok, y, previous)
        elif masking in ("zero", "lengths"):
            y = np.where(ok, y, 0.0)
        outputs[t, rows] = y
        previous = y
    return outputs, previous, states


def _merge(merge, parts):
    if len(parts) == 1:
        return parts[0]
    a, b = parts
    if merge in ("concat", None):
        return np.concatenate([a, b], axis=-1)
    if merge == "sum":
        return a + b
    if merge == "mul":
        return a * b
    if merge == "ave":
        return (a + b) / 2.0
    raise ValueError(f"run_stack: unknown merge {merge!r}")


def run_stack(spec: StackSpec, weights: list, x, *, mask=None, lengths=None, initial_states=None):
    """Run the whole stack; returns ``(output, final_states)``.

    ``x`` is time-major ``(T, B, input_size)``; ``weights`` holds one logical
    dict per cell in ``spec.cells`` order; ``mask`` is bool ``(T, B)`` (masking
    ``"carry"``/``"zero"``); ``lengths`` is int ``(B,)`` (masking
    ``"lengths"``, reverse ``"valid"``); ``initial_states`` is None (zeros) or
    one tuple ``(h,)``/``(h, c)`` per cell. ``output`` is ``(T, B,
    spec.output_size)`` with ``return_sequences``, else the merged last output
    ``(B, spec.output_size)``: each direction's output at its final processing
    step. ``final_states`` is one tuple per cell, after its last processing step.
    """
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 3 or x.shape[2] != spec.input_size:
        raise ValueError(f"run_stack: x must have shape (T, B, {spec.input_size}); got {x.shape}")
    T, B, _ = x.shape
    cells = spec.cells
    if len(weights) != len(cells):
        raise ValueError(
            f"run_stack: weights must hold {len(cells)} dicts (one per cell); got {len(weights)}"
        )
    if initial_states is None:
        initial_states = [tuple(np.zeros((B, n)) for n in cell.state_sizes) for cell in cells]
    if len(initial_states) != len(cells):
        raise ValueError(
            f"run_stack: initial_states needs one tuple per cell ({len(cells)}); got {len(initial_states)}"
        )
    valid = _valid_steps(spec, T, B, mask, lengths)

    sequence, last, finals, k = x, None, [], 0
    for block in spec.blocks:
        outputs, lasts = [], []
        for direction in block.directions:
            n = len(direction.cells)
            out, last_out, states = _run_direction(
                direction,
                spec.masking,
                weights[k : k + n],
                sequence,
                valid,
                lengths,
                initial_states[k : k + n],
            )
            outputs.append(out)
            lasts.append(last_out)
            finals.extend(states)
            k += n
        sequence, last = _merge(block.merge, outputs), _merge(block.merge, lasts)

    dtype = np.dtype(spec.dtype)
    output = sequence if spec.return_sequences else last
    return output.astype(dtype), [tuple(np.asarray(s).astype(dtype) for s in state) for state in finals]
