"""Weights changing under concurrent calls: set while another call packs, and built by concurrent first calls.

Each facade keeps its packed weights between calls. The race is made
deterministic here: the pack function itself sets the new weights, as another
thread's ``set_weights`` or ``load_state_dict`` would while a call packs. That
racing call may run on either set; every later call must run on the new one.
Concurrent first calls of an unbuilt layer or cell must all run on the default
weights it keeps.
"""

from __future__ import annotations

import threading
import time

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
    _update_while_packing(monkeypatch, keras_cells, "pack_cell", lambda: layer.set_weights(new))
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
    _update_while_packing(monkeypatch, v1_cells, "pack_cell", lambda: cell.set_weights(new))
    v1_nn.dynamic_rnn(cell, X, dtype=np.float32)
    np.testing.assert_array_equal(v1_nn.dynamic_rnn(cell, X, dtype=np.float32)[0],
                                  v1_nn.dynamic_rnn(fresh, X, dtype=np.float32)[0])


def _slow_builds(monkeypatch, cls) -> None:
    """``cls.build`` sleeps first, each later build longer: a first call's whole run fits in a second's sleep."""
    real, started = cls.build, []

    def slow_build(self, *args):
        started.append(None)
        time.sleep(0.2 * len(started))
        real(self, *args)

    monkeypatch.setattr(cls, "build", slow_build)


def _first_calls_at_once(call, threads: int = 3) -> list:
    results, barrier = [None] * threads, threading.Barrier(threads)

    def run(i):
        barrier.wait()
        results[i] = call()

    workers = [threading.Thread(target=run, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    return results


def test_concurrent_first_calls_of_an_unbuilt_keras_layer_share_its_weights(monkeypatch):
    _slow_builds(monkeypatch, keras_cells.RNNCell)
    layer = numrnn.GRU(4)
    for result in _first_calls_at_once(lambda: layer(X)):
        np.testing.assert_array_equal(result, layer(X))


def test_concurrent_first_steps_of_an_unbuilt_keras_cell_share_its_weights(monkeypatch):
    _slow_builds(monkeypatch, keras_cells.RNNCell)
    cell = numrnn.LSTMCell(4)
    states = cell.get_initial_state(X.shape[0])
    for result in _first_calls_at_once(lambda: cell(X[:, 0], states)[0]):
        np.testing.assert_array_equal(result, cell(X[:, 0], states)[0])


def test_concurrent_first_calls_of_an_unbuilt_tf1_cell_share_its_weights(monkeypatch):
    _slow_builds(monkeypatch, v1_cells.LeafCell)
    cell = v1_nn.rnn_cell.GRUCell(4)
    for result in _first_calls_at_once(lambda: v1_nn.dynamic_rnn(cell, X, dtype=np.float32)[0]):
        np.testing.assert_array_equal(result, v1_nn.dynamic_rnn(cell, X, dtype=np.float32)[0])
