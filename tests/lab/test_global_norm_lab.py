"""The global_norm lab (kernels/dev/global_norm.cu through kernels/dev/global_norm.py):
version 2, the sum of squares with one 16-byte packet per load (the n % packet tail by
block 0), then the product's finish kernel, against sqrt(sum g^2) in float64, fp32 and bf16.

Exact inputs (bf16 values widened), fp32 squares and fp32 partial sums, float64 over the
partials: relative 1e-5 (the old tests' bound). n = 1 (no whole packet: the tail alone),
1000, 70001 (a tail, and more packets than threads). The clip factor of
global_norm_device: clip_scale's arithmetic on the device.
"""

import math

import numpy as np
import pytest

from helpers import KERNEL_BACKENDS, Device
from llmcu.lab import load as load_lab
from llmcu.cpu.adamw import clip_scale
from llmcu.formats import bf16_bits_to_float32, float32_to_bf16_bits

DTYPES = [pytest.param(np.float32, id="fp32"), pytest.param(np.uint16, id="bf16")]




lab = load_lab("global_norm")
ops = lab.VERSIONS[2].ops


@pytest.fixture(params=KERNEL_BACKENDS)
def dev(request):
    return Device(request.param)


def grads(dtype, n, seed=8):
    g = np.random.default_rng(seed).standard_normal(n).astype(np.float32)
    if np.dtype(dtype) == np.uint16:
        bits = float32_to_bf16_bits(g)
        return bits, bf16_bits_to_float32(bits)
    return g, g


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 1000, 70001])
def test_version2_vs_float64(dev, dtype, n):
    g, gf = grads(dtype, n)
    got = ops["global_norm"](dev.put(g))
    want = math.sqrt(float(np.sum(gf.astype(np.float64) ** 2)))
    assert abs(got - want) <= 1e-5 * want, (got, want)


@pytest.mark.parametrize("grad_clip", [None, 1.0, 1e9])
def test_version2_device_clip_scale(dev, grad_clip):
    g, gf = grads(np.float32, 4099, seed=9)
    norm, scale = dev.poisoned((1,), np.float64), dev.poisoned((1,))
    ops["global_norm_device"](dev.put(g), norm, scale, grad_clip)
    want = math.sqrt(float(np.sum(gf.astype(np.float64) ** 2)))
    got = float(dev.get(norm)[0])
    assert abs(got - want) <= 1e-5 * want, (got, want)
    assert abs(float(dev.get(scale)[0]) - clip_scale(got, grad_clip)) <= 1e-6 * clip_scale(got, grad_clip)


def test_version2_refuses_misaligned_grads():
    buf = np.zeros(20, np.float32)
    start = (-buf.ctypes.data % 16) // 4 + 1
    with pytest.raises(ValueError, match=r"global_norm_device: the 16-byte-load version needs grads 16-byte aligned"):
        ops["global_norm"](buf[start:start + 8])
