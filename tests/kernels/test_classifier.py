"""The classifier's product kernels (kernels/classifier.cu, llmcu/cuda/classifier.py)
against the NumPy oracle (llmcu/cpu/classifier.py), fp32 and bf16 logits:

- crossentropy_forward and fused_classifier_dlogits: fused_classifier_kernel2 (one
  online-softmax pass and one write pass, 16-byte loads) where Vp is a multiple of the
  packet (4 fp32, 8 bf16) and the logits are aligned, else kernel1 (three passes over the
  row); the launched kernel is checked;
- softmax_forward (softmax_forward_kernel1) and loss_mean (classifier_loss_mean_kernel1).

Only the first V of the Vp columns are real: the padded ones hold 1e4 here and must be
ignored however large, and their dlogits and probabilities must be exactly 0. Inputs are
random (logits N(0, 9): softmax rows neither one-hot nor flat; the columns at both ends of
the row raised, _logits says why), outputs NaN-poisoned; dlogits overwrite the logits in
place.

Tolerances: losses (fp32 in both dtypes, computed from exact inputs) within F32 = 1e-5 of
their scale (expf against NumPy's exp and a different summation order over up to 50k
columns: ~1e-6 relative); probabilities (~1/V) and dlogits (dloss times them) are small,
so an absolute 1e-7 (fp32) plus rtol 1e-5, or rtol 2^-8 + 1e-5 for bf16 dlogits (one
rounding of an fp32 result); loss_mean sums in double: 1e-12 relative.
"""

import numpy as np
import pytest

from helpers import BF16, F32, FP32, U, assert_close, rand_x, to_dtype, value
from llmcu.cpu import classifier as cpu_classifier


def _kernels():
    from llmcu.cuda import classifier
    return classifier


def _logits(rng, dtype, B, T, V, Vp):
    """Random logits with the first and the last 5 real columns raised by 6: they carry a
    good part of each row's softmax mass, so a packet dropped at either end of the row (the
    last one straddling V) changes the loss by far more than the tolerance (a random column
    of 50k may not); padded columns 1e4; targets random, row 0's the last real column."""
    x = rand_x(rng, FP32, B, T, Vp, scale=3.0)[0]
    x[..., [0, V - 5, V - 4, V - 3, V - 2, V - 1]] += 6.0
    logits = to_dtype(x, dtype)
    logits[..., V:] = to_dtype(np.float32(1e4), dtype)  # padded columns: must be ignored
    targets = rng.integers(0, V, (B, T)).astype(np.int32)
    targets.reshape(-1)[0] = V - 1
    return logits, value(logits).astype(np.float32), targets


# (dtype, B, T, V, Vp, kernel): GPT-2's vocabulary (V = 50257 in Vp = 50304: kernel2's
# block of 1024 threads walks the row 13 times in packets, the last straddling V); bf16
# Vp = 10016 (two passes of 8192, 10001 not a whole packet); kernel1 where Vp is not a
# multiple of the packet (fp32 103, bf16 100). dlogits tolerance: atol 1e-7 and rtol F32
# (fp32) or U + F32 (bf16: one rounding).
CASES = [
    pytest.param(FP32, 1, 2, 50257, 50304, 2, 1e-5, id="fp32-kernel2-gpt2-vocab"),
    pytest.param(FP32, 2, 7, 101, 103, 1, 1e-5, id="fp32-kernel1"),
    pytest.param(BF16, 1, 3, 10001, 10016, 2, U + F32, id="bf16-kernel2"),
    pytest.param(BF16, 2, 7, 97, 100, 1, U + F32, id="bf16-kernel1"),
]


@pytest.mark.parametrize("dtype,B,T,V,Vp,kernel,dlogits_rtol", CASES)
def test_fused_classifier(dev, launch_args, dtype, B, T, V, Vp, kernel, dlogits_rtol):
    k = _kernels()
    logits, logits_f, targets = _logits(np.random.default_rng(V), dtype, B, T, V, Vp)
    losses = dev.poisoned((B, T))
    k.crossentropy_forward(losses, dev.put(logits), dev.put(targets), V)
    rlosses = np.empty((B, T), np.float32)
    cpu_classifier.crossentropy_forward(rlosses, logits_f, targets, V)
    assert_close("crossentropy losses", dev.get(losses), rlosses, atol=F32 * float(np.abs(rlosses).max()),
                 rtol=F32)

    dloss = 1.0 / (B * T)
    dlogits, losses2 = dev.put(logits), dev.poisoned((B, T))
    k.fused_classifier_dlogits(dlogits, losses2, dev.put(targets), V, dloss)
    rdlogits, rlosses2 = logits_f.copy(), np.empty((B, T), np.float32)
    cpu_classifier.fused_classifier_dlogits(rdlogits, rlosses2, targets, V, dloss)
    assert_close("fused losses", dev.get(losses2), rlosses2, atol=F32 * float(np.abs(rlosses2).max()), rtol=F32)
    got = value(dev.get(dlogits))
    assert_close("fused dlogits", got, rdlogits, atol=1e-7, rtol=dlogits_rtol)
    assert not np.any(got[..., V:]), "padded columns of dlogits must be exactly 0"
    assert [(launch.kernel, int(launch.args[-1])) for launch in launch_args] == [
        (f"fused_classifier_kernel{kernel}", 0), (f"fused_classifier_kernel{kernel}", 1)]  # write_dlogits


# (dtype, B, T, V, Vp): one path; probabilities are fp32 in both dtypes. Tolerance: atol 1e-7
# (probabilities ~1/V), rtol F32.
@pytest.mark.parametrize("dtype,B,T,V,Vp", [pytest.param(FP32, 2, 7, 101, 103, id="fp32"),
                                            pytest.param(BF16, 1, 3, 1000, 1024, id="bf16")])
def test_softmax_forward(dev, dtype, B, T, V, Vp):
    k = _kernels()
    logits, logits_f, _ = _logits(np.random.default_rng(V + 1), dtype, B, T, V, Vp)
    probs = dev.poisoned((B, T, Vp))
    k.softmax_forward(probs, dev.put(logits), V)
    rprobs = np.empty((B, T, Vp), np.float32)
    cpu_classifier.softmax_forward(rprobs, logits_f, V)
    assert_close("softmax probs", dev.get(probs), rprobs, atol=1e-7, rtol=F32)
    assert not np.any(dev.get(probs)[..., V:]), "padded columns of probs must be exactly 0"


# n = 1025: more losses than the kernel's one block of 1024 threads. Tolerance: 1e-12
# relative (double sums of float32 values in another order).
def test_loss_mean(dev):
    k = _kernels()
    losses = rand_x(np.random.default_rng(5), FP32, 1025, scale=2.0, shift=5.0)[0]
    total = dev.put(np.array([0.5]))  # adds to what is there
    k.loss_mean(total, dev.put(losses), 1.0 / losses.size)
    want = 0.5 + float(np.sum(losses.astype(np.float64))) / losses.size
    assert_close("loss_mean total", dev.get(total), np.array([want]), atol=0, rtol=1e-12)


def test_classifier_rejects_bad_arguments():
    k = _kernels()
    logits, losses = np.ones((2, 3, 8), np.float32), np.zeros((2, 3), np.float32)
    targets = np.zeros((2, 3), np.int32)
    with pytest.raises(ValueError, match=r"crossentropy_forward: V must be in \[1, Vp=8\], got 9"):
        k.crossentropy_forward(losses, logits, targets, 9)
    with pytest.raises(TypeError, match=r"fused_classifier_dlogits: targets must have dtype int32, got int64"):
        k.fused_classifier_dlogits(logits, losses, targets.astype(np.int64), 8, 1.0)
    with pytest.raises(TypeError, match=r"loss_mean: total must have dtype float64, got float32"):
        k.loss_mean(np.zeros(1, np.float32), losses, 1.0)
