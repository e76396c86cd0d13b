"""AdamW and the gradient norm, the product kernels (kernels/adamw.cu, kernels/global_norm.cu,
llmcu/cuda/adamw.py), against the NumPy oracle (llmcu/cpu/adamw.py), fp32 and bf16:

- adamw_update: adamw_kernel1 for fp32 parameters without master weights (the oracle's
  arithmetic), adamw_kernel2 otherwise (fp32 master weights and/or bf16 parameters,
  stochastic rounding); the launched kernel is checked;
- adamw_multi_tensor (adamw_kernel4, one launch over every tensor; a 16-byte path where
  every tensor starts on a packet): bit for bit the per-tensor adamw_update loop;
- global_norm_device / global_norm (global_norm_squared_kernel1 + global_norm_finish_kernel1):
  the norm and the clip scale on the device.

Tolerances: the update is elementwise fp32 arithmetic with the oracle's formula; CUDA's
sqrtf and division are correctly rounded, so only the order of a few operations (and an
FMA contraction on the GPU) differs: params within 1e-6 absolute and relative (values
O(1), steps ~1e-3), moments within 1e-7 absolute, 1e-6 relative. bf16 parameters are
checked to be one of the two bf16 neighbours of their fp32 value (stochastic rounding),
with both neighbours occurring, and unbiased in the mean (a statistical bound, its
derivation in the test). Where two paths share their arithmetic the comparison is bit for
bit.
"""

import math

import numpy as np
import pytest

from helpers import (BF16, BF16_NAN, FP32, assert_close, assert_same_bits, rand, rand_x, to_dtype,
                     value)
from llmcu.cpu import adamw as cpu_adamw

ADAM = dict(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8)
# (params/moments tolerances): module doc
P_TOL, M_TOL = dict(atol=1e-6, rtol=1e-6), dict(atol=1e-7, rtol=1e-6)


def _kernels():
    from llmcu.cuda import adamw
    return adamw


def _bf16_neighbours(x):
    """The bf16 bit patterns just below and above |x| (equal when x is a bf16 value)."""
    bits = np.asarray(x, np.float32).view(np.uint32)
    low = (bits >> 16).astype(np.uint16)
    exact = (bits & 0xFFFF) == 0
    return low, np.where(exact, low, low + 1).astype(np.uint16)


# ----------------------------------------------------------------------------- adamw_update

def test_adamw_update_fp32(dev, launch_args):
    """adamw_kernel1: 3 steps with weight decay and a clip scale against the oracle (module
    doc's tolerances); n = 5003 leaves the last block partly idle."""
    k = _kernels()
    rng = np.random.default_rng(7)
    n = 5003
    p, g, m, v = rand(rng, n), rand(rng, n), rand(rng, n, scale=0.1), np.abs(rand(rng, n, scale=0.1))
    dp, dg, dm, dv = dev.put(p), dev.put(g), dev.put(m), dev.put(v)
    for step in (1, 2, 3):
        k.adamw_update(dp, dg, dm, dv, step, weight_decay=0.1, grad_scale=0.37, **ADAM)
        cpu_adamw.adamw_update(p, g, m, v, step, weight_decay=0.1, grad_scale=0.37, **ADAM)
    assert [launch.kernel for launch in launch_args] == ["adamw_kernel1"] * 3
    assert_close("adamw params", dev.get(dp), p, **P_TOL)
    assert_close("adamw m", dev.get(dm), m, **M_TOL)
    assert_close("adamw v", dev.get(dv), v, **M_TOL)


# dtype of the parameters, with fp32 master weights: adamw_kernel2. Tolerances: module doc.
@pytest.mark.parametrize("dtype", [pytest.param(FP32, id="fp32-master"), pytest.param(BF16, id="bf16-master")])
def test_adamw_update_master_weights(dev, launch_args, dtype):
    """The fp32 master copy follows the oracle; the dtype copy is one of the two dtype
    neighbours of the master value (fp32: the master value itself). In fp32 kernel2's
    arithmetic is kernel1's bit for bit (adamw_multi_tensor relies on it)."""
    k = _kernels()
    rng = np.random.default_rng(20)
    n = 5003
    master = rand(rng, n)
    g, g_f = rand_x(rng, dtype, n)
    m, v = rand(rng, n, scale=0.1), np.abs(rand(rng, n, scale=0.1))
    dp, dmaster, dg, dm, dv = (dev.put(a) for a in (to_dtype(master, dtype), master, g, m, v))
    ref = [dev.put(a) for a in (master, g, m, v)]  # fp32: the same update by adamw_kernel1
    for step in (1, 2, 3):
        k.adamw_update(dp, dg, dm, dv, step, weight_decay=0.1, grad_scale=0.5, master_params=dmaster,
                       seed=1234 + step, **ADAM)
        cpu_adamw.adamw_update(master, g_f, m, v, step, weight_decay=0.1, grad_scale=0.5, **ADAM)
        if dtype == FP32:
            k.adamw_update(*ref, step, weight_decay=0.1, grad_scale=0.5, **ADAM)
    assert [launch.kernel for launch in launch_args if launch.kernel != "adamw_kernel1"] == ["adamw_kernel2"] * 3
    assert_close("adamw master", dev.get(dmaster), master, **P_TOL)
    assert_close("adamw m", dev.get(dm), m, **M_TOL)
    assert_close("adamw v", dev.get(dv), v, **M_TOL)
    got_master, got = dev.get(dmaster), dev.get(dp)
    if dtype == FP32:
        assert_same_bits("fp32 params == master", got, got_master)
        for name, a, b in zip(("master", "m", "v"), (dmaster, dm, dv), (ref[0], ref[2], ref[3])):
            assert_same_bits(f"adamw_kernel2 {name} == adamw_kernel1's", dev.get(a), dev.get(b))
        return
    low, high = _bf16_neighbours(got_master)
    off = (got != low) & (got != high)
    assert not off.any(), (f"{int(off.sum())} bf16 params are not a neighbour of their master value, "
                           f"e.g. index {int(np.argmax(off))}: {got[off][:3]} not in {low[off][:3]}/{high[off][:3]}")
    inexact = low != high  # both neighbours occur: rounding is stochastic, not always down or up
    assert (got[inexact] == low[inexact]).any() and (got[inexact] == high[inexact]).any()


def test_adamw_stochastic_rounding_is_unbiased(dev):
    """Over S seeds, each element rounds up with frequency close to its fraction
    p = (x - low) / (high - low); a rounding to nearest would be off by up to 1/2.

    Bound: per element, the up-frequency over S independent seeds deviates from p by more
    than t with probability <= 2 exp(-2 S t^2) (Hoeffding); with S = 256 and n = 2048
    elements, t = 0.22 gives a union bound of 2 n exp(-2 S t^2) < 1e-6 for a correct kernel
    to fail. The mean signed error over all n*S roundings, in ulps, has standard deviation
    <= 1 / (2 sqrt(n S)); it must be within 5 of those (false failure < 1e-6)."""
    k = _kernels()
    rng = np.random.default_rng(21)
    n, S = 2048, 256
    master0 = rand(rng, n)
    g = to_dtype(rand(rng, n), BF16)
    m0, v0 = rand(rng, n, scale=0.1), np.abs(rand(rng, n, scale=0.1))
    ups = np.zeros(n)
    x = None
    for seed in range(S):
        dp, dmaster, dm, dv = (dev.put(a) for a in (to_dtype(master0, BF16), master0, m0, v0))
        k.adamw_update(dp, dev.put(g), dm, dv, 1, master_params=dmaster, seed=seed * 7919 + 1, **ADAM)
        got = dev.get(dp)
        if x is None:
            x = dev.get(dmaster)
            low, high = _bf16_neighbours(x)
        ups += got == high
    inexact = low != high
    lo_f, hi_f = value(low).astype(np.float64), value(high).astype(np.float64)
    p = np.where(inexact, (np.abs(x) - np.abs(lo_f)) / np.where(inexact, np.abs(hi_f) - np.abs(lo_f), 1), 0)
    freq = ups / S
    dev_max = float(np.abs(freq - p)[inexact].max())
    assert dev_max <= 0.22, f"an element rounds up with frequency {dev_max:.3f} away from its fraction"
    bias = float(np.mean((freq - p)[inexact]))
    sigma = 1.0 / (2.0 * math.sqrt(int(inexact.sum()) * S))
    assert abs(bias) <= 5 * sigma, f"mean rounding error {bias:.2e} ulp, 5 sigma = {5 * sigma:.2e}"


def test_adamw_bf16_without_master_weights(dev, launch_args):
    """bf16 params updated in place (adamw_kernel2): each result within one bf16 ulp of the
    fp32 oracle's update of the same bf16 values (a neighbour of it), and updates ten times
    smaller than an ulp still move the parameters on average by the requested amount
    (rounding to nearest would drop them all)."""
    k = _kernels()
    rng = np.random.default_rng(22)
    n = 20000
    p0, p0_f = rand_x(rng, BF16, n, scale=0.25, shift=1.0)  # values in [~0.5, ~2): ulp 2^-8 or 2^-7
    g, g_f = rand_x(rng, BF16, n)
    m, v = np.zeros(n, np.float32), np.zeros(n, np.float32)
    lr = 2.0 ** -7 / 10  # step 1 of Adam moves each param by ~lr: 1/10 to 1/5 of its ulp
    dp = dev.put(p0)
    k.adamw_update(dp, dev.put(g), dev.put(m), dev.put(v), 1, lr, 0.9, 0.95, 1e-8, seed=99)
    assert [launch.kernel for launch in launch_args] == ["adamw_kernel2"]
    ref = p0_f.copy()
    cpu_adamw.adamw_update(ref, g_f, m, v, 1, lr, 0.9, 0.95, 1e-8)
    got = value(dev.get(dp)).astype(np.float64)
    low, high = _bf16_neighbours(ref)
    ulp = np.abs(value(high).astype(np.float64) - value(low))
    ulp = np.where(ulp == 0, 2.0 ** (np.floor(np.log2(np.abs(ref))) - 7), ulp)
    # within one ulp (plus the oracle's fp32 difference from the kernel, ~1e-7 relative)
    assert np.all(np.abs(got - ref) <= ulp * (1 + 1e-3)), "a bf16 param is not a neighbour of its update"
    moved = got - p0_f
    assert np.count_nonzero(moved) > 0.02 * n, "sub-ulp updates were all rounded away"
    # mean applied update == mean requested update: each rounding has std <= ulp/2
    requested = ref.astype(np.float64) - p0_f
    sigma = float(np.sqrt(np.sum((ulp / 2) ** 2))) / n
    assert abs(float(np.mean(moved - requested))) <= 5 * sigma


# ----------------------------------------------------------------------------- adamw_multi_tensor

LR, SEED = 1e-3, 0xDEADBEEF
BETAS = dict(beta1=0.9, beta2=0.95, eps=1e-8)
# Odd tensor sizes, an empty one, and sizes either side of one and two chunks of the default
# chunk (4096) and of the small chunk (100); ~26k elements in all.
SIZES = [1, 7, 33, 1000, 4097, 0, 99, 100, 101, 4095, 4096, 4098, 8193, 250, 3]
DECAYS = [0.05 if t == 4 else 0.1 if t % 3 else 0.0 for t in range(len(SIZES))]
# every tensor starting on an 8-element packet: the 16-byte path in fp32 and bf16
PACKED_SIZES = [8, 4096, 768, 0, 4104, 2304, 16]
PACKED_DECAYS = [0.1, 0.0, 0.1, 0.0, 0.05, 0.1, 0.0]
# (step, grad_clip): clipping on, off, and a clip above the norm (scale 1); a step that is
# not the previous one plus one (bias corrections, seeds).
STEPS = [(1, 1.0), (2, None), (10, 1e6)]
GUARD = 8  # poisoned elements before and after each flat array: must stay untouched (8: the
#            arrays inside stay 16-byte aligned, so whole packets take the 16-byte path)


def _slices(sizes):
    out, offset = [], 0
    for size in sizes:
        out.append(slice(offset, offset + size))
        offset += size
    return out, offset


def _guarded(dev, a):
    """a on the device between GUARD poisoned elements: (whole buffer, view of a)."""
    poison = np.full(GUARD, BF16_NAN if a.dtype == BF16 else np.nan, a.dtype)
    whole = dev.put(np.concatenate([poison, a, poison]))
    return whole, whole[GUARD:GUARD + a.size]


# (dtype, master weights, sizes, decays, chunk, wide): each arithmetic (fp32 without master
# weights: kernel1's; otherwise kernel2's) on both paths; chunks of 100 / 104 elements split
# tensors into many chunks. Tolerance: none, bit for bit (the same per-element operations
# in the same order and the same random bits as the loop).
MULTI_CASES = [
    pytest.param(FP32, False, SIZES, DECAYS, 100, False, id="fp32-scalar-chunk100"),
    pytest.param(FP32, False, PACKED_SIZES, PACKED_DECAYS, None, True, id="fp32-wide"),
    pytest.param(FP32, True, SIZES, DECAYS, None, False, id="fp32-master-scalar"),
    pytest.param(BF16, True, PACKED_SIZES, PACKED_DECAYS, 104, True, id="bf16-master-wide-chunk104"),
    pytest.param(BF16, False, SIZES, DECAYS, None, False, id="bf16-scalar"),
]


@pytest.mark.parametrize("dtype,with_master,sizes,decays,chunk,wide", MULTI_CASES)
def test_adamw_multi_tensor_equals_per_tensor_loop(dev, launch_args, dtype, with_master, sizes, decays,
                                                   chunk, wide):
    """The one-launch update (global_norm_device writing the clip scale into hyper[3])
    against the per-tensor adamw_update loop with clip_scale(global_norm) and seeds
    rounding_seed(seed, step, t), the models' update without CUDA graphs."""
    from llmcu.cuda.mixed_precision import rounding_seed
    k = _kernels()
    rng = np.random.default_rng(31)
    slices, n = _slices(sizes)
    master0 = rand(rng, n)
    params0 = to_dtype(master0, dtype)
    m0, v0 = rand(rng, n, scale=0.1), np.abs(rand(rng, n, scale=0.1))
    table = k.adamw_tensor_table(dev.xp, slices, decays, **({} if chunk is None else dict(chunk=chunk)))
    whole = {name: _guarded(dev, a) for name, a in (("params", params0), ("master", master0), ("m", m0), ("v", v0))}
    p, master, m, v = (whole[name][1] for name in ("params", "master", "m", "v"))
    norm = dev.poisoned((1,), np.float64)
    rp, rmaster, rm, rv = (dev.put(a) for a in (params0, master0, m0, v0))
    for step, clip in STEPS:
        g = to_dtype(rand(rng, n), dtype)
        hyper = dev.put(k.adamw_hyper(LR, step, BETAS["beta1"], BETAS["beta2"]))
        step_seed = dev.put(k.adamw_step_seed(SEED, step))
        dg = dev.put(g)
        k.global_norm_device(dg, norm, hyper[3:4], grad_clip=clip)
        k.adamw_multi_tensor(p, dg, m, v, table, hyper, step_seed, master_params=master if with_master else None,
                             **BETAS)
        scale = k.clip_scale(k.global_norm(dg), clip)
        for t, sl in enumerate(slices):
            if sl.stop > sl.start:
                k.adamw_update(rp[sl], dg[sl], rm[sl], rv[sl], step, LR, weight_decay=decays[t], grad_scale=scale,
                               master_params=rmaster[sl] if with_master else None,
                               seed=rounding_seed(SEED, step, t), **BETAS)
        assert dev.get(hyper)[3] == np.float32(scale), (step, dev.get(hyper), scale)
        for name, got, want in (("params", p, rp), ("master", master, rmaster), ("m", m, rm), ("v", v, rv)):
            assert_same_bits(f"adamw_kernel4 {name} at step {step}", dev.get(got), dev.get(want))
    for name, (buf, _) in whole.items():
        h = dev.get(buf)
        guards = np.concatenate([h[:GUARD], h[-GUARD:]])
        assert (np.all(guards == BF16_NAN) if h.dtype == BF16 else np.all(np.isnan(guards))), \
            f"{name}: an element outside the array was written"
    moved = dev.get(m) != m0  # every non-empty tensor was updated (the moments always move)
    for sl in slices:
        assert moved[sl].all(), f"the moments of tensor {sl} were not updated"
    # and the parameters moved (bf16: 3 updates of ~1e-3 against ulps of 2^-7..2^-9 move ~40%)
    assert np.count_nonzero(dev.get(p) != params0) > n // 5
    if not with_master:  # the master copy is neither read nor written
        assert_same_bits("master untouched", dev.get(master), master0)
    flags = {int(launch.args[-1]) for launch in launch_args if launch.kernel == "adamw_kernel4"}
    assert flags == {int(wide)}, f"adamw_kernel4 ran with wide={flags}, expected {int(wide)}"


def test_adamw_tensor_table(dev):
    """Chunks never straddle tensors, cover every element once, in order, each at most
    `chunk` long; tensor starts and decays as given; adamw_hyper rounds as adamw_update."""
    k = _kernels()
    slices, n = _slices(SIZES)
    table = k.adamw_tensor_table(dev.xp, slices, DECAYS, chunk=100)
    assert dev.get(table.tensor_start).tolist() == [sl.start for sl in slices] + [n]
    np.testing.assert_array_equal(dev.get(table.tensor_decay), np.float32(DECAYS))
    ids, starts = dev.get(table.chunk_tensor), dev.get(table.chunk_start)
    assert table.n == n and table.n_tensors == len(SIZES) and table.chunk == 100
    assert table.n_chunks == ids.size == starts.size == sum(math.ceil(s / 100) for s in SIZES)
    covered = []
    for t, start in zip(ids.tolist(), starts.tolist()):
        end = min(start + 100, slices[t].stop)
        assert slices[t].start <= start < end, (t, start)
        covered.extend(range(start, end))
    assert covered == list(range(n))
    h = k.adamw_hyper(3e-4, 7, 0.9, 0.95)
    assert h.dtype == np.float32 and h.tolist() == [np.float32(3e-4), np.float32(1.0 - 0.9 ** 7),
                                                    np.float32(1.0 - 0.95 ** 7), 1.0]


# ----------------------------------------------------------------------------- global norm

# (dtype, n): 70001 elements over 69 blocks; a single bf16 element. Tolerance 1e-5 relative:
# exact inputs (bf16 widens exactly), fp32 squares summed per thread and in a 1024-thread
# tree (10 levels), so the norm is within ~6 * 2^-24 ~ 4e-7 of the float64 one; a missing or
# doubled element (>= 1/n relative, here >= 1.4e-5) fails.
@pytest.mark.parametrize("dtype,n", [pytest.param(FP32, 70001, id="fp32"), pytest.param(BF16, 1, id="bf16-n1")])
def test_global_norm_device(dev, dtype, n):
    k = _kernels()
    g, g_f = rand_x(np.random.default_rng(33), dtype, n)
    want = math.sqrt(float(np.sum(g_f.astype(np.float64) ** 2)))
    dg = dev.put(g)
    norm, scale = dev.poisoned((1,), np.float64), dev.poisoned((1,), np.float32)
    k.global_norm_device(dg, norm, scale)
    got = float(dev.get(norm)[0])
    assert_close("norm", got, want, atol=0.0, rtol=1e-5)
    assert dev.get(scale)[0] == np.float32(1.0)
    assert got == k.global_norm(dg), "global_norm must return global_norm_device's norm"
    # clip_scale's arithmetic exactly, for every kind of clip, written into a view (slot 3
    # of adamw_multi_tensor's hyper) without touching its neighbours
    for clip in (None, 0.0, -1.0, 0.5 * got, np.nextafter(got, 0.0), got, 2.0 * got):
        hyper = dev.put(np.array([1.0, 2.0, 3.0, np.nan], np.float32))
        k.global_norm_device(dg, norm, hyper[3:4], grad_clip=clip)
        h = dev.get(hyper)
        assert float(dev.get(norm)[0]) == got
        assert h[3] == np.float32(k.clip_scale(got, clip)), (clip, h[3], k.clip_scale(got, clip))
        assert h[:3].tolist() == [1.0, 2.0, 3.0]
    k.global_norm_device(dg, norm, scale, grad_clip=0.5 * got)  # a clip below the norm does scale
    assert dev.get(scale)[0] < 0.51


# ----------------------------------------------------------------------------- errors

def test_adamw_rejects_bad_arguments():
    k = _kernels()
    p, z = to_dtype(np.ones(4, np.float32), BF16), np.zeros(4, np.float32)
    with pytest.raises(TypeError, match=r"adamw_update: grads must have dtype uint16, got float32"):
        k.adamw_update(p, z, z.copy(), z.copy(), 1, 1e-3)
    with pytest.raises(ValueError, match=r"adamw_update: seed must be a 32-bit unsigned integer, got -1"):
        k.adamw_update(p, p.copy(), z.copy(), z.copy(), 1, 1e-3, seed=-1)
    slices, n = _slices([3, 5])
    table = k.adamw_tensor_table(np, slices, [0.1, 0.0])
    f = np.zeros(n, np.float32)
    hyper, seed = k.adamw_hyper(1e-3, 1), k.adamw_step_seed(1, 1)
    with pytest.raises(TypeError, match=r"adamw_multi_tensor: step_seed must have dtype uint32, got int32"):
        k.adamw_multi_tensor(f, f.copy(), f.copy(), f.copy(), table, hyper, seed.astype(np.int32))
    with pytest.raises(ValueError, match=r"adamw_multi_tensor: params must have shape \(8,\) \(the table's 8 "
                                         r"elements\), got \(9,\)"):
        k.adamw_multi_tensor(np.zeros(9, np.float32), f, f.copy(), f.copy(), table, hyper, seed)
    with pytest.raises(ValueError, match=r"adamw_tensor_table: slices must be contiguous from 0; slices\[1\] "
                                         r"must start at 3"):
        k.adamw_tensor_table(np, [slice(0, 3), slice(4, 6)], [0.0, 0.0])
    with pytest.raises(TypeError, match=r"global_norm_device: norm must have dtype float64, got float32"):
        k.global_norm_device(f, np.zeros(1, np.float32), np.zeros(1, np.float32))
    with pytest.raises(ValueError, match=r"global_norm_device: grad_clip must be a number or None, got nan"):
        k.global_norm_device(f, np.zeros(1), np.zeros(1, np.float32), grad_clip=float("nan"))
