"""The adamw lab (kernels/dev/adamw.cu through kernels/dev/adamw.py): version 3, the
product's adamw_kernel2 with 16-byte loads and stores.

- Bit for bit the product's kernel2 (what llmcu/cuda/adamw.py runs with master weights or
  bf16 params): kernel2's arithmetic and random bits element for element, params, master
  weights and moments, fp32 and bf16, with and without master weights where the product
  runs kernel2.
- fp32 without master weights (the product runs kernel1 there) against the NumPy oracle
  llmcu/cpu/adamw.py: atol 1e-6 / rtol 1e-6 for params, atol 1e-7 / rtol 1e-6 for the
  moments (the old tests' bound: the same formulas in fp32, a few ulp of sqrtf and division).
- The refusals: a size that is not whole 16-byte packets, a misaligned array.
"""


import numpy as np
import pytest

from helpers import KERNEL_BACKENDS, Device, assert_close
from llmcu.lab import load as load_lab
from llmcu.cpu import adamw as cpu
from llmcu.formats import float32_to_bf16_bits

DTYPES = [pytest.param(np.float32, id="fp32"), pytest.param(np.uint16, id="bf16")]
ADAM = dict(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8)




lab = load_lab("adamw")
update3 = lab.VERSIONS[3].ops["adamw_update"]


@pytest.fixture(params=KERNEL_BACKENDS)
def dev(request):
    return Device(request.param)


def state(dtype, n, seed=24):
    rng = np.random.default_rng(seed)
    master = rng.standard_normal(n).astype(np.float32)
    g = rng.standard_normal(n).astype(np.float32)
    m = (rng.standard_normal(n) * 0.1).astype(np.float32)
    v = np.abs(rng.standard_normal(n) * 0.1).astype(np.float32)
    if np.dtype(dtype) == np.uint16:
        return float32_to_bf16_bits(master), master, float32_to_bf16_bits(g), m, v
    return master.copy(), master, g, m, v


@pytest.mark.parametrize("dtype,with_master", [(np.float32, True), (np.uint16, True), (np.uint16, False)],
                         ids=["fp32-master", "bf16-master", "bf16"])
def test_version3_equals_the_products_kernel2(dev, dtype, with_master):
    from llmcu.cuda.adamw import adamw_update
    n = 8 * 517  # whole packets for fp32 (4) and bf16 (8), not a multiple of the block
    results = []
    for fn in (update3, adamw_update):
        dp, dmaster, dg, dm, dv = (dev.put(a) for a in state(dtype, n))
        for step in (1, 2):
            fn(dp, dg, dm, dv, step, weight_decay=0.1, grad_scale=0.5, master_params=dmaster if with_master else None,
               seed=77 + step, **ADAM)
        results.append([dev.get(a) for a in (dp, dmaster, dm, dv)])
    for name, a3, a2 in zip(("params", "master", "m", "v"), *results, strict=True):
        np.testing.assert_array_equal(a3, a2, err_msg=f"adamw_kernel3 {name} != adamw_kernel2")
    assert not np.array_equal(results[0][0], state(dtype, n)[0]), "the update did nothing"


@pytest.mark.parametrize("weight_decay,grad_scale", [(0.0, 1.0), (0.1, 0.37)])
def test_version3_fp32_vs_oracle(dev, weight_decay, grad_scale):
    n = 5004
    p, _, g, m, v = state(np.float32, n, seed=7)
    dp, dg, dm, dv = (dev.put(a) for a in (p, g, m, v))
    for step in (1, 2, 3):
        update3(dp, dg, dm, dv, step, weight_decay=weight_decay, grad_scale=grad_scale, **ADAM)
        cpu.adamw_update(p, g, m, v, step, weight_decay=weight_decay, grad_scale=grad_scale, **ADAM)
    assert_close("adamw_kernel3 params", dev.get(dp), p, atol=1e-6, rtol=1e-6)
    assert_close("adamw_kernel3 m", dev.get(dm), m, atol=1e-7, rtol=1e-6)
    assert_close("adamw_kernel3 v", dev.get(dv), v, atol=1e-7, rtol=1e-6)


def test_version3_refuses_partial_packets_and_misaligned_arrays():
    p = float32_to_bf16_bits(np.ones(12, np.float32))  # 12 bf16: not whole 8-element packets
    z = np.zeros(12, np.float32)
    with pytest.raises(ValueError, match=r"adamw_update: the 16-byte-load version needs a multiple of 8 elements "
                                         r"\(uint16\), got 12"):
        update3(p, p.copy(), z.copy(), z.copy(), 1, 1e-3)
    buf = np.zeros(20, np.float32)
    start = (-buf.ctypes.data % 16) // 4 + 1
    off = buf[start:start + 8]  # 4 bytes past a 16-byte boundary
    with pytest.raises(ValueError, match=r"adamw_update: the 16-byte-load version needs m 16-byte aligned"):
        update3(np.zeros(8, np.float32), np.zeros(8, np.float32), off, np.zeros(8, np.float32), 1, 1e-3)
    with pytest.raises(ValueError, match=r"adamw_update: step is 1-based, got 0"):
        z = np.zeros(8, np.float32)
        update3(z, z.copy(), z.copy(), z.copy(), 0, 1e-3)
