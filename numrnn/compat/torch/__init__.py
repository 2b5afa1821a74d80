"""PyTorch-style API on numrnn's kernels: ``from numrnn.compat.torch import nn``; ``nn.LSTM(...)`` etc.

torch itself is optional: tensors are accepted by duck typing, never imported.
"""

from numrnn.compat.torch import nn

__all__ = ["nn"]
