"""Residual connection out = inp1 + inp2, forward and backward (NumPy oracle).

Activation gradients overwrite (=): both inputs receive dout.
"""

import numpy as np


def residual_forward(out, inp1, inp2):
    np.add(inp1, inp2, out=out)


def residual_backward(dinp1, dinp2, dout):
    dinp1[...] = dout
    dinp2[...] = dout
