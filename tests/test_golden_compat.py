"""Every TF1- and PyTorch-family golden fixture through the public compat APIs only.

Objects are built from each fixture's ``spec`` JSON the way a user would port
the recorded code; every ``out_*`` is compared at 1e-5. TF1 fixtures also run
through the other sequence function of the same semantics (``dynamic_rnn`` <->
``static_rnn``, i.e. loop <-> static unroll), PyTorch ones also unrolled.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from numrnn.compat import torch as ntorch
from numrnn.compat.v1 import nn as tf1_nn

GOLDEN = Path(__file__).parent / "golden"
TF1_FIXTURES = sorted(p.stem for p in GOLDEN.glob("tf1_*.npz"))
TORCH_FIXTURES = sorted(p.stem for p in GOLDEN.glob("torch_*.npz"))
TOLERANCE = 1e-5
TF1_CELLS = {
    "BasicRNNCell": tf1_nn.rnn_cell.BasicRNNCell,
    "BasicLSTMCell": tf1_nn.rnn_cell.BasicLSTMCell,
    "LSTMCell": tf1_nn.rnn_cell.LSTMCell,
    "GRUCell": tf1_nn.rnn_cell.GRUCell,
}


def _load(name: str) -> tuple[dict, dict]:
    with np.load(GOLDEN / f"{name}.npz") as data:
        raw = {k: data[k] for k in data.files}
    return json.loads(str(raw["spec"])), raw


def _series(raw: dict, prefix: str) -> list:
    out, j = [], 0
    while f"{prefix}{j}" in raw:
        out.append(raw[f"{prefix}{j}"])
        j += 1
    return out


def _flatten(structure) -> list:
    if isinstance(structure, (list, tuple)):
        return [leaf for item in structure for leaf in _flatten(item)]
    return [structure]


def _compare(got: list, expected: list) -> None:
    assert len(got) == len(expected), f"{len(got)} results, fixture has {len(expected)}"
    for j, (g, e) in enumerate(zip(got, expected)):
        assert isinstance(g, np.ndarray), f"out_{j}: {type(g).__name__}"
        assert g.shape == e.shape, f"out_{j}: shape {g.shape} != {e.shape}"
        assert g.dtype == e.dtype, f"out_{j}: dtype {g.dtype} != {e.dtype}"
        err = float(np.max(np.abs(g.astype(np.float64) - e))) if g.size else 0.0
        assert err <= TOLERANCE, f"out_{j}: max abs error {err:.3g}"


# -- TF1 -------------------------------------------------------------------------------------------


def _tf1_cell(meta: dict):
    """The cell a TF1 fixture describes: a MultiRNNCell of its cells unless ``multi`` is false."""
    cells = [TF1_CELLS[c["kind"]](**{k: v for k, v in c.items() if k != "kind"}) for c in meta["cells"]]
    if meta.get("multi", True):
        return tf1_nn.rnn_cell.MultiRNNCell(cells)
    assert len(cells) == 1
    return cells[0]


def _tf1_set_weights(cells: list, raw: dict) -> None:
    """Assign ``weights_<i>`` in creation order, checking our names against the recorded TF ones."""
    arrays, names = _series(raw, "weights_"), [str(n) for n in _series(raw, "weight_name_")]
    start = 0
    for cell in cells:
        wanted = cell.weight_names()
        for got, want in zip(names[start: start + len(wanted)], wanted):
            assert got.rsplit(":", 1)[0].endswith("/" + want), f"{got} vs {want}"
        cell.set_weights(arrays[start: start + len(wanted)])
        start += len(wanted)
    assert start == len(arrays)


def _tf1_state(cell, flat: list):
    """Fixture ``init_*`` (flattened TF1 structure) -> the cell's state structure."""
    leaves = iter(flat)
    template = cell.zero_state(flat[0].shape[0], np.float32)

    def fill(node):
        if isinstance(node, tf1_nn.rnn_cell.LSTMStateTuple):
            return tf1_nn.rnn_cell.LSTMStateTuple(next(leaves), next(leaves))
        if isinstance(node, tuple):
            return tuple(fill(n) for n in node)
        return next(leaves)

    return fill(template)


def run_tf1(name: str, swap_fn: bool) -> None:
    meta, raw = _load(name)
    fn, time_major = meta["fn"], meta.get("time_major", False)
    x, lengths = raw["x"], raw.get("lengths")
    init = _series(raw, "init_")
    expected = _series(raw, "out_")
    if fn == "bidirectional_dynamic_rnn":
        cell_fw, cell_bw = _tf1_cell(meta), _tf1_cell(meta)
        _tf1_set_weights([cell_fw, cell_bw], raw)
        kwargs = {}
        if init:
            half = len(init) // 2
            kwargs = {"initial_state_fw": _tf1_state(cell_fw, init[:half]),
                      "initial_state_bw": _tf1_state(cell_bw, init[half:])}
        result = tf1_nn.bidirectional_dynamic_rnn(cell_fw, cell_bw, x, sequence_length=lengths, dtype=np.float32,
                                                  time_major=time_major, **kwargs)
        _compare(_flatten(result), expected)
        return
    cell = _tf1_cell(meta)
    _tf1_set_weights([cell], raw)
    state = _tf1_state(cell, init) if init else None
    use_static = (fn == "static_rnn") != swap_fn
    if use_static:
        # static_rnn fixtures store the step list stacked like dynamic_rnn's input (batch-major unless time_major)
        steps = list(x) if time_major else list(np.swapaxes(x, 0, 1))
        outputs, final = tf1_nn.static_rnn(cell, steps, initial_state=state, dtype=np.float32,
                                           sequence_length=lengths)
        assert isinstance(outputs, list) and len(outputs) == len(steps)
        output = np.stack(outputs, axis=0 if time_major else 1)
    else:
        output, final = tf1_nn.dynamic_rnn(cell, x, sequence_length=lengths, initial_state=state, dtype=np.float32,
                                           time_major=time_major)
    _compare([output, *_flatten(final)], expected)


@pytest.mark.parametrize("name", TF1_FIXTURES)
def test_tf1_fixture(name):
    run_tf1(name, swap_fn=False)


@pytest.mark.parametrize("name", [n for n in TF1_FIXTURES if "bidirectional" not in n])
def test_tf1_fixture_other_function(name):
    """dynamic_rnn fixtures through static_rnn (static unroll) and static_rnn ones through dynamic_rnn (loop)."""
    run_tf1(name, swap_fn=True)


# -- PyTorch ---------------------------------------------------------------------------------------

TORCH_MODULES = {"RNN": ntorch.nn.RNN, "LSTM": ntorch.nn.LSTM, "GRU": ntorch.nn.GRU}


def run_torch(name: str, unroll: bool) -> None:
    meta, raw = _load(name)
    kwargs = {k: v for k, v in meta.items() if k not in ("api", "module")}
    module = TORCH_MODULES[meta["module"]](**kwargs, unroll=unroll)
    state_dict = {k[len("sd__"):]: v for k, v in raw.items() if k.startswith("sd__")}
    assert set(state_dict) == set(module.state_dict())
    module.load_state_dict(state_dict)
    hx = None
    if "h0" in raw or "c0" in raw:
        n = meta.get("num_layers", 1) * (2 if meta.get("bidirectional") else 1)
        batch = raw["x"].shape[0 if meta.get("batch_first") else 1]
        hidden = meta["hidden_size"]
        h0 = raw.get("h0", np.zeros((n, batch, meta.get("proj_size") or hidden), np.float32))
        hx = (h0, raw.get("c0", np.zeros((n, batch, hidden), np.float32))) if meta["module"] == "LSTM" else h0
    result = module(raw["x"], hx, lengths=raw.get("lengths"))
    _compare(_flatten(result), _series(raw, "out_"))


@pytest.mark.parametrize("name", TORCH_FIXTURES)
def test_torch_fixture(name):
    run_torch(name, unroll=False)


@pytest.mark.parametrize("name", TORCH_FIXTURES)
def test_torch_fixture_unrolled(name):
    run_torch(name, unroll=True)
