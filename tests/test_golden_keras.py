"""Every Keras-family golden fixture through the public Keras-style API, dynamic and unrolled."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import numrnn

GOLDEN = Path(__file__).parent / "golden"
KERAS_FIXTURES = sorted(p.stem for p in GOLDEN.glob("*.npz") if not p.stem.startswith(("tf1_", "torch_")))
CELLS = {"SimpleRNN": numrnn.SimpleRNNCell, "LSTM": numrnn.LSTMCell, "GRU": numrnn.GRUCell}


def build_layer(spec: dict, unroll: bool | None = None):
    """The numrnn layer a Keras fixture describes (``unroll`` overrides the fixture's)."""
    cells = [CELLS[c["kind"]](**{k: v for k, v in c.items() if k != "kind"}) for c in spec["cells"]]
    args = dict(spec.get("args", {}))
    if unroll is not None:
        args["unroll"] = unroll
    layer = numrnn.RNN(cells[0] if len(cells) == 1 else cells, **args)
    if spec.get("layer") == "Bidirectional":
        layer = numrnn.Bidirectional(layer, merge_mode=spec.get("merge_mode", "concat"))
    return layer


def _flatten(result) -> list:
    if isinstance(result, (list, tuple)):
        return [leaf for item in result for leaf in _flatten(item)]
    return [result]


def _count(data, prefix: str) -> int:
    return sum(1 for k in data.files if k.startswith(prefix) and k[len(prefix):].isdigit())


def run_fixture(name: str, unroll: bool | None) -> None:
    data = np.load(GOLDEN / f"{name}.npz")
    spec = json.loads(str(data["spec"]))
    layer = build_layer(spec, unroll)
    layer.set_weights([data[f"weights_{i}"] for i in range(_count(data, "weights_"))])
    assert layer.count_params() == int(data["params"])
    call = 0
    while f"call{call}_x" in data.files:
        prefix = f"call{call}_"
        mask = data[prefix + "mask"] if prefix + "mask" in data.files else None
        n_init = _count(data, prefix + "init_")
        init = [data[f"{prefix}init_{j}"] for j in range(n_init)] if n_init else None
        got = _flatten(layer(data[prefix + "x"], mask=mask, initial_state=init))
        expected = [data[f"{prefix}out_{j}"] for j in range(_count(data, prefix + "out_"))]
        assert len(got) == len(expected)
        for j, (g, e) in enumerate(zip(got, expected)):
            assert g.shape == e.shape, f"call {call} out {j}"
            np.testing.assert_allclose(g, e, rtol=0, atol=1e-5, err_msg=f"call {call} out {j}")
        call += 1


@pytest.mark.parametrize("name", KERAS_FIXTURES)
def test_keras_fixture(name):
    run_fixture(name, unroll=None)


@pytest.mark.parametrize("name", KERAS_FIXTURES)
def test_keras_fixture_unrolled(name):
    run_fixture(name, unroll=True)
