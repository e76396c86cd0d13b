"""One-launch AdamW over every parameter tensor (adamw_kernel4) and the gradient
norm finished on the device (global_norm_finish_kernel1), the pieces a CUDA graph
of the training step needs (llmcu/cuda/adamw.py).

The reference for adamw_multi_tensor is the per-tensor loop the models run today
on the same backend: adamw_update on each slice (llmcu/cpu/flat_adamw.
update_parameters for fp32: adamw_kernel1; mixed_precision.MixedPrecisionAdamW.
update for bf16 or master weights: adamw_kernel2 with seed rounding_seed(seed,
step, t)), with the clip scale clip_scale(global_norm(grads), clip). Both run the
same per-element arithmetic and the same random bits, so params, master
weights and moments must be equal bit for bit (np.array_equal), no tolerance.
"""

import math

import numpy as np
import pytest

from helpers import BF16_NAN, KERNEL_BACKENDS, Device, assert_close
from llmcu.cuda import adamw as k
from llmcu.cuda.mixed_precision import rounding_seed
from llmcu.formats import bf16_bits_to_float32 as to_f32
from llmcu.formats import float32_to_bf16_bits as to_bits


@pytest.fixture(params=KERNEL_BACKENDS)
def dev(request):
    return Device(request.param)


def rand(rng, n, scale=1.0):
    return (rng.standard_normal(n) * scale).astype(np.float32)


# Odd tensor sizes, an empty one, and sizes either side of one and two chunks of
# the default chunk (4096) and of the small chunk (100) the tests also use;
# ~26k elements in all, so the emulator runs each variant in well under a second.
SIZES = [1, 7, 33, 1000, 4097, 0, 99, 100, 101, 4095, 4096, 4098, 8193, 250, 3]
DECAYS = [0.1 if t % 3 else 0.0 for t in range(len(SIZES))]
DECAYS[4] = 0.05  # two different non-zero decays
ADAM = dict(beta1=0.9, beta2=0.95, eps=1e-8)
LR = 1e-3
SEED = 0xDEADBEEF
# (step, grad_clip): clipping on, off, and a clip above the norm (scale 1); a
# step number that is not the previous one plus one (bias corrections, seeds).
STEPS = [(1, 1.0), (2, None), (10, 1e6)]
GUARD = 8  # poisoned elements before and after each flat array: must stay untouched
# (8: the arrays inside stay 16-byte aligned, so sizes in whole packets take the 16-byte path)
PACKED_SIZES = [8, 4096, 768, 0, 4104, 2304, 16]  # every tensor start on an 8-element packet
PACKED_DECAYS = [0.1, 0.0, 0.1, 0.0, 0.05, 0.1, 0.0]


def _slices(sizes):
    out, offset = [], 0
    for size in sizes:
        out.append(slice(offset, offset + size))
        offset += size
    return out, offset


VARIANTS = [  # (floatX dtype, master weights)
    pytest.param(np.float32, False, id="fp32"),
    pytest.param(np.float32, True, id="fp32-master"),
    pytest.param(np.uint16, True, id="bf16-master"),
    pytest.param(np.uint16, False, id="bf16"),
]


def _guarded(dev, a):
    """a on the device between GUARD poisoned elements: (whole buffer, view of a)."""
    poison = np.full(GUARD, BF16_NAN if a.dtype == np.uint16 else np.nan, a.dtype)
    whole = dev.put(np.concatenate([poison, a, poison]))
    return whole, whole[GUARD:GUARD + a.size]


def _assert_guards(dev, whole, name):
    h = dev.get(whole)
    for side in (h[:GUARD], h[-GUARD:]):
        if h.dtype == np.uint16:
            assert np.all(side == BF16_NAN), f"{name}: an element outside the array was written"
        else:
            assert np.all(np.isnan(side)), f"{name}: an element outside the array was written"


@pytest.mark.parametrize("sizes,decays,chunk,wide", [
    (SIZES, DECAYS, k.ADAMW_CHUNK, False), (SIZES, DECAYS, 100, False),
    (PACKED_SIZES, PACKED_DECAYS, k.ADAMW_CHUNK, True), (PACKED_SIZES, PACKED_DECAYS, 104, True)],
    ids=["odd", "odd-chunk100", "packets", "packets-chunk104"])
@pytest.mark.parametrize("dtype,with_master", VARIANTS)
def test_multi_tensor_equals_per_tensor_loop(dev, dtype, with_master, sizes, decays, chunk, wide,
                                             monkeypatch):
    """The scalar path for odd sizes, the 16-byte path where every tensor starts on a
    packet (wide: checked from the launch's last argument)."""
    from llmcu.cuda import runtime
    launched = []
    original = runtime.Backend.launch

    def spy(self, stem, kernel, grid, block, args, **kw):
        launched.append((kernel, args[-1]))
        return original(self, stem, kernel, grid, block, args, **kw)
    # on the class: patching the instance would leave an instance attribute behind after the
    # test, shadowing other tests' class-level spies
    monkeypatch.setattr(runtime.Backend, "launch", spy)
    DECAYS = decays  # noqa: N806  (the reference loop below reads DECAYS)
    rng = np.random.default_rng(31)
    slices, n = _slices(sizes)
    master0 = rand(rng, n)
    params0 = to_bits(master0) if dtype == np.uint16 else master0.copy()
    m0, v0 = rand(rng, n, 0.1), np.abs(rand(rng, n, 0.1))
    table = k.adamw_tensor_table(dev.xp, slices, DECAYS, chunk=chunk)

    # the one-launch path, on guarded buffers
    whole = {name: _guarded(dev, a) for name, a in
             (("params", params0), ("master", master0), ("m", m0), ("v", v0))}
    p, master, m, v = (whole[name][1] for name in ("params", "master", "m", "v"))
    norm = dev.poisoned((1,), np.float64)
    # the per-tensor reference on plain copies
    rp, rmaster, rm, rv = (dev.put(a) for a in (params0, master0, m0, v0))

    for step, clip in STEPS:
        g = rand(rng, n)
        g = to_bits(g) if dtype == np.uint16 else g
        hyper = dev.put(k.adamw_hyper(LR, step, ADAM["beta1"], ADAM["beta2"]))
        step_seed = dev.put(k.adamw_step_seed(SEED, step))
        dg = dev.put(g)
        k.global_norm_device(dg, norm, hyper[3:4], grad_clip=clip)
        k.adamw_multi_tensor(p, dg, m, v, table, hyper, step_seed,
                             master_params=master if with_master else None, **ADAM)

        dg_ref = dev.put(g)
        scale = k.clip_scale(k.global_norm(dg_ref), clip)
        for t, sl in enumerate(slices):
            if sl.stop == sl.start:
                continue
            k.adamw_update(rp[sl], dg_ref[sl], rm[sl], rv[sl], step, LR, weight_decay=DECAYS[t],
                           grad_scale=scale, master_params=rmaster[sl] if with_master else None,
                           seed=rounding_seed(SEED, step, t), **ADAM)

        # Exact on both backends: the same kernel source, the same per-element
        # operations in the same order and the same random bits.
        assert dev.get(hyper)[3] == np.float32(scale), (step, dev.get(hyper), scale)
        for name, got, want in (("params", p, rp), ("master", master, rmaster), ("m", m, rm),
                                ("v", v, rv)):
            np.testing.assert_array_equal(dev.get(got), dev.get(want),
                                          err_msg=f"adamw_kernel4 {name} at step {step}")
    for name, (buf, _) in whole.items():
        _assert_guards(dev, buf, name)
    # the steps did update every non-empty tensor (the moments always move; a bf16
    # parameter may stay put under stochastic rounding of a sub-ulp update)
    m_moved = dev.get(m) != m0
    for sl in slices:
        assert m_moved[sl].all(), f"the moments of tensor {sl} were not updated"
    # bf16: 3 updates of ~lr = 1e-3 against ulps of 2^-7..2^-9 move ~40% of them
    assert np.count_nonzero(dev.get(p) != params0) > n // 5
    if not with_master:  # the master copy is neither read nor written
        np.testing.assert_array_equal(dev.get(master), master0)
    flags = {int(flag) for kernel, flag in launched if kernel == "adamw_kernel4"}
    assert flags == {int(wide)}, f"adamw_kernel4 ran with wide={flags}, expected {int(wide)}"


def test_kernel2_equals_kernel1_in_fp32(dev):
    """For fp32 without master weights, kernel2's arithmetic (which kernel4 shares)
    is kernel1's: bit for bit."""
    rng = np.random.default_rng(32)
    n = 1001
    arrays = [rand(rng, n), rand(rng, n), rand(rng, n, 0.1), np.abs(rand(rng, n, 0.1))]
    out = []
    for version in (1, 2):
        dp, dg, dm, dv = (dev.put(a) for a in arrays)
        k.adamw_update(dp, dg, dm, dv, 3, LR, weight_decay=0.1, grad_scale=0.7, version=version,
                       **ADAM)
        out.append([dev.get(a) for a in (dp, dm, dv)])
    for name, a1, a2 in zip(("params", "m", "v"), *out):
        np.testing.assert_array_equal(a2, a1, err_msg=f"adamw_kernel2 {name} != adamw_kernel1")


def test_tensor_table(dev):
    """Chunks never straddle tensors, cover every element once, in order, each at
    most `chunk` long; tensor starts and decays as given."""
    slices, n = _slices(SIZES)
    chunk = 100
    table = k.adamw_tensor_table(dev.xp, slices, DECAYS, chunk=chunk)
    tensor_start = dev.get(table.tensor_start)
    assert tensor_start.tolist() == [sl.start for sl in slices] + [n]
    np.testing.assert_array_equal(dev.get(table.tensor_decay), np.float32(DECAYS))
    ids, starts = dev.get(table.chunk_tensor), dev.get(table.chunk_start)
    assert table.n == n and table.n_tensors == len(SIZES) and table.chunk == chunk
    assert table.n_chunks == ids.size == starts.size == sum(math.ceil(s / chunk) for s in SIZES)
    covered = []
    for t, start in zip(ids.tolist(), starts.tolist()):
        end = min(start + chunk, slices[t].stop)
        assert slices[t].start <= start < end, (t, start)
        covered.extend(range(start, end))
    assert covered == list(range(n))


@pytest.mark.parametrize("dtype", [np.float32, np.uint16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n", [1, 70001])
def test_global_norm_device(dev, dtype, n):
    rng = np.random.default_rng(33)
    g = rand(rng, n)
    g = to_bits(g) if dtype == np.uint16 else g
    g_f = to_f32(g) if dtype == np.uint16 else g
    want = math.sqrt(float(np.sum(g_f.astype(np.float64) ** 2)))
    dg = dev.put(g)
    norm = dev.poisoned((1,), np.float64)
    scale = dev.poisoned((1,), np.float32)
    k.global_norm_device(dg, norm, scale)
    got = float(dev.get(norm)[0])
    # Exact inputs (bf16 widens exactly), squares and sums in fp32: each thread sums
    # at most ceil(n / 270336) squares, then a 1024-thread tree (10 levels), so the
    # sum of squares is within ~12 * 2^-24 ~ 7e-7 relative of the exact one and the
    # norm within half that; 1e-5 (test_kernels.py's fp32 tolerance) has a 10x margin,
    # a missing or doubled element (>= 1/n relative, here >= 1.4e-5) fails.
    assert_close("norm", got, want, atol=0.0, rtol=1e-5)
    assert dev.get(scale)[0] == np.float32(1.0)
    assert got == k.global_norm(dg), "global_norm must return global_norm_device's norm"

    # clip_scale's arithmetic exactly, for every kind of clip, written into a view
    # (slot 3 of adamw_multi_tensor's hyper) without touching its neighbours
    for clip in (None, 0.0, -1.0, 0.5 * got, np.nextafter(got, 0.0), got, 2.0 * got, 0.3):
        hyper = dev.put(np.array([1.0, 2.0, 3.0, np.nan], np.float32))
        norm = dev.poisoned((1,), np.float64)
        k.global_norm_device(dg, norm, hyper[3:4], grad_clip=clip)
        h = dev.get(hyper)
        assert float(dev.get(norm)[0]) == got
        assert h[3] == np.float32(k.clip_scale(got, clip)), (clip, h[3], k.clip_scale(got, clip))
        assert h[:3].tolist() == [1.0, 2.0, 3.0]
    # a clip below the norm does scale (so the comparison above is not all 1.0s)
    k.global_norm_device(dg, norm, scale, grad_clip=0.5 * got)
    assert dev.get(scale)[0] < 0.51


@pytest.mark.parametrize("dtype", [np.float32, np.uint16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n", [3, 7, 8, 9, 70001])
@pytest.mark.parametrize("version", [1, 2])
def test_global_norm_versions(dev, dtype, n, version, monkeypatch):
    """Version 2 (16-byte loads, the tail past the last whole packet added by block 0)
    against the float64 norm, for sizes with no packet, a whole packet, a packet and a
    tail; the tolerance and what a missing or doubled element does as above. The kernel
    launched is the version asked for; "auto" takes 2 for an aligned array and 1 for one
    at an odd offset, and an explicit 2 on such an array is refused."""
    from llmcu.cuda import runtime
    rng = np.random.default_rng(n)
    g = rand(rng, n + 1)
    g = to_bits(g) if dtype == np.uint16 else g
    g_f = to_f32(g) if dtype == np.uint16 else g
    want = math.sqrt(float(np.sum(g_f[:n].astype(np.float64) ** 2)))
    launched = []
    real = runtime.Backend.launch
    monkeypatch.setattr(runtime.Backend, "launch", lambda self, stem, kernel, *a, **kw: (
        launched.append(kernel), real(self, stem, kernel, *a, **kw))[1])
    dg = dev.put(g)
    norm = dev.poisoned((1,), np.float64)
    k.global_norm_device(dg[:n], norm, dev.poisoned((1,), np.float32), version=version)
    assert_close("norm", float(dev.get(norm)[0]), want, atol=0.0, rtol=1e-5)
    assert launched[0] == f"global_norm_squared_kernel{version}", launched
    launched.clear()
    k.global_norm_device(dg[1:], norm, dev.poisoned((1,), np.float32))  # odd offset: auto -> 1
    want_shifted = math.sqrt(float(np.sum(g_f[1:].astype(np.float64) ** 2)))
    assert_close("norm (offset)", float(dev.get(norm)[0]), want_shifted, atol=0.0, rtol=1e-5)
    assert launched[0] == "global_norm_squared_kernel1", launched
    if version == 2:
        with pytest.raises(ValueError, match="global_norm_device: the 16-byte-load version needs grads 16-byte aligned"):
            k.global_norm_device(dg[1:], norm, dev.poisoned((1,), np.float32), version=2)
        with pytest.raises(ValueError, match=r"global_norm_device: version must be one of \(1, 2\) or 'auto', got 3"):
            k.global_norm_device(dg, norm, dev.poisoned((1,), np.float32), version=3)


# ------------------------------------------------------------------ bad arguments

def _small():
    slices, n = _slices([3, 5])
    table = k.adamw_tensor_table(np, slices, [0.1, 0.0])
    z = np.zeros(n, np.float32)
    return table, dict(params=z.copy(), grads=z.copy(), m=z.copy(), v=z.copy(),
                       hyper=k.adamw_hyper(1e-3, 1), step_seed=k.adamw_step_seed(1, 1))


def _call(table, args, **change):
    a = {**args, **change}
    k.adamw_multi_tensor(a["params"], a["grads"], a["m"], a["v"], table, a["hyper"],
                         a["step_seed"], master_params=a.get("master_params"))


def test_multi_tensor_rejects_bad_arguments():
    table, args = _small()
    _call(table, args)  # the valid call runs
    fn = "adamw_multi_tensor"
    with pytest.raises(TypeError, match=rf"{fn}: hyper must have dtype float32, got float64"):
        _call(table, args, hyper=np.zeros(4))
    with pytest.raises(ValueError, match=rf"{fn}: hyper must have shape \(4,\), got \(3,\)"):
        _call(table, args, hyper=np.zeros(3, np.float32))
    with pytest.raises(TypeError, match=rf"{fn}: step_seed must have dtype uint32, got int32"):
        _call(table, args, step_seed=np.zeros(2, np.int32))
    with pytest.raises(ValueError, match=rf"{fn}: step_seed must have shape \(2,\), got \(1,\)"):
        _call(table, args, step_seed=np.zeros(1, np.uint32))
    with pytest.raises(ValueError, match=rf"{fn}: params must have shape \(9,\) \(the table's 9 "
                                         rf"elements\), got \(8,\)"):
        _call(k.adamw_tensor_table(np, _slices([4, 5])[0], [0.0, 0.0]), args)
    with pytest.raises(TypeError, match=rf"{fn}: table must be an AdamWTable"):
        _call({"n": 8}, args)
    with pytest.raises(TypeError, match=rf"{fn}: grads must have dtype float32, got uint16"):
        _call(table, args, grads=np.zeros(8, np.uint16))
    with pytest.raises(TypeError, match=rf"{fn}: master_params must have dtype float32, got float64"):
        _call(table, args, master_params=np.zeros(8))
    with pytest.raises(ValueError, match=rf"{fn}: v must have shape \(8,\), got \(9,\)"):
        _call(table, args, v=np.zeros(9, np.float32))


def test_global_norm_device_rejects_bad_arguments():
    g = np.ones(10, np.float32)
    fn = "global_norm_device"
    with pytest.raises(TypeError, match=rf"{fn}: norm must have dtype float64, got float32"):
        k.global_norm_device(g, np.zeros(1, np.float32), np.zeros(1, np.float32))
    with pytest.raises(ValueError, match=rf"{fn}: norm must have shape \(1,\), got \(2,\)"):
        k.global_norm_device(g, np.zeros(2), np.zeros(1, np.float32))
    with pytest.raises(TypeError, match=rf"{fn}: grad_scale must have dtype float32, got float64"):
        k.global_norm_device(g, np.zeros(1), np.zeros(1))
    with pytest.raises(ValueError, match=rf"{fn}: grad_clip must be a number or None, got nan"):
        k.global_norm_device(g, np.zeros(1), np.zeros(1, np.float32), grad_clip=float("nan"))
    with pytest.raises(TypeError, match=rf"{fn}: grads must have dtype float32 \(fp32\) or uint16"):
        k.global_norm_device(np.ones(10), np.zeros(1), np.zeros(1, np.float32))


def test_table_and_host_helpers_reject_bad_arguments():
    fn = "adamw_tensor_table"
    with pytest.raises(ValueError, match=rf"{fn}: slices must be contiguous from 0; slices\[1\] "
                                         rf"must start at 3"):
        k.adamw_tensor_table(np, [slice(0, 3), slice(4, 6)], [0.0, 0.0])
    with pytest.raises(ValueError, match=rf"{fn}: slices must be contiguous from 0; slices\[0\] "
                                         rf"must start at 0"):
        k.adamw_tensor_table(np, [slice(1, 3)], [0.0])
    with pytest.raises(ValueError, match=rf"{fn}: decays must have one entry per tensor \(2\), got 1"):
        k.adamw_tensor_table(np, [slice(0, 3), slice(3, 6)], [0.0])
    with pytest.raises(ValueError, match=rf"{fn}: chunk must be an int in \[1, 2\^31\), got 0"):
        k.adamw_tensor_table(np, [slice(0, 3)], [0.0], chunk=0)
    with pytest.raises(TypeError, match=rf"{fn}: slices\[0\] must be a slice with step 1"):
        k.adamw_tensor_table(np, [slice(0, 6, 2)], [0.0])
    with pytest.raises(ValueError, match=rf"{fn}: slices must name at least one tensor"):
        k.adamw_tensor_table(np, [], [])
    with pytest.raises(ValueError, match=rf"{fn}: the tensors hold no elements"):
        k.adamw_tensor_table(np, [slice(0, 0)], [0.0])
    with pytest.raises(ValueError, match=r"adamw_hyper: step is 1-based, got 0"):
        k.adamw_hyper(1e-3, 0)
    with pytest.raises(ValueError, match=r"adamw_step_seed: seed must be a 32-bit unsigned "
                                         r"integer, got -1"):
        k.adamw_step_seed(-1, 1)


def test_adamw_hyper_values():
    """adamw_update's own roundings of its scalars (f32 of the double expression)."""
    h = k.adamw_hyper(3e-4, 7, 0.9, 0.95)
    assert h.dtype == np.float32 and h.shape == (4,)
    assert h.tolist() == [np.float32(3e-4), np.float32(1.0 - 0.9 ** 7),
                          np.float32(1.0 - 0.95 ** 7), 1.0]
