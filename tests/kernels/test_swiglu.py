"""The gated activations' product kernels (kernels/swiglu.cu, llmcu/cuda/swiglu.py) against
the NumPy oracle (llmcu/cpu/swiglu.py), fp32 and bf16: swiglu_{forward,backward}_kernel1 and
geglu_{forward,backward}_kernel1, one thread per output element, over inp (..., 2H) = [gate
| up]. Inputs are random (gates N(0, 9)), outputs NaN-poisoned.

Tolerances (tests/helpers.py): expf/tanhf differ from NumPy's by a few ulp: fp32 within
F32 = 1e-5 of the scale; geglu's gate gradient amplifies that in the tail (gate ~ -5, as
tests/test_layers_torch.py's gelu) by |dout * up| up to ~10, hence 5e-5 absolute for
geglu's dinp; bf16 one rounding of those fp32 results (out_tol).
"""

import numpy as np
import pytest

from helpers import BF16, F32, FP32, assert_close, out_tol, rand_x, value
from llmcu.cpu import swiglu as cpu_swiglu


def _kernels():
    from llmcu.cuda import swiglu
    return swiglu


def _dinp_tol(kind, dtype, ref):
    tol = out_tol(dtype, ref)
    if kind == "geglu":  # the tail's amplification (module doc)
        tol["atol"] = max(tol["atol"], 5e-5)
    return tol


# (dtype, shape): H = 1023 (odd) over 7 rows; 2-D (3, 37); one bf16 case. Tolerances: module doc.
@pytest.mark.parametrize("kind", ["swiglu", "geglu"])
@pytest.mark.parametrize("dtype,shape", [pytest.param(FP32, (1, 7, 1023), id="fp32-H1023"),
                                         pytest.param(FP32, (3, 37), id="fp32-2d"),
                                         pytest.param(BF16, (2, 7, 48), id="bf16")])
def test_glu(dev, kind, dtype, shape):
    k = _kernels()
    rng = np.random.default_rng(sum(shape) + len(kind))
    lead, H = shape[:-1], shape[-1]
    (g, g_f), (u, u_f), (dout, dout_f) = (rand_x(rng, dtype, *lead, H, scale=3.0),
                                          rand_x(rng, dtype, *lead, H, scale=2.0), rand_x(rng, dtype, *shape))
    inp, inp_f = np.concatenate([g, u], axis=-1), np.concatenate([g_f, u_f], axis=-1)
    out = dev.poisoned(shape, dtype)
    getattr(k, f"{kind}_forward")(out, dev.put(inp))
    ref = np.empty(shape, np.float32)
    getattr(cpu_swiglu, f"{kind}_forward")(ref, inp_f)
    assert_close(f"{kind} out", value(dev.get(out)), ref, **out_tol(dtype, ref))
    dinp = dev.poisoned(inp.shape, dtype)
    getattr(k, f"{kind}_backward")(dinp, dev.put(dout), dev.put(inp))
    rdinp = np.empty(inp.shape, np.float32)
    getattr(cpu_swiglu, f"{kind}_backward")(rdinp, dout_f, inp_f)
    assert_close(f"{kind} dinp", value(dev.get(dinp)), rdinp, **_dinp_tol(kind, dtype, rdinp))


@pytest.mark.parametrize("kind", ["swiglu", "geglu"])
def test_glu_extreme_gates(dev, kind):
    """Gates far in both tails: no NaN or inf from expf overflow, the limits 0 and x.
    Tolerances as test_glu's fp32 ones (F32, geglu's dinp 5e-5 absolute)."""
    k = _kernels()
    g = np.array([-200.0, -90.0, -20.0, -5.5, 5.5, 20.0, 90.0, 200.0], np.float32)
    inp = np.concatenate([g, np.linspace(-2, 2, g.size).astype(np.float32) + 0.1])[None]
    dout = np.linspace(0.5, 1.5, g.size, dtype=np.float32)[None]
    out, dinp = dev.poisoned((1, g.size)), dev.poisoned(inp.shape)
    getattr(k, f"{kind}_forward")(out, dev.put(inp))
    getattr(k, f"{kind}_backward")(dinp, dev.put(dout), dev.put(inp))
    ref, rdinp = np.empty((1, g.size), np.float32), np.empty_like(inp)
    getattr(cpu_swiglu, f"{kind}_forward")(ref, inp)
    getattr(cpu_swiglu, f"{kind}_backward")(rdinp, dout, inp)
    assert_close(f"{kind} tails out", dev.get(out), ref, atol=F32, rtol=F32)
    assert_close(f"{kind} tails dinp", dev.get(dinp), rdinp, atol=5e-5, rtol=F32)


def test_glu_rejects_bad_arguments():
    k = _kernels()
    g = np.ones((2, 6), np.float32)
    with pytest.raises(ValueError, match=r"swiglu_forward: out must have shape \(2, 3\), got \(2, 6\)"):
        k.swiglu_forward(np.empty((2, 6), np.float32), g)
    with pytest.raises(ValueError, match=r"geglu_forward: inp must be \(\.\.\., 2\*H\)"):
        k.geglu_forward(np.empty((2, 2), np.float32), np.ones((2, 5), np.float32))
    with pytest.raises(TypeError, match=r"swiglu_backward: dout must have dtype float32, got int32"):
        k.swiglu_backward(np.empty_like(g), np.ones((2, 3), np.int32), g)
