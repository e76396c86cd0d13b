"""The encoder lab (kernels/dev/encoder.cu through kernels/dev/encoder.py): backward
version 1 (a thread per channel walking every position in order) against the NumPy oracle
llmcu/cpu/encoder.py, fp32 and bf16, on the emulator (and a GPU when there is one).

dwte and dwpe start from random values (the gradients accumulate, +=). dwpe: start + B
terms per (t, c) summed in fp32 and rounded once; dwte: start + count(token) terms, added
one position at a time (bf16: rounded after each add). Tolerances: atol = (n + log2 n + 2)
* 2^-24 * max(|start| + sum |terms|), a bound on any summation order (Higham 4.2), plus
one bf16 rounding (rtol 2^-8); for bf16 dwte the n - 1 further roundings of partial sums
at most (n + 1) max|value| each. Rows of tokens never seen and positions past T stay
untouched, bit for bit. Shapes: C = 1023 (odd), a hot token at every other position (one
column sums 64 rows), a vocabulary with 5 rows never seen.
"""

import math

import numpy as np
import pytest

from helpers import Device, KERNEL_BACKENDS, assert_close, rand_x, value
from llmcu.lab import load as load_lab
from llmcu.cpu import encoder as cpu

U, EPS32 = 2.0 ** -8, 2.0 ** -24
DTYPES = [pytest.param(np.float32, id="fp32"), pytest.param(np.uint16, id="bf16")]


lab = load_lab("encoder")


@pytest.fixture(params=KERNEL_BACKENDS)
def dev(request):
    return Device(request.param)


def sum_tol(dtype, start, terms):
    n = terms.shape[0]
    colsum = np.abs(start).astype(np.float64) + np.abs(terms).astype(np.float64).sum(axis=0)
    return dict(atol=(n + math.log2(max(n, 1)) + 2) * EPS32 * float(colsum.max()),
                rtol=U if np.dtype(dtype) == np.uint16 else 0.0)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,T,C,V,hot", [(2, 7, 48, 101, None), (1, 5, 1023, 37, None), (4, 32, 40, 9, 3)])
def test_backward1(dev, dtype, B, T, C, V, hot):
    rng = np.random.default_rng(26)
    Vp, maxT = V + 5, T + 3
    inp = rng.integers(0, V, (B, T)).astype(np.int32)
    inp[0, :3] = 1  # a repeated id
    if hot is not None:
        inp.reshape(-1)[::2] = hot
    (dout, doutf), (w0, w0f), (p0, p0f) = (rand_x(rng, dtype, B, T, C), rand_x(rng, dtype, Vp, C),
                                           rand_x(rng, dtype, maxT, C))
    dwte, dwpe = dev.put(w0), dev.put(p0)
    lab.VERSIONS[1].ops["encoder_backward"](dwte, dwpe, dev.put(dout), dev.put(inp))
    dwte, dwpe = dev.get(dwte), dev.get(dwpe)
    rwte, rwpe = w0f.copy(), p0f.copy()
    cpu.encoder_backward(rwte, rwpe, doutf, inp)

    terms = np.zeros((B, maxT, C), np.float32)
    terms[:, :T] = doutf
    assert_close("encoder_backward_kernel1 dwpe", value(dwpe), rwpe, **sum_tol(dtype, p0f, terms))
    counts = np.bincount(inp.reshape(-1), minlength=Vp)
    n = int(counts.max())
    gathered = np.zeros((n, Vp, C), np.float32)  # gathered[k, token] = the token's k-th dout row
    seen = np.zeros(Vp, np.int64)
    for pos, token in enumerate(inp.reshape(-1)):
        gathered[seen[token], token] = doutf.reshape(-1, C)[pos]
        seen[token] += 1
    tol = sum_tol(dtype, w0f, gathered)
    if np.dtype(dtype) == np.uint16:
        tol["atol"] += (n - 1) * U * (n + 1) * float(max(np.abs(w0f).max(), np.abs(doutf).max()))
    assert_close("encoder_backward_kernel1 dwte", value(dwte), rwte, **tol)
    unseen = counts == 0
    assert unseen[-5:].all()
    assert np.array_equal(dwte[unseen], w0[unseen]), "dwte rows of unseen tokens changed"
    assert np.array_equal(dwpe[T:], p0[T:]), "dwpe rows past T changed"


def test_backward1_refuses_bad_arguments():
    bwd = lab.VERSIONS[1].ops["encoder_backward"]
    z = np.zeros((4, 6), np.float32)
    with pytest.raises(ValueError, match=r"encoder_backward: T=5 exceeds maxT=4"):
        bwd(np.zeros((9, 6), np.float32), z, np.zeros((1, 5, 6), np.float32), np.zeros((1, 5), np.int32))
    with pytest.raises(TypeError, match=r"encoder_backward: inp must have dtype int32, got int64"):
        bwd(np.zeros((9, 6), np.float32), z, np.zeros((1, 2, 6), np.float32), np.zeros((1, 2), np.int64))
