"""LayerNorm over the last axis, forward and backward (NumPy oracle).

Shapes: inp/out (B,T,C), weight/bias (C,), mean/rstd (B,T) are cached for the
backward. Parameter gradients accumulate (+=); activation gradients overwrite (=).
"""

import numpy as np

from .threads import rows

EPS = 1e-5


def layernorm_forward(out, mean, rstd, inp, weight, bias, eps=EPS):
    """out = (inp - mean) * rstd * weight + bias, with the biased variance."""
    mu = inp.mean(axis=-1, keepdims=True)
    xc = inp - mu
    var = np.mean(xc * xc, axis=-1, keepdims=True)
    rs = 1.0 / np.sqrt(var + np.float32(eps))
    np.multiply(xc * rs, weight, out=out)
    out += bias
    mean[...] = mu[..., 0]
    rstd[...] = rs[..., 0]


def layernorm_backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd):
    """Gradients of layernorm_forward given the cached mean and rstd.

    With n = (x - mean) * rstd and g = dout * weight:
      dbias   += sum over rows of dout
      dweight += sum over rows of dout * n
      dinp     = rstd * (g - mean_C(g) - n * mean_C(g * n))
    """
    C = inp.shape[-1]
    norm = (inp - mean[..., None]) * rstd[..., None]
    dnorm = dout * weight
    dbias += dout.reshape(-1, C).sum(axis=0)
    dweight += (dout * norm).reshape(-1, C).sum(axis=0)
    dinp[...] = (dnorm
                 - dnorm.mean(axis=-1, keepdims=True)
                 - norm * (dnorm * norm).mean(axis=-1, keepdims=True)) * rstd[..., None]


# The two fused ops of the GPT-2 step (llmcu/cuda/layernorm.py runs each as one kernel),
# composed here from the plain functions: the same values, so the layer sequence
# (llmcu/cpu/gpt2.py) calls them on either backend.

def residual_layernorm_forward(residual_out, ln_out, mean, rstd, inp1, inp2, weight, bias, eps=EPS):
    """residual_out = inp1 + inp2, then ln_out, mean, rstd = layernorm(residual_out); each row
    on its own, so on blocks of rows over the CPU threads (threads.rows)."""
    rows(_residual_layernorm_forward, (residual_out, ln_out, mean, rstd, inp1, inp2), weight, bias, eps,
         lead=inp1.ndim - 1)


def _residual_layernorm_forward(residual_out, ln_out, mean, rstd, inp1, inp2, weight, bias, eps):
    np.add(inp1, inp2, out=residual_out)
    layernorm_forward(ln_out, mean, rstd, residual_out, weight, bias, eps)


def layernorm_backward_add(dres, dweight, dbias, dout, inp, weight, mean, rstd):
    """layernorm_backward with the input gradient added into dres (dres += dinp)."""
    dinp = np.empty_like(dres)
    layernorm_backward(dinp, dweight, dbias, dout, inp, weight, mean, rstd)
    dres += dinp
