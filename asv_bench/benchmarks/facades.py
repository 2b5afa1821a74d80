"""One streaming step through each facade: LSTM(32), one row, one step a call, the state carried.

The kernel's own call (``numrnn bench``'s streaming row) against what a user
of the Keras, PyTorch and TF1 facades pays a step: the facades' checks,
layouts and state structures around it. Each setup compiles (or loads) and
warms its kernel.
"""

from __future__ import annotations

import numpy as np

import numrnn
from numrnn.compat.torch import nn
from numrnn.compat.v1 import nn as v1
from numrnn.runtime import get_kernel

from . import common  # noqa: F401 - the suite's own kernel cache

UNITS = 32
WARM_CALLS = 200


def _kernel_step():
    layer = numrnn.LSTM(UNITS)
    layer.build((1, 1, UNITS))
    spec = layer.spec(1)
    kernel, weights = get_kernel(spec), [a for cell in layer.all_cells for a in cell.packed()]
    x = np.random.default_rng(0).standard_normal((1, 1, UNITS)).astype(np.float32)
    states = [np.zeros((1, UNITS), np.float32) for _ in range(2)]
    return lambda: kernel(x, None, states, weights)


def _keras_layer_step():
    layer = numrnn.LSTM(UNITS, return_state=True)
    x = np.random.default_rng(0).standard_normal((1, 1, UNITS)).astype(np.float32)
    state = [np.zeros((1, UNITS), np.float32)] * 2

    def step():
        state[:] = layer(x, initial_state=state)[1:]
    return step


def _keras_cell_step():
    cell = numrnn.LSTMCell(UNITS)
    x = np.random.default_rng(0).standard_normal((1, UNITS)).astype(np.float32)
    state = [[np.zeros((1, UNITS), np.float32)] * 2]

    def step():
        state[0] = cell(x, state[0])[1]
    return step


def _torch_step():
    module = nn.LSTM(UNITS, UNITS)
    x = np.random.default_rng(0).standard_normal((1, 1, UNITS)).astype(np.float32)
    state = [None]

    def step():
        state[0] = module(x, state[0])[1]
    return step


def _tf1_cell_step():
    cell = v1.rnn_cell.LSTMCell(UNITS)
    x = np.random.default_rng(0).standard_normal((1, UNITS)).astype(np.float32)
    state = [cell.zero_state(1)]

    def step():
        state[0] = cell(x, state[0])[1]
    return step


def _tf1_dynamic_rnn_step():
    cell = v1.rnn_cell.LSTMCell(UNITS)
    x = np.random.default_rng(0).standard_normal((1, 1, UNITS)).astype(np.float32)
    state = [cell.zero_state(1)]

    def step():
        state[0] = v1.dynamic_rnn(cell, x, initial_state=state[0])[1]
    return step


STEPS = {"kernel": _kernel_step, "keras LSTM": _keras_layer_step, "keras LSTMCell": _keras_cell_step,
         "torch LSTM": _torch_step, "tf1 LSTMCell": _tf1_cell_step, "tf1 dynamic_rnn": _tf1_dynamic_rnn_step}


class TimeFacadeStep:
    """A streaming step: the kernel alone, then each facade's call."""

    params = list(STEPS)
    param_names = ["facade"]

    def setup(self, facade):
        self.step = STEPS[facade]()
        for _ in range(WARM_CALLS):
            self.step()

    def time_step(self, facade):
        self.step()

