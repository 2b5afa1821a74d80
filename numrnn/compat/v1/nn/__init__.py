"""``tf.compat.v1.nn``: ``dynamic_rnn``, ``static_rnn``, ``bidirectional_dynamic_rnn`` and ``rnn_cell``."""

from numrnn.compat.v1.nn import rnn_cell
from numrnn.compat.v1.rnn import bidirectional_dynamic_rnn, dynamic_rnn, static_rnn

__all__ = ["bidirectional_dynamic_rnn", "dynamic_rnn", "rnn_cell", "static_rnn"]
