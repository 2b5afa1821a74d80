"""A call through each facade against the kernel's own: what the facades' checks, layouts and state
structures cost a call.

Two shapes of the standard set, one row each, the state carried from call
to call: streaming (LSTM(32) on 32 features, one step a call) and tiny64
(LSTM(64) on 32 features, 50 steps). The cells' facades run one step, so
streaming only. Each setup compiles (or loads) and warms its kernel.
"""

from __future__ import annotations

import numpy as np

import numrnn
from numrnn.compat.torch import nn
from numrnn.compat.v1 import nn as v1
from numrnn.runtime import get_kernel

from . import common  # noqa: F401 - the suite's own kernel cache

#: (units, steps, features) of each shape.
SHAPES = {"streaming": (32, 1, 32), "tiny64": (64, 50, 32)}
WARM_CALLS = 200


def _input(steps: int, features: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((1, steps, features)).astype(np.float32)


def _kernel(units, steps, features):
    layer = numrnn.LSTM(units)
    layer.build((1, steps, features))
    kernel, weights = get_kernel(layer.spec(steps)), [a for cell in layer.all_cells for a in cell.packed()]
    x = np.ascontiguousarray(_input(steps, features).transpose(1, 0, 2))
    states = [np.zeros((1, units), np.float32) for _ in range(2)]
    return lambda: kernel(x, None, states, weights)


def _keras_layer(units, steps, features):
    layer, x = numrnn.LSTM(units, return_state=True), _input(steps, features)
    state = [np.zeros((1, units), np.float32)] * 2

    def call():
        state[:] = layer(x, initial_state=state)[1:]
    return call


def _torch(units, steps, features):
    module, x = nn.LSTM(features, units, batch_first=True), _input(steps, features)
    state = [None]

    def call():
        state[0] = module(x, state[0])[1]
    return call


def _tf1_dynamic_rnn(units, steps, features):
    cell, x = v1.rnn_cell.LSTMCell(units), _input(steps, features)
    state = [cell.zero_state(1)]

    def call():
        state[0] = v1.dynamic_rnn(cell, x, initial_state=state[0])[1]
    return call


def _keras_cell(units, steps, features):
    cell, x = numrnn.LSTMCell(units), _input(steps, features)[:, 0]
    state = [[np.zeros((1, units), np.float32)] * 2]

    def call():
        state[0] = cell(x, state[0])[1]
    return call


def _tf1_cell(units, steps, features):
    cell, x = v1.rnn_cell.LSTMCell(units), _input(steps, features)[:, 0]
    state = [cell.zero_state(1)]

    def call():
        state[0] = cell(x, state[0])[1]
    return call


CALLS = {"kernel": _kernel, "keras LSTM": _keras_layer, "torch LSTM": _torch, "tf1 dynamic_rnn": _tf1_dynamic_rnn,
         "keras LSTMCell": _keras_cell, "tf1 LSTMCell": _tf1_cell}
ONE_STEP = ("keras LSTMCell", "tf1 LSTMCell")


class TimeFacadeCall:
    """One call of each shape: the kernel alone, then through each facade."""

    params = (list(CALLS), list(SHAPES))
    param_names = ["facade", "shape"]

    def setup(self, facade, shape):
        units, steps, features = SHAPES[shape]
        if facade in ONE_STEP and steps != 1:
            raise NotImplementedError("a cell's call is one step")
        self.call = CALLS[facade](units, steps, features)
        for _ in range(WARM_CALLS):
            self.call()

    def time_call(self, facade, shape):
        self.call()
