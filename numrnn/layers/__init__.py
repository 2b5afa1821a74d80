"""Keras-style facade: cells, StackedRNNCells, RNN and its shorthands, Bidirectional."""

from numrnn.layers.cells import GRUCell, LSTMCell, RNNCell, SimpleRNNCell, StackedRNNCells
from numrnn.layers.rnn import GRU, LSTM, RNN, Bidirectional, SimpleRNN

__all__ = ["GRU", "LSTM", "RNN", "Bidirectional", "GRUCell", "LSTMCell", "RNNCell", "SimpleRNN",
           "SimpleRNNCell", "StackedRNNCells"]
