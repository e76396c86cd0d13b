"""Linear layer out = inp @ weight.T + bias, forward and backward (NumPy oracle).

Shapes: inp (B,T,C), weight (OC,C) as llm.c and PyTorch store it, bias (OC,)
or None, out (B,T,OC). Parameter gradients accumulate (+=); activation
gradients overwrite (=). matmul_backward(..., accumulate_weight=False)
overwrites dweight and dbias instead (the first backward after zero_grad,
where += onto zeros would be a wasted pass on the GPU).
"""

import numpy as np

from .gelu import gelu_backward, gelu_forward

ACC_BLOCK = 1 << 20   # elements of the scratch block _add_weight_grad accumulates through


def _rows(a):
    """View a contiguous (..., N) array as (rows, N) without copying."""
    view = a.reshape(-1, a.shape[-1])
    if not np.shares_memory(view, a):
        raise ValueError("matmul: arrays must be C-contiguous")
    return view


def matmul_forward(out, inp, weight, bias=None):
    out2 = _rows(out)
    np.matmul(_rows(inp), weight.T, out=out2)
    if bias is not None:
        out2 += bias


def matmul_backward(dinp, dweight, dbias, dout, inp, weight, accumulate_weight=True):
    """dinp = dout @ weight; dweight += dout.T @ inp; dbias += sum of dout rows
    (accumulate_weight=False: dweight = ..., dbias = ..., their old values ignored)."""
    dout2, inp2 = _rows(dout), _rows(inp)
    if dinp is not None:
        np.matmul(dout2, weight, out=_rows(dinp))
    if accumulate_weight:
        _add_weight_grad(dweight, dout2, inp2)
    else:
        np.matmul(dout2.T, inp2, out=dweight)
    if dbias is not None:
        if accumulate_weight:
            dbias += dout2.sum(axis=0)
        else:
            np.sum(dout2, axis=0, out=dbias)


def _add_weight_grad(dweight, dout2, inp2, block=ACC_BLOCK):
    """dweight += dout2.T @ inp2, a block of dweight's rows at a time through one reused
    scratch block: `dweight += dout2.T @ inp2` makes a full-size temporary, 154 MB of
    fresh pages for d12's wte every step."""
    step = max(1, block // dweight.shape[1])
    scratch = np.empty((min(step, dweight.shape[0]), dweight.shape[1]), dtype=dweight.dtype)
    for lo in range(0, dweight.shape[0], step):
        hi = min(lo + step, dweight.shape[0])
        part = scratch[:hi - lo]
        np.matmul(dout2[:, lo:hi].T, inp2, out=part)
        dweight[lo:hi] += part


# The fc layer with its GELU, forward and backward, composed from the plain functions
# (llmcu/cuda/matmul.py runs each as one cuBLASLt GEMM with an epilogue), so the GPT-2
# layer sequence (llmcu/cpu/gpt2.py) calls them on either backend.

def matmul_gelu_forward(out, pre, inp, weight, bias=None):
    """pre = inp @ weight.T + bias, out = gelu(pre)."""
    matmul_forward(pre, inp, weight, bias)
    gelu_forward(out, pre)


def matmul_dgelu_backward(dpre, dweight, dbias, dout, inp, weight, pre, accumulate_weight=True):
    """matmul_backward of the layer after the GELU, its input gradient then through the
    GELU's backward into dpre (overwritten); dweight/dbias as matmul_backward."""
    matmul_backward(dpre, dweight, dbias, dout, inp, weight, accumulate_weight)  # d(gelu output)
    gelu_backward(dpre, dpre, pre)  # in place (gelu_backward allows dinp is dout)
