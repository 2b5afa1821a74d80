"""numrnn: recurrent networks as generated Numba kernels, behind Keras, TF1 and PyTorch-style facades.

The Keras-style API lives at the top level (``numrnn.RNN``, ``numrnn.LSTMCell``, ...);
see ``numrnn.compat`` for the TF1 and PyTorch ones.
"""

from codegen.spec import UNROLL_CEILING
from numrnn.layers import (
    GRU,
    LSTM,
    RNN,
    Bidirectional,
    GRUCell,
    LSTMCell,
    RNNCell,
    SimpleRNN,
    SimpleRNNCell,
    StackedRNNCells,
)

__version__ = "0.1.0"

__all__ = ["GRU", "LSTM", "RNN", "UNROLL_CEILING", "Bidirectional", "GRUCell", "LSTMCell", "RNNCell", "SimpleRNN",
           "SimpleRNNCell", "StackedRNNCells", "__version__"]
