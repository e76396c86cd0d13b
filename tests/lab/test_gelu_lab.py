"""The gelu lab (kernels/dev/gelu.cu through kernels/dev/gelu.py; the product has no GELU
kernel: the step's GELU is a cuBLASLt epilogue): version 1 (one element per thread) and 2
(one 16-byte packet per thread) against the NumPy oracle llmcu/cpu/gelu.py, fp32 and bf16.

fp32 math (tanhf within a few ulp of NumPy's tanh), one rounding per output: atol = 1e-5 of
the values' scale, rtol 1e-5 (fp32) or 2^-8 + 1e-5 (bf16). Shapes: an odd 3 x 1023 for
version 1, whole packets for version 2 (2 x 7 x 192, and one packet of 8).
"""


import numpy as np
import pytest

from helpers import Device, KERNEL_BACKENDS, assert_close, rand_x, value
from llmcu.lab import load as load_lab
from llmcu.cpu import gelu as cpu
from llmcu.formats import float32_to_bf16_bits

U, F32 = 2.0 ** -8, 1e-5
DTYPES = [pytest.param(np.float32, id="fp32"), pytest.param(np.uint16, id="bf16")]


lab = load_lab("gelu")


@pytest.fixture(params=KERNEL_BACKENDS)
def dev(request):
    return Device(request.param)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("version,shape", [(1, (2, 7, 192)), (1, (3, 1023)), (2, (2, 7, 192)), (2, (1, 8))])
def test_versions_vs_oracle(dev, dtype, version, shape):
    ops = lab.VERSIONS[version].ops
    rng = np.random.default_rng(16)
    (x, xf), (dout, doutf) = rand_x(rng, dtype, *shape, scale=2.0), rand_x(rng, dtype, *shape)
    out, dinp = dev.poisoned(shape, dtype), dev.poisoned(shape, dtype)
    ops["gelu_forward"](out, dev.put(x))
    ops["gelu_backward"](dinp, dev.put(dout), dev.put(x))
    rout, rdinp = np.empty(shape, np.float32), np.empty(shape, np.float32)
    cpu.gelu_forward(rout, xf)
    cpu.gelu_backward(rdinp, doutf, xf)
    rtol = U + F32 if np.dtype(dtype) == np.uint16 else F32
    assert_close(f"gelu_forward_kernel{version} out", value(dev.get(out)), rout,
                 atol=F32 * float(np.abs(rout).max()), rtol=rtol)
    assert_close(f"gelu_backward_kernel{version} dinp", value(dev.get(dinp)), rdinp,
                 atol=F32 * float(np.abs(rdinp).max()), rtol=rtol)


def test_version2_refuses_partial_packets_and_misaligned_arrays():
    fwd = lab.VERSIONS[2].ops["gelu_forward"]
    x = float32_to_bf16_bits(np.ones(12, np.float32))  # 12 bf16: not whole 8-element packets
    with pytest.raises(ValueError, match=r"gelu_forward: the 16-byte-load version needs a multiple of 8 elements "
                                         r"\(uint16\), got 12"):
        fwd(np.empty_like(x), x)
    buf = np.zeros(20, np.float32)
    start = (-buf.ctypes.data % 16) // 4 + 1
    with pytest.raises(ValueError, match=r"gelu_backward: the 16-byte-load version needs inp 16-byte aligned"):
        lab.VERSIONS[2].ops["gelu_backward"](np.zeros(8, np.float32), np.zeros(8, np.float32), buf[start:start + 8])
