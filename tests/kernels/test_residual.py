"""The residual add's product kernels (kernels/residual.cu, llmcu/cuda/residual.py) against
the NumPy oracle (llmcu/cpu/residual.py), fp32 and bf16.

residual_forward runs residual_forward_kernel2 (one 16-byte packet per thread) where the
element count is a multiple of the packet (4 fp32, 8 bf16) and every array is 16-byte
aligned, else kernel1 (one element per thread); the launched kernel is checked. out may
alias inp1 (the backward accumulates that way). The result is one fp32 add of two dtype
values rounded once to dtype, NumPy's arithmetic: compared bit for bit (no tolerance, in
both dtypes). The fused residual + layernorm is tests/kernels/test_layernorm.py's.
"""

import numpy as np
import pytest

from helpers import BF16, FP32, assert_same_bits, misaligned, rand_x, to_dtype
from llmcu.cpu import residual as cpu_residual


def _kernels():
    from llmcu.cuda import residual
    return residual


# (dtype, shape, how, kernel): 3*7*32 = 672 elements are whole packets in both dtypes;
# 3*7*33 = 693 are not (kernel1); "misaligned": inp1 starts 4 bytes past a 16-byte boundary,
# so whole packets still take kernel1. Tolerance: none, bit for bit (module doc).
CASES = [
    pytest.param(FP32, (3, 7, 32), "aligned", 2, id="fp32-wide"),
    pytest.param(FP32, (3, 7, 33), "aligned", 1, id="fp32-scalar-odd"),
    pytest.param(BF16, (3, 7, 32), "aligned", 2, id="bf16-wide"),
    pytest.param(BF16, (1, 8), "misaligned", 1, id="bf16-scalar-misaligned"),
]


@pytest.mark.parametrize("dtype,shape,how,kernel", CASES)
def test_residual_forward(dev, launch_args, dtype, shape, how, kernel):
    k = _kernels()
    rng = np.random.default_rng(len(shape) + shape[-1])
    (a, a_f), (b, b_f) = rand_x(rng, dtype, *shape), rand_x(rng, dtype, *shape)
    ref = np.empty(shape, np.float32)
    cpu_residual.residual_forward(ref, a_f, b_f)
    want = to_dtype(ref, dtype)
    put = (lambda x: misaligned(dev, x)) if how == "misaligned" else dev.put
    out = dev.poisoned(shape, dtype)
    k.residual_forward(out, put(a), dev.put(b))
    assert_same_bits("residual_forward out", dev.get(out), want)
    acc = put(a)
    k.residual_forward(acc, acc, dev.put(b))  # out aliases inp1, as the backward uses it
    assert_same_bits("residual_forward in place", dev.get(acc), want)
    assert [launch.kernel for launch in launch_args] == [f"residual_forward_kernel{kernel}"] * 2


def test_residual_backward(dev):
    """Both inputs receive dout, overwritten (copies, no kernel)."""
    k = _kernels()
    dout, _ = rand_x(np.random.default_rng(3), BF16, 2, 7, 24)
    d1, d2 = dev.poisoned(dout.shape, BF16), dev.poisoned(dout.shape, BF16)
    k.residual_backward(d1, d2, dev.put(dout))
    assert_same_bits("dinp1", dev.get(d1), dout)
    assert_same_bits("dinp2", dev.get(d2), dout)


def test_residual_rejects_bad_arguments():
    k = _kernels()
    a = np.ones((2, 8), np.float32)
    with pytest.raises(TypeError, match=r"residual_forward: inp2 must have dtype float32, got uint16"):
        k.residual_forward(np.empty_like(a), a, np.ones((2, 8), np.uint16))
    with pytest.raises(ValueError, match=r"residual_forward: out must have shape \(2, 8\), got \(8, 2\)"):
        k.residual_forward(np.empty((8, 2), np.float32), a, a.copy())
