"""numrnn: recurrent networks as generated Numba kernels, behind Keras, TF1 and PyTorch-style facades.

The Keras-style API lives at the top level (``numrnn.RNN``, ``numrnn.LSTMCell``, ...);
see ``numrnn.compat`` for the TF1 and PyTorch ones.
"""

from numrnn._openblas_env import prefer_avx512_openblas

prefer_avx512_openblas()  # before NumPy/SciPy load OpenBLAS: see numrnn/_openblas_env.py

from codegen.spec import UNROLL_CEILING  # noqa: E402
from numrnn.layers import (  # noqa: E402
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
