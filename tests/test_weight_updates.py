"""Weights set while a call on another thread packs the old ones: the calls after the update use the new ones.

Each facade keeps its packed weights between calls. The race is made
deterministic here: the pack function itself sets the new weights, as another
thread's ``set_weights`` or ``load_state_dict`` would while a call packs. That
racing call may run on either set; every later call must run on the new one.
"""

from __future__ import annotations

import numpy as np

import numrnn
from numrnn.compat.torch import nn as torch_nn
from numrnn.compat.v1 import cells as v1_cells
from numrnn.compat.v1 import nn as v1_nn
from numrnn.layers import cells as keras_cells

X = np.random.default_rng(3).standard_normal((2, 6, 3)).astype(np.float32)


def _update_while_packing(monkeypatch, module, name: str, update) -> None:
    """Make ``module.name`` (a pack function) run ``update()`` once, after packing, as a racing thread would."""
    real = getattr(module, name)

    def pack_then_update(*args, **kwargs):
        packed = real(*args, **kwargs)
        monkeypatch.setattr(module, name, real)
        update()
        return packed

    monkeypatch.setattr(module, name, pack_then_update)


def test_keras_layer(monkeypatch):
    layer, fresh = numrnn.LSTM(4), numrnn.LSTM(4)
    layer.build(X.shape)
    new = [w + 0.25 for w in layer.get_weights()]
    fresh.set_weights(new)
    _update_while_packing(monkeypatch, keras_cells, "pack", lambda: layer.set_weights(new))
    layer(X)  # the racing call
    np.testing.assert_array_equal(layer(X), fresh(X))


def test_torch_module(monkeypatch):
    module, fresh = torch_nn.GRU(3, 4), torch_nn.GRU(3, 4)
    new = {key: value + 0.25 for key, value in module.state_dict().items()}
    fresh.load_state_dict(new)
    _update_while_packing(monkeypatch, torch_nn, "pack_weights", lambda: module.load_state_dict(new))
    module(X)
    np.testing.assert_array_equal(module(X)[0], fresh(X)[0])


def test_tf1_cell(monkeypatch):
    cell, fresh = v1_nn.rnn_cell.LSTMCell(4), v1_nn.rnn_cell.LSTMCell(4)
    cell.build(3)
    new = [w + 0.25 for w in cell.get_weights()]
    fresh.set_weights(new)
    _update_while_packing(monkeypatch, v1_cells, "pack", lambda: cell.set_weights(new))
    v1_nn.dynamic_rnn(cell, X, dtype=np.float32)
    np.testing.assert_array_equal(v1_nn.dynamic_rnn(cell, X, dtype=np.float32)[0],
                                  v1_nn.dynamic_rnn(fresh, X, dtype=np.float32)[0])
