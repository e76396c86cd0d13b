"""Gated MLP activations SwiGLU (Llama) and GeGLU (Gemma), forward and backward
(NumPy oracle).

Shapes: inp (B,T,2H) = [gate | up] along the last axis (the gate half first),
out (B,T,H); dinp has inp's shape, dout out's. Activation gradients overwrite (=).
  swiglu: out = silu(gate) * up,  silu(x) = x * sigmoid(x) = x / (1 + exp(-x))
  geglu:  out = gelu(gate) * up,  gelu with the tanh approximation (Gemma's
          gelu_pytorch_tanh, the same formula as GPT-2's, llmcu/cpu/gelu.py)
"""

import numpy as np

from .gelu import gelu_backward, gelu_forward


def _halves(fn, inp):
    if inp.shape[-1] % 2 != 0:
        raise ValueError(f"{fn}: inp last axis must be 2*H (gate then up), got {inp.shape[-1]}")
    H = inp.shape[-1] // 2
    return inp[..., :H], inp[..., H:]


def _sigmoid(x):
    # exp(-x) overflows to inf for x < -88 in float32; 1 / (1 + inf) = 0 is the right limit.
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-x))


def swiglu_forward(out, inp):
    gate, up = _halves("swiglu_forward", inp)
    np.multiply(gate * _sigmoid(gate), up, out=out)


def swiglu_backward(dinp, dout, inp):
    """d gate = dout * up * sig * (1 + gate * (1 - sig));  d up = dout * silu(gate)."""
    gate, up = _halves("swiglu_backward", inp)
    H = gate.shape[-1]
    sig = _sigmoid(gate)
    dgate = dout * up * sig * (1.0 + gate * (1.0 - sig))
    dup = dout * gate * sig
    dinp[..., :H] = dgate
    dinp[..., H:] = dup


def geglu_forward(out, inp):
    gate, up = _halves("geglu_forward", inp)
    g = np.empty_like(gate)
    gelu_forward(g, gate)
    np.multiply(g, up, out=out)


def geglu_backward(dinp, dout, inp):
    """d gate = dout * up * gelu'(gate);  d up = dout * gelu(gate)."""
    gate, up = _halves("geglu_backward", inp)
    H = gate.shape[-1]
    dgate = np.empty_like(gate)
    gelu_backward(dgate, dout * up, gate)
    g = np.empty_like(gate)
    gelu_forward(g, gate)
    dinp[..., :H] = dgate
    dinp[..., H:] = dout * g
