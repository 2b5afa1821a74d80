"""TF1-style API on numrnn's kernels: ``from numrnn.compat.v1 import nn`` mirrors ``tf.compat.v1.nn``."""

from numrnn.compat.v1 import nn

__all__ = ["nn"]
