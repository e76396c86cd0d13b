"""version="auto" in the memory-bound wrappers: the 16-byte-load kernel (version 2)
exactly where it applies (element count a multiple of the 16-byte packet, every
array 16-byte aligned), version 1 otherwise, and the same result either way.
The GPT-2 kernel model runs these wrappers with "auto".

Which kernel ran is read from the backend's launches (a spy on Backend.launch);
results are checked against the NumPy oracle with NaN-poisoned outputs.
"""

import numpy as np
import pytest

from helpers import assert_close
from llmcu.cpu import gelu as cpu_gelu
from llmcu.cuda import gelu, residual


def _misaligned(a):
    """A view of a 1-D float32 array starting 4 bytes past a 16-byte boundary."""
    return a[1:]


@pytest.mark.parametrize("n,offset,want", [(4096, False, 2), (4095, False, 1), (4096, True, 1)])
def test_gelu_auto(launches, n, offset, want):
    rng = np.random.default_rng(n)
    base = rng.standard_normal(n + 1).astype(np.float32)
    inp = _misaligned(base) if offset else base[:n].copy()
    out = np.full_like(inp, np.nan)
    gelu.gelu_forward(out, inp, version="auto")
    ref = np.empty_like(inp)
    cpu_gelu.gelu_forward(ref, inp)
    assert_close("gelu auto", out, ref, 1e-6, 1e-6)  # fp32 tanh vs NumPy's: a few ulps
    dinp = np.full_like(inp, np.nan)
    dout = rng.standard_normal(inp.shape).astype(np.float32)
    gelu.gelu_backward(dinp, dout, inp, version="auto")
    rdinp = np.empty_like(inp)
    cpu_gelu.gelu_backward(rdinp, dout, inp)
    assert_close("gelu auto backward", dinp, rdinp, 1e-5, 1e-5)
    assert launches == [f"gelu_forward_kernel{want}", f"gelu_backward_kernel{want}"]


@pytest.mark.parametrize("n,offset,want", [(4096, False, 2), (4094, False, 1), (4096, True, 1)])
def test_residual_auto(launches, n, offset, want):
    rng = np.random.default_rng(n)
    a = rng.standard_normal(n + 1).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    inp1 = _misaligned(a) if offset else a[:n].copy()
    out = np.full(n, np.nan, np.float32)
    residual.residual_forward(out, inp1, b, version="auto")
    assert np.array_equal(out, inp1 + b)  # one fp32 add: exact
    assert launches == [f"residual_forward_kernel{want}"]


def test_auto_is_the_only_new_word():
    with pytest.raises(ValueError, match=r"gelu_forward: version must be one of \(1, 2\) or 'auto', got 3"):
        gelu.gelu_forward(np.zeros(8, np.float32), np.zeros(8, np.float32), version=3)
    with pytest.raises(ValueError, match=r"residual_forward: version must be one of \(1, 2\) or 'auto', got 'x'"):
        residual.residual_forward(*(np.zeros(8, np.float32),) * 3, version="x")
