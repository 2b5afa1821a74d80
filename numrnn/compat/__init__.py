"""Compatibility facades and foreign weight layouts.

- :mod:`numrnn.compat.v1`: TF1-style ``nn.dynamic_rnn``, ``nn.static_rnn``,
  ``nn.bidirectional_dynamic_rnn`` and ``nn.rnn_cell``;
- :mod:`numrnn.compat.torch`: PyTorch-style ``nn.RNN``, ``nn.LSTM``, ``nn.GRU``;
- :mod:`numrnn.compat.weights`: pure-NumPy converters between Keras, TF1 and
  PyTorch weight layouts and numrnn's logical one.

The facades are imported on demand (``from numrnn.compat.v1 import nn``).
"""
