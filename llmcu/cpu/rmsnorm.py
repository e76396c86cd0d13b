"""RMSNorm over the last axis, forward and backward (NumPy oracle).

Llama's norm: no mean subtraction, no bias. Gemma scales by (1 + weight), which
is weight_offset=1.0 here (its weights are stored as the offset from one).

Shapes: inp/out (B,T,C) (any leading axes), weight (C,), rstd (B,T) is cached
for the backward. Parameter gradients accumulate (+=); activation gradients
overwrite (=).
"""

import numpy as np

EPS = 1e-5


def rmsnorm_forward(out, rstd, inp, weight, eps=EPS, weight_offset=0.0):
    """rstd = 1 / sqrt(mean_C(inp^2) + eps);  out = inp * rstd * (weight_offset + weight)."""
    ms = np.mean(inp * inp, axis=-1, keepdims=True)
    rs = 1.0 / np.sqrt(ms + inp.dtype.type(eps))
    scale = inp.dtype.type(weight_offset) + weight
    np.multiply(inp * rs, scale, out=out)
    rstd[...] = rs[..., 0]


def rmsnorm_backward(dinp, dweight, dout, inp, weight, rstd, weight_offset=0.0):
    """Gradients of rmsnorm_forward given the cached rstd.

    With n = inp * rstd and g = dout * (weight_offset + weight):
      dweight += sum over rows of dout * n
      dinp     = rstd * (g - n * mean_C(g * n))
    """
    C = inp.shape[-1]
    rs = rstd[..., None]
    norm = inp * rs
    g = dout * (inp.dtype.type(weight_offset) + weight)
    dweight += (dout * norm).reshape(-1, C).sum(axis=0)
    dinp[...] = (g - norm * (g * norm).mean(axis=-1, keepdims=True)) * rs
