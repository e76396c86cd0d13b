"""GELU, tanh approximation (as GPT-2), forward and backward (NumPy oracle).

Shapes: any; out/dinp have the shape of inp. Activation gradients overwrite (=).

Both run as a sequence of in-place ufuncs on blocks of a few thousand elements
(threads.elementwise: the blocks stay in cache and are spread over the CPU
threads), in the same operation order as the formulas, so the values are those
of the formulas written with temporaries. The temporaries were the cost: at
d12 B=4 T=64 on a 2-core VM (2026-12-06) the written-out backward took 27 ms
per (256, 3072) call, mostly in NumPy's handling of expressions like
1.0 - th * th on freshly allocated 3 MB temporaries, against ~1 ms here.
"""

import numpy as np

from .threads import elementwise

GELU_SCALE = np.float32(np.sqrt(2.0 / np.pi))
GELU_CUBE = np.float32(0.044715)
GELU_CUBE3 = np.float32(3.0) * GELU_CUBE


def _forward(out, x):
    # out = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
    np.multiply(x, GELU_CUBE, out=out)
    out *= x
    out *= x
    out += x
    out *= GELU_SCALE
    np.tanh(out, out=out)
    out += np.float32(1.0)
    out *= np.float32(0.5)
    out *= x


def gelu_forward(out, inp):
    """out = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))"""
    elementwise(_forward, (out, inp))


def _backward(dinp, dout, x):
    # th = tanh(sqrt(2/pi) (x + 0.044715 x^3)), sech2 = 1 - th^2,
    # dinp = dout (0.5 (1 + th) + 0.5 x sech2 sqrt(2/pi) (1 + 3 0.044715 x^2))
    x2 = np.multiply(x, x)
    t = np.multiply(x2, GELU_CUBE)
    t *= x
    t += x
    t *= GELU_SCALE
    th = np.tanh(t)
    np.multiply(th, th, out=t)
    np.subtract(np.float32(1.0), t, out=t)   # sech2
    t *= x                                   # 0.5 x sech2 sqrt(2/pi) (1 + 3 c x^2)
    t *= np.float32(0.5)
    t *= GELU_SCALE
    x2 *= GELU_CUBE3
    x2 += np.float32(1.0)
    t *= x2
    th += np.float32(1.0)                    # 0.5 (1 + th)
    th *= np.float32(0.5)
    th += t
    np.multiply(th, dout, out=dinp)


def gelu_backward(dinp, dout, inp):
    """dinp = dout * d/dx gelu(x); dinp may be dout (in place: _backward reads dout once,
    in its last operation)."""
    elementwise(_backward, (dinp, dout, inp))
