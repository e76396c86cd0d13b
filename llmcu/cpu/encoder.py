"""Token + position embedding, forward and backward (NumPy oracle).

Shapes: inp (B,T) int token ids, wte (Vp,C), wpe (maxT,C), out (B,T,C).
Parameter gradients accumulate (+=); activation gradients overwrite (=).
"""

import numpy as np


def encoder_forward(out, inp, wte, wpe):
    """out[b,t,:] = wte[inp[b,t],:] + wpe[t,:]"""
    T = inp.shape[1]
    np.take(wte, inp, axis=0, out=out)
    out += wpe[:T]


def encoder_backward(dwte, dwpe, dout, inp):
    """dwte[inp[b,t]] += dout[b,t]; dwpe[t] += sum_b dout[b,t].

    np.add.at sums repeated token ids one after another, so the result is
    deterministic (the same order on every run).
    """
    T, C = dout.shape[1], dout.shape[2]
    np.add.at(dwte, inp.reshape(-1), dout.reshape(-1, C))
    dwpe[:T] += dout.sum(axis=0)
