"""Softmax + cross-entropy over the padded vocabulary on kernels/classifier.cu.

Same functions and signatures as llmcu/cpu/classifier.py. Shapes: logits
(B,T,Vp) with V real columns, probs (B,T,Vp) float32, targets (B,T) int32,
losses (B,T) float32. Activation gradients overwrite (=). logits (and the
dlogits written over them) are floatX: float32, or uint16 holding bf16 (the
dtype of logits picks the build); probs and losses are always float32.

crossentropy_forward and fused_classifier_dlogits run fused_classifier_kernel2 (one
online-softmax pass and one write pass with 16-byte loads; H200, bf16 d12 B=16: 2.05 ms,
40% of copy) where Vp is a multiple of 16 // itemsize and logits are 16-byte aligned,
else kernel1 (three passes over the row). Version 3 (the row in registers) is in the
lab, kernels/dev/classifier.cu.
"""

import numpy as np

from .runtime import FLOATX_NAMES, backend_of, block_per_row, check_array, f32, floatx_dtype, i32
from .vectorized import vectorizable

CLASSIFIER_BLOCK = 1024


def _check(fn, be, logits, V, targets=None, **named):
    dt = floatx_dtype(fn, "logits", logits)
    check_array(fn, "logits", logits, be, dtype=dt)
    Vp = logits.shape[-1]
    if not 0 < V <= Vp:
        raise ValueError(f"{fn}: V must be in [1, Vp={Vp}], got {V}")
    N = logits.size // Vp
    rows = logits.shape[:-1]
    if targets is not None:
        check_array(fn, "targets", targets, be, dtype=np.int32, shape=rows)
    for name, a in named.items():
        check_array(fn, name, a, be, dtype=np.float32, shape=logits.shape if name == "probs" else rows)
    return N, Vp, FLOATX_NAMES[dt]


def softmax_forward(probs, logits, V):
    be = backend_of(logits)
    N, Vp, floatX = _check("softmax_forward", be, logits, V, probs=probs)
    grid, block = block_per_row(N, CLASSIFIER_BLOCK)
    be.launch("classifier", "softmax_forward_kernel1", grid, block,
              (probs, logits, i32(N), i32(V), i32(Vp)), floatX=floatX)


def _fused(fn, logits, losses, targets, V, dloss, write_dlogits):
    be = backend_of(logits)
    N, Vp, floatX = _check(fn, be, logits, V, targets=targets, losses=losses)
    version = 2 if vectorizable(Vp, dict(logits=logits)) else 1
    grid, block = block_per_row(N, CLASSIFIER_BLOCK)
    be.launch("classifier", f"fused_classifier_kernel{version}", grid, block,
              (logits, losses, targets, f32(dloss), i32(N), i32(V), i32(Vp), i32(write_dlogits)),
              floatX=floatX)


def crossentropy_forward(losses, logits, targets, V):
    _fused("crossentropy_forward", logits, losses, targets, V, 0.0, 0)


def fused_classifier(losses, probs, logits, targets, V):
    softmax_forward(probs, logits, V)
    crossentropy_forward(losses, logits, targets, V)


def fused_classifier_dlogits(logits, losses, targets, V, dloss):
    """llm.c's fused classifier: losses, and logits overwritten in place by
    dlogits = dloss * (softmax - onehot(targets)), 0 on padded columns."""
    _fused("fused_classifier_dlogits", logits, losses, targets, V, dloss, 1)


LOSS_MEAN_BLOCK = 1024  # kernels/classifier.cu: one block, a power of two


def loss_mean(total, losses, scale):
    """total[0] += scale * sum(losses), summed in double on the device (no host read):
    total a float64 array of shape (1,), losses float32 (any shape). With scale =
    1 / losses.size it adds the mean loss."""
    fn = "loss_mean"
    be = backend_of(losses)
    check_array(fn, "losses", losses, be, dtype=np.float32)
    check_array(fn, "total", total, be, dtype=np.float64, shape=(1,))
    if losses.size >= 2**31:
        raise ValueError(f"{fn}: losses must have fewer than 2**31 elements, got {losses.size}")
    be.launch("classifier", "classifier_loss_mean_kernel1", (1,), (LOSS_MEAN_BLOCK,),
              (total, losses, i32(losses.size), np.float64(scale)))
