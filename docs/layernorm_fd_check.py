"""Check llmcu's layernorm backward against float64 finite differences.

    python docs/layernorm_fd_check.py

The tutorial docs/layernorm.md walks through this file. The oracle in
llmcu/cpu/layernorm.py is plain NumPy, so it runs on float64 arrays as well as
float32 ones; in float64 a central difference is accurate to ~1e-9, so the
analytic gradients must agree to that level. Exits 1 on a mismatch.
"""

import sys

import numpy as np

from llmcu.cpu.layernorm import layernorm_backward, layernorm_forward


def finite_difference_check(B=2, T=3, C=5, h=1e-6, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((B, T, C)) * 2.0 + 0.5
    w, b = rng.standard_normal(C), rng.standard_normal(C)
    dout = rng.standard_normal((B, T, C))  # the loss is L = sum(dout * out)
    out, mean, rstd = np.empty((B, T, C)), np.empty((B, T)), np.empty((B, T))

    def loss():
        layernorm_forward(out, mean, rstd, x, w, b)
        return float((dout * out).sum())

    def numeric(a):  # dL/da by central differences, one element at a time
        grad = np.empty_like(a)
        for i in np.ndindex(a.shape):
            old = a[i]
            a[i] = old + h
            up = loss()
            a[i] = old - h
            down = loss()
            a[i] = old
            grad[i] = (up - down) / (2 * h)
        return grad

    loss()  # fills mean and rstd for the backward
    dinp, dw, db = np.empty_like(x), np.zeros(C), np.zeros(C)
    layernorm_backward(dinp, dw, db, dout, x, w, mean, rstd)
    return {name: float(np.abs(analytic - numeric(a)).max())
            for name, analytic, a in (("dinp", dinp, x), ("dweight", dw, w), ("dbias", db, b))}


if __name__ == "__main__":
    errors = finite_difference_check()
    for name, err in errors.items():
        print(f"{name:8s} max |analytic - numeric| = {err:.1e}")
    ok = all(err < 1e-7 for err in errors.values())
    print("OK: the backward matches finite differences" if ok else "MISMATCH")
    sys.exit(0 if ok else 1)
