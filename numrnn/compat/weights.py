"""Convert Keras, TF1 and PyTorch weight arrays to numrnn's logical layout and back.

The logical layout is Keras's (see :meth:`codegen.spec.CellSpec.weight_shapes`):
``kernel`` (in, G*units), ``recurrent_kernel`` (output_size, G*units), ``bias``
(G*units,), ``recurrent_bias`` (G*units,) for GRU ``reset_after``, ``peephole``
(3, units) rows i, f, o and ``projection`` (units, proj_units); gate blocks in
the order LSTM i, f, c, o and GRU z, r, h.

Pure NumPy: the converters never compile anything. They copy (the results never
alias the arguments) and keep the arguments' dtype.
"""

from __future__ import annotations

import numpy as np

from codegen.spec import CellSpec

#: Gate-block permutations (each is its own inverse).
_TF1_LSTM_ORDER = (0, 2, 1, 3)  # TF1 i, j, f, o <-> logical i, f, c, o
_TORCH_GRU_ORDER = (1, 0, 2)  # PyTorch r, z, n <-> logical z, r, h


def _shaped(fn: str, name: str, array, shape) -> np.ndarray:
    """``array`` as a fresh contiguous ndarray, or a ValueError naming ``name``."""
    a = np.asarray(array)
    if a.shape != tuple(shape):
        raise ValueError(f"{fn}: {name} has shape {a.shape}; expected {tuple(shape)}")
    return np.array(a, order="C", copy=True)


def _blocks(a: np.ndarray, order, axis: int = -1) -> np.ndarray:
    """Reorder the equal gate blocks of ``a`` along ``axis``."""
    parts = np.split(a, len(order), axis=axis)
    return np.ascontiguousarray(np.concatenate([parts[i] for i in order], axis=axis))


def _logical(fn: str, cell: CellSpec, logical: dict) -> tuple[dict, int]:
    """Validate a logical dict (exact keys and shapes); returns (copy, input_size)."""
    if not isinstance(logical, dict) or "kernel" not in logical:
        raise ValueError(f"{fn}: logical must be a dict holding at least 'kernel'")
    kernel = np.asarray(logical["kernel"])
    if kernel.ndim != 2:
        raise ValueError(f"{fn}: logical['kernel'] must be 2-D; got shape {kernel.shape}")
    shapes = cell.weight_shapes(kernel.shape[0])
    if set(logical) != set(shapes):
        raise ValueError(f"{fn}: logical has keys {sorted(logical)}; expected {sorted(shapes)} for {cell}")
    return {k: _shaped(fn, f"logical[{k!r}]", logical[k], shapes[k]) for k in shapes}, kernel.shape[0]


def _check_count(fn: str, arrays, names) -> list:
    if len(arrays) != len(names):
        raise ValueError(
            f"{fn}: arrays must hold {len(names)} arrays ({', '.join(names)}); got {len(arrays)}"
        )
    return list(arrays)


# -- Keras ---------------------------------------------------------------------------------------


def keras_cell_weights(cell: CellSpec, arrays: list) -> dict:
    """Logical weights from one Keras cell's ``get_weights()``.

    ``arrays`` is ``[kernel, recurrent_kernel]`` plus ``bias`` when
    ``cell.use_bias``; a GRU ``reset_after`` bias is ``(2, 3*units)`` = input
    bias, recurrent bias. The input size is read from the kernel.
    """
    fn = "keras_cell_weights"
    if cell.peephole or cell.proj_units is not None:
        raise ValueError(f"{fn}: cell has peepholes or a projection, which Keras cells do not have")
    names = ["kernel", "recurrent_kernel"] + (["bias"] if cell.use_bias else [])
    arrays = _check_count(fn, arrays, names)
    kernel = np.asarray(arrays[0])
    if kernel.ndim != 2:
        raise ValueError(f"{fn}: arrays[0] (kernel) must be 2-D; got shape {kernel.shape}")
    shapes = cell.weight_shapes(kernel.shape[0])
    out = {
        "kernel": _shaped(fn, "arrays[0] (kernel)", arrays[0], shapes["kernel"]),
        "recurrent_kernel": _shaped(
            fn, "arrays[1] (recurrent_kernel)", arrays[1], shapes["recurrent_kernel"]
        ),
    }
    if cell.has_recurrent_bias:
        bias = _shaped(fn, "arrays[2] (bias)", arrays[2], (2,) + shapes["bias"])
        out["bias"], out["recurrent_bias"] = bias[0].copy(), bias[1].copy()
    elif cell.use_bias:
        out["bias"] = _shaped(fn, "arrays[2] (bias)", arrays[2], shapes["bias"])
    return out


def keras_cell_arrays(cell: CellSpec, logical: dict) -> list:
    """Inverse of :func:`keras_cell_weights`: the Keras ``get_weights()`` list of one cell."""
    fn = "keras_cell_arrays"
    if cell.peephole or cell.proj_units is not None:
        raise ValueError(f"{fn}: cell has peepholes or a projection, which Keras cells do not have")
    w, _ = _logical(fn, cell, logical)
    arrays = [w["kernel"], w["recurrent_kernel"]]
    if cell.has_recurrent_bias:
        arrays.append(np.stack([w["bias"], w["recurrent_bias"]]))
    elif cell.use_bias:
        arrays.append(w["bias"])
    return arrays


# -- TF1 -----------------------------------------------------------------------------------------


def tf1_weight_names(cell: CellSpec) -> list[str]:
    """Variable name suffixes of a TF1 cell, in creation (``tf.trainable_variables()``) order.

    ``BasicRNNCell``/``BasicLSTMCell``/``LSTMCell``: ``kernel``, ``bias``, then
    for ``LSTMCell`` with peepholes ``w_f_diag``, ``w_i_diag``, ``w_o_diag``
    (f first!) and with ``num_proj`` ``projection/kernel``; ``GRUCell``:
    ``gates/kernel``, ``gates/bias``, ``candidate/kernel``, ``candidate/bias``.
    """
    if cell.kind == "gru":
        return ["gates/kernel", "gates/bias", "candidate/kernel", "candidate/bias"]
    names = ["kernel", "bias"]
    if cell.peephole:
        names += ["w_f_diag", "w_i_diag", "w_o_diag"]
    if cell.proj_units is not None:
        names.append("projection/kernel")
    return names


def _tf1_check_cell(fn: str, cell: CellSpec) -> None:
    if not cell.use_bias:
        raise ValueError(f"{fn}: cell.use_bias must be True (TF1 cells always have a bias)")
    if cell.kind == "gru" and cell.reset_after:
        raise ValueError(f"{fn}: cell.reset_after must be False (TF1 GRUCell resets before the matmul)")


def tf1_cell_weights(cell: CellSpec, input_size: int, arrays: list) -> dict:
    """Logical weights from one TF1 cell's variables (in :func:`tf1_weight_names` order).

    TF1 kernels act on ``[x, h]``: the first ``input_size`` rows become
    ``kernel``, the rest ``recurrent_kernel``. ``BasicLSTMCell``/``LSTMCell``
    gates ``i, j, f, o`` become ``i, f, c, o`` (``forget_bias`` is the spec's
    run-time field, not a weight); ``GRUCell`` gates ``r, u`` plus the
    candidate become a ``reset_after=False`` GRU ``z(=u), r, h``.
    """
    fn = "tf1_cell_weights"
    _tf1_check_cell(fn, cell)
    names = tf1_weight_names(cell)
    arrays = dict(zip(names, _check_count(fn, arrays, names)))
    H, rows = cell.units, input_size + cell.output_size

    def get(name, shape):
        return _shaped(fn, f"arrays[{names.index(name)}] ({name})", arrays[name], shape)

    if cell.kind == "gru":
        gates, gates_bias = get("gates/kernel", (rows, 2 * H)), get("gates/bias", (2 * H,))
        cand, cand_bias = get("candidate/kernel", (rows, H)), get("candidate/bias", (H,))
        full = np.concatenate([_blocks(gates, (1, 0)), cand], axis=1)  # r, u -> z, r; then h
        return {
            "kernel": np.ascontiguousarray(full[:input_size]),
            "recurrent_kernel": np.ascontiguousarray(full[input_size:]),
            "bias": np.concatenate([_blocks(gates_bias, (1, 0)), cand_bias]),
        }

    kernel = get("kernel", (rows, cell.gates * H))
    bias = get("bias", (cell.gates * H,))
    if cell.kind == "lstm":
        kernel, bias = _blocks(kernel, _TF1_LSTM_ORDER), _blocks(bias, _TF1_LSTM_ORDER)
    out = {
        "kernel": np.ascontiguousarray(kernel[:input_size]),
        "recurrent_kernel": np.ascontiguousarray(kernel[input_size:]),
        "bias": bias,
    }
    if cell.peephole:
        out["peephole"] = np.stack([get("w_i_diag", (H,)), get("w_f_diag", (H,)), get("w_o_diag", (H,))])
    if cell.proj_units is not None:
        out["projection"] = get("projection/kernel", (H, cell.proj_units))
    return out


def tf1_cell_arrays(cell: CellSpec, logical: dict) -> list:
    """Inverse of :func:`tf1_cell_weights`: the TF1 variables in :func:`tf1_weight_names` order."""
    fn = "tf1_cell_arrays"
    _tf1_check_cell(fn, cell)
    w, _ = _logical(fn, cell, logical)
    H = cell.units
    full = np.concatenate([w["kernel"], w["recurrent_kernel"]], axis=0)
    if cell.kind == "gru":
        return [
            _blocks(full[:, : 2 * H], (1, 0)),
            _blocks(w["bias"][: 2 * H], (1, 0)),
            np.ascontiguousarray(full[:, 2 * H :]),
            w["bias"][2 * H :].copy(),
        ]
    if cell.kind == "simple":
        return [full, w["bias"]]
    arrays = [_blocks(full, _TF1_LSTM_ORDER), _blocks(w["bias"], _TF1_LSTM_ORDER)]
    if cell.peephole:
        p_i, p_f, p_o = w["peephole"]
        arrays += [p_f.copy(), p_i.copy(), p_o.copy()]
    if cell.proj_units is not None:
        arrays.append(w["projection"])
    return arrays


# -- PyTorch -------------------------------------------------------------------------------------


def _torch_check_cell(fn: str, cell: CellSpec) -> tuple:
    if cell.peephole or cell.cell_clip is not None or cell.forget_bias != 0.0:
        raise ValueError(f"{fn}: cell uses peepholes, cell_clip or forget_bias, which PyTorch layers lack")
    if cell.kind == "gru" and not cell.reset_after:
        raise ValueError(f"{fn}: cell.reset_after must be True (PyTorch GRU resets after the matmul)")
    return _TORCH_GRU_ORDER if cell.kind == "gru" else tuple(range(cell.gates))


def torch_layer_weights(
    cell: CellSpec, weight_ih, weight_hh, bias_ih=None, bias_hh=None, weight_hr=None
) -> dict:
    """Logical weights from one PyTorch layer direction (``weight_ih_l0``, ``weight_hh_l0``, ...).

    PyTorch stores ``(G*H, in)`` row blocks: LSTM ``i, f, g, o`` (= logical
    ``i, f, c, o``), GRU ``r, z, n`` (reordered to ``z, r, h``), RNN one gate.
    LSTM/RNN biases sum into ``bias``; GRU keeps ``bias`` = ``bias_ih`` and
    ``recurrent_bias`` = ``bias_hh``. ``weight_hr`` ``(proj, H)`` (LSTM
    ``proj_size``) becomes ``projection`` ``(H, proj)``.
    """
    fn = "torch_layer_weights"
    order = _torch_check_cell(fn, cell)
    weight_ih = np.asarray(weight_ih)
    if weight_ih.ndim != 2:
        raise ValueError(f"{fn}: weight_ih must be 2-D; got shape {weight_ih.shape}")
    gh, proj = cell.gates * cell.units, cell.proj_units
    out = {
        "kernel": _blocks(_shaped(fn, "weight_ih", weight_ih, (gh, weight_ih.shape[1])).T, order),
        "recurrent_kernel": _blocks(_shaped(fn, "weight_hh", weight_hh, (gh, cell.output_size)).T, order),
    }
    if cell.use_bias:
        if bias_ih is None or bias_hh is None:
            raise ValueError(f"{fn}: bias_ih and bias_hh are required when cell.use_bias is True")
        b_ih, b_hh = _shaped(fn, "bias_ih", bias_ih, (gh,)), _shaped(fn, "bias_hh", bias_hh, (gh,))
        if cell.kind == "gru":
            out["bias"], out["recurrent_bias"] = _blocks(b_ih, order), _blocks(b_hh, order)
        else:
            out["bias"] = b_ih + b_hh
    elif bias_ih is not None or bias_hh is not None:
        raise ValueError(f"{fn}: bias_ih and bias_hh must be None when cell.use_bias is False")
    if proj is not None:
        if weight_hr is None:
            raise ValueError(f"{fn}: weight_hr is required when cell.proj_units is set")
        out["projection"] = np.ascontiguousarray(_shaped(fn, "weight_hr", weight_hr, (proj, cell.units)).T)
    elif weight_hr is not None:
        raise ValueError(f"{fn}: weight_hr must be None when cell.proj_units is None")
    return out


def torch_layer_arrays(cell: CellSpec, logical: dict) -> dict:
    """Inverse of :func:`torch_layer_weights`: a dict of PyTorch arrays for one layer direction.

    Keys: ``weight_ih``, ``weight_hh``, with a bias ``bias_ih`` and ``bias_hh``,
    with a projection ``weight_hr``. The result round-trips as
    ``torch_layer_weights(cell, **torch_layer_arrays(cell, w))``. A summed
    LSTM/RNN bias comes back whole in ``bias_ih`` with ``bias_hh`` zero.
    """
    fn = "torch_layer_arrays"
    order = _torch_check_cell(fn, cell)
    w, _ = _logical(fn, cell, logical)
    out = {
        "weight_ih": np.ascontiguousarray(_blocks(w["kernel"], order).T),
        "weight_hh": np.ascontiguousarray(_blocks(w["recurrent_kernel"], order).T),
    }
    if cell.use_bias:
        out["bias_ih"] = _blocks(w["bias"], order)
        out["bias_hh"] = (
            _blocks(w["recurrent_bias"], order) if cell.kind == "gru" else np.zeros_like(w["bias"])
        )
    if cell.proj_units is not None:
        out["weight_hr"] = np.ascontiguousarray(w["projection"].T)
    return out
