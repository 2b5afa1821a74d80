"""Load a golden fixture (``tests/golden/*.npz``) as a StackSpec-level test case.

:func:`load_case` translates a fixture's framework-level description (Keras
layer, TF1 function, PyTorch module) into a :class:`~codegen.spec.StackSpec`,
logical weights and time-major calls, and :meth:`GoldenCase.flatten` turns a
stack's ``(output, final_states)`` back into the fixture's ``out_*`` list.
The translation rules (layouts, reversal, masking, state orders) are exactly
what the facades must do.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from codegen.spec import BlockSpec, CellSpec, DirectionSpec, StackSpec
from numrnn.compat.weights import keras_cell_weights, tf1_cell_weights, tf1_weight_names, torch_layer_weights

GOLDEN_DIR = Path(__file__).parent / "golden"


def fixture_names() -> list[str]:
    """Stem of every fixture file, sorted."""
    return sorted(p.stem for p in GOLDEN_DIR.glob("*.npz"))


@dataclass
class GoldenCall:
    """One call: time-major input, optional mask (T, B), lengths (B,), initial states; expected outputs."""

    x: np.ndarray
    expected: list
    mask: np.ndarray | None = None
    lengths: np.ndarray | None = None
    initial_states: list | None = None


@dataclass
class GoldenCase:
    """A fixture as a stack: spec, logical weights, calls, and the output flattener."""

    name: str
    family: str  # "keras", "tf1", "torch"
    raw: dict
    spec: StackSpec
    weights: list
    calls: list
    flatten: Callable = field(repr=False)  # (output, final_states) -> list of arrays like out_*
    stateful: bool = False  # later calls start from the previous call's final states
    params: int | None = None


def _swap_bt(a, swap: bool):
    """Swap the batch and time axes (batch-major <-> time-major) when ``swap``."""
    return np.swapaxes(a, 0, 1) if swap else a


def _count(raw: dict, prefix: str) -> int:
    """How many ``<prefix><j>`` keys there are (``j`` = 0, 1, ...)."""
    return sum(1 for k in raw if re.fullmatch(re.escape(prefix) + r"\d+", k))


def _stack(cells_per_direction, input_size, *, masking, return_sequences, merge="concat", unroll=None):
    block = BlockSpec(directions=tuple(cells_per_direction), merge=merge)
    return StackSpec(
        blocks=(block,),
        input_size=input_size,
        masking=masking,
        return_sequences=return_sequences,
        unroll=unroll,
    )


def _take(kwargs: dict, known: dict, owner: str) -> dict:
    """Map fixture kwargs to CellSpec kwargs via ``known``; unknown kwargs are an error (no silent drops)."""
    unknown = set(kwargs) - set(known)
    if unknown:
        raise NotImplementedError(f"{owner}: unsupported kwargs {sorted(unknown)}")
    return {known[k]: v for k, v in kwargs.items() if known[k]}


# -- Keras ---------------------------------------------------------------------------------------

_KERAS_KINDS = {"SimpleRNN": "simple", "LSTM": "lstm", "GRU": "gru"}
_KERAS_CELL_KW = {
    "kind": None,
    "units": "units",
    "activation": "activation",
    "recurrent_activation": "recurrent_activation",
    "use_bias": "use_bias",
    "reset_after": "reset_after",
}
_KERAS_ARGS = {
    "return_sequences",
    "return_state",
    "go_backwards",
    "stateful",
    "unroll",
    "time_major",
    "zero_output_for_mask",
}


def _keras_case(name, raw, meta) -> GoldenCase:
    args = meta["args"]
    if set(args) - _KERAS_ARGS:
        raise NotImplementedError(f"{name}: unsupported RNN args {sorted(set(args) - _KERAS_ARGS)}")
    cells = tuple(
        CellSpec(kind=_KERAS_KINDS[c["kind"]], **_take(c, _KERAS_CELL_KW, name)) for c in meta["cells"]
    )
    bidirectional = meta.get("layer", "RNN") == "Bidirectional"
    return_sequences = args.get("return_sequences", False)
    time_major, go_backwards = args.get("time_major", False), args.get("go_backwards", False)
    if bidirectional:
        if go_backwards:
            raise NotImplementedError(f"{name}: Bidirectional over a go_backwards layer")
        directions = [DirectionSpec(cells), DirectionSpec(cells, reverse="full")]
        zero_output = return_sequences  # Bidirectional forces zero_output_for_mask = return_sequences
    else:
        directions = [DirectionSpec(cells, reverse="full" if go_backwards else "none")]
        zero_output = args.get("zero_output_for_mask", False)

    calls, k = [], 0
    while f"call{k}_x" in raw:
        p = f"call{k}_"
        x = _swap_bt(raw[p + "x"], not time_major)
        mask = raw[p + "mask"].T if p + "mask" in raw else None
        n_init = sum(len(c.state_names) for c in cells) * len(directions)
        init = None
        if p + "init_0" in raw:
            flat = iter(raw[f"{p}init_{j}"] for j in range(n_init))
            init = [tuple(next(flat) for _ in c.state_names) for _ in directions for c in cells]
        outs = [raw[f"{p}out_{j}"] for j in range(_count(raw, p + "out_"))]
        calls.append(GoldenCall(x=x, expected=outs, mask=mask, initial_states=init))
        k += 1
    masked = any(c.mask is not None for c in calls)
    T = calls[0].x.shape[0]
    spec = _stack(
        directions,
        calls[0].x.shape[2],
        masking=("zero" if zero_output else "carry") if masked else "none",
        return_sequences=return_sequences,
        merge=meta.get("merge_mode", "concat"),
        unroll=T if args.get("unroll") else None,
    )

    flat_arrays = [raw[f"weights_{i}"] for i in range(_count(raw, "weights_"))]
    weights, i = [], 0
    for cell in spec.cells:
        n = 3 if cell.use_bias else 2
        weights.append(keras_cell_weights(cell, flat_arrays[i : i + n]))
        i += n
    assert i == len(flat_arrays), f"{name}: {len(flat_arrays) - i} weight arrays left over"

    def flatten(output, final_states):
        if return_sequences:
            if go_backwards:  # Keras returns the sequence in processing order
                output = output[::-1]
            output = _swap_bt(output, not time_major)
        result = [output]
        if args.get("return_state"):
            result += [s for state in final_states for s in state]
        return result

    return GoldenCase(
        name,
        "keras",
        raw,
        spec,
        weights,
        calls,
        flatten,
        stateful=args.get("stateful", False),
        params=int(raw["params"]) if "params" in raw else None,
    )


# -- TF1 -----------------------------------------------------------------------------------------

_TF1_DEFAULT_FORGET_BIAS = 1.0  # BasicLSTMCell and LSTMCell both default to forget_bias=1.0
_TF1_CELL_KW = {
    "kind": None,
    "num_units": "units",
    "forget_bias": "forget_bias",
    "use_peepholes": "peephole",
    "cell_clip": "cell_clip",
    "num_proj": "proj_units",
}


def _tf1_cell(c: dict, owner: str) -> CellSpec:
    kw = _take(c, _TF1_CELL_KW, owner)
    if c["kind"] == "BasicRNNCell":
        return CellSpec("simple", **kw)
    if c["kind"] == "GRUCell":
        return CellSpec("gru", reset_after=False, **kw)
    if c["kind"] == "BasicLSTMCell" or c["kind"] == "LSTMCell":
        kw.setdefault("forget_bias", _TF1_DEFAULT_FORGET_BIAS)
        return CellSpec("lstm", **kw)
    raise NotImplementedError(f"{owner}: TF1 cell kind {c['kind']!r}")


def _tf1_order(state: tuple) -> tuple:
    """Our LSTM state (h, c) in TF1's LSTMStateTuple order (c, h); other states unchanged."""
    return state[::-1]


def _tf1_case(name, raw, meta) -> GoldenCase:
    cells = tuple(_tf1_cell(c, name) for c in meta["cells"])
    fn, time_major = meta["fn"], meta.get("time_major", False)
    if fn not in ("dynamic_rnn", "static_rnn", "bidirectional_dynamic_rnn"):
        raise NotImplementedError(f"{name}: TF1 function {fn!r}")
    x = _swap_bt(raw["x"], not time_major)
    lengths = raw.get("lengths")
    directions = [DirectionSpec(cells)]
    if fn == "bidirectional_dynamic_rnn":  # reverse_sequence over the valid prefix (or the whole axis)
        directions.append(DirectionSpec(cells, reverse="valid" if lengths is not None else "full"))
    spec = _stack(
        directions,
        x.shape[2],
        masking="lengths" if lengths is not None else "none",
        return_sequences=True,
        merge=None,
    )

    arrays = [raw[f"weights_{i}"] for i in range(_count(raw, "weights_"))]
    names = [str(raw[f"weight_name_{i}"]) for i in range(len(arrays))]
    weights, i = [], 0
    for cell, cell_in in zip(spec.cells, spec.input_sizes()):
        wanted = tf1_weight_names(cell)
        got = [n.rsplit(":", 1)[0] for n in names[i : i + len(wanted)]]
        assert all(g.endswith("/" + e) for g, e in zip(got, wanted)), (
            f"{name}: weight names {got} != {wanted}"
        )
        weights.append(tf1_cell_weights(cell, cell_in, arrays[i : i + len(wanted)]))
        i += len(wanted)
    assert i == len(arrays), f"{name}: {len(arrays) - i} weight arrays left over"

    init = None
    if "init_0" in raw:
        flat = iter(raw[f"init_{j}"] for j in range(sum(len(c.state_names) for c in spec.cells)))
        init = [_tf1_order(tuple(next(flat) for _ in c.state_names)) for c in spec.cells]
    expected = [raw[f"out_{j}"] for j in range(_count(raw, "out_"))]
    call = GoldenCall(x=x, expected=expected, lengths=lengths, initial_states=init)

    def flatten(output, final_states):
        widths = np.cumsum([d.output_size for d in directions])[:-1]
        outputs = [_swap_bt(o, not time_major) for o in np.split(output, widths, axis=-1)]
        return outputs + [s for state in final_states for s in _tf1_order(state)]

    return GoldenCase(name, "tf1", raw, spec, weights, [call], flatten)


# -- PyTorch -------------------------------------------------------------------------------------

_TORCH_KW = {
    "module",
    "api",
    "input_size",
    "hidden_size",
    "num_layers",
    "bias",
    "batch_first",
    "bidirectional",
    "proj_size",
    "nonlinearity",
    "dropout",
}


def _torch_case(name, raw, meta) -> GoldenCase:
    if set(meta) - _TORCH_KW:
        raise NotImplementedError(f"{name}: unsupported constructor kwargs {sorted(set(meta) - _TORCH_KW)}")
    if meta.get("dropout", 0.0):
        raise NotImplementedError(f"{name}: dropout")
    module, H = meta["module"], meta["hidden_size"]
    use_bias, batch_first = meta.get("bias", True), meta.get("batch_first", False)
    n_layers, n_dirs = meta.get("num_layers", 1), 2 if meta.get("bidirectional", False) else 1
    if module == "RNN":
        cell = CellSpec("simple", H, activation=meta.get("nonlinearity", "tanh"), use_bias=use_bias)
    elif module == "LSTM":
        cell = CellSpec("lstm", H, use_bias=use_bias, proj_units=meta.get("proj_size", 0) or None)
    else:
        cell = CellSpec("gru", H, use_bias=use_bias, reset_after=True)

    x = _swap_bt(raw["x"], batch_first)
    lengths = raw.get("lengths")
    back = "valid" if lengths is not None else "full"  # packed: reverse starts at each last valid step
    directions = tuple(DirectionSpec((cell,), reverse=r) for r in ("none", back)[:n_dirs])
    spec = StackSpec(
        blocks=tuple(BlockSpec(directions) for _ in range(n_layers)),
        input_size=meta["input_size"],
        masking="lengths" if lengths is not None else "none",
    )

    weights = []
    for layer in range(n_layers):
        for d in range(n_dirs):
            suffix = f"l{layer}" + ("_reverse" if d else "")
            sd = {
                k: raw[f"sd__{k}_{suffix}"]
                for k in ("weight_ih", "weight_hh", "bias_ih", "bias_hh", "weight_hr")
                if f"sd__{k}_{suffix}" in raw
            }
            weights.append(torch_layer_weights(cell, **sd))

    init = None
    if "h0" in raw or "c0" in raw:
        B = x.shape[1]
        h0 = raw["h0"] if "h0" in raw else np.zeros((n_layers * n_dirs, B, cell.output_size), np.float32)
        c0 = raw["c0"] if "c0" in raw else np.zeros((n_layers * n_dirs, B, H), np.float32)
        init = [(h0[k], c0[k]) if module == "LSTM" else (h0[k],) for k in range(n_layers * n_dirs)]
    expected = [raw[f"out_{j}"] for j in range(_count(raw, "out_"))]
    call = GoldenCall(x=x, expected=expected, lengths=lengths, initial_states=init)

    def flatten(output, final_states):
        result = [_swap_bt(output, batch_first), np.stack([s[0] for s in final_states])]
        if module == "LSTM":
            result.append(np.stack([s[1] for s in final_states]))
        return result

    return GoldenCase(name, "torch", raw, spec, weights, [call], flatten)


def load_case(name: str) -> GoldenCase:
    """Load ``tests/golden/<name>.npz`` as a :class:`GoldenCase`."""
    with np.load(GOLDEN_DIR / f"{name}.npz") as data:
        raw = {k: data[k] for k in data.files}
    meta = json.loads(str(raw["spec"]))
    if meta.get("api") == "tf1":
        return _tf1_case(name, raw, meta)
    if meta.get("api") == "torch":
        return _torch_case(name, raw, meta)
    return _keras_case(name, raw, meta)
