"""GELU, tanh approximation (as GPT-2), forward and backward (NumPy oracle).

Shapes: any; out/dinp have the shape of inp. Activation gradients overwrite (=).
"""

import numpy as np

GELU_SCALE = np.float32(np.sqrt(2.0 / np.pi))
GELU_CUBE = np.float32(0.044715)


def gelu_forward(out, inp):
    """out = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))"""
    x = inp
    np.tanh(GELU_SCALE * (x + GELU_CUBE * x * x * x), out=out)
    out += 1.0
    out *= 0.5 * x


def gelu_backward(dinp, dout, inp):
    """dinp = dout * d/dx gelu(x)."""
    x = inp
    x2 = x * x
    th = np.tanh(GELU_SCALE * (x + GELU_CUBE * x2 * x))
    sech2 = 1.0 - th * th
    local = 0.5 * (1.0 + th) + 0.5 * x * sech2 * GELU_SCALE * (1.0 + 3.0 * GELU_CUBE * x2)
    np.multiply(local, dout, out=dinp)
