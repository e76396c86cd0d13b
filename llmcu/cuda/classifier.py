"""Softmax + cross-entropy over the padded vocabulary on kernels/classifier.cu.

Same functions and signatures as llmcu/cpu/classifier.py. Shapes: logits
(B,T,Vp) with V real columns, probs (B,T,Vp) float32, targets (B,T) int32,
losses (B,T) float32. Activation gradients overwrite (=).
"""

import numpy as np

from .runtime import backend_of, block_per_row, check_array, f32, i32

CLASSIFIER_BLOCK = 1024


def _check(fn, be, logits, V, targets=None, **named):
    check_array(fn, "logits", logits, be)
    Vp = logits.shape[-1]
    if not 0 < V <= Vp:
        raise ValueError(f"{fn}: V must be in [1, Vp={Vp}], got {V}")
    N = logits.size // Vp
    rows = logits.shape[:-1]
    if targets is not None:
        check_array(fn, "targets", targets, be, dtype=np.int32, shape=rows)
    for name, a in named.items():
        check_array(fn, name, a, be, shape=logits.shape if name == "probs" else rows)
    return N, Vp


def softmax_forward(probs, logits, V):
    be = backend_of(logits)
    N, Vp = _check("softmax_forward", be, logits, V, probs=probs)
    grid, block = block_per_row(N, CLASSIFIER_BLOCK)
    be.launch("classifier", "softmax_forward_kernel1", grid, block, (probs, logits, i32(N), i32(V), i32(Vp)))


def _fused(fn, logits, losses, targets, V, dloss, write_dlogits):
    be = backend_of(logits)
    N, Vp = _check(fn, be, logits, V, targets=targets, losses=losses)
    grid, block = block_per_row(N, CLASSIFIER_BLOCK)
    be.launch("classifier", "fused_classifier_kernel1", grid, block,
              (logits, losses, targets, f32(dloss), i32(N), i32(V), i32(Vp), i32(write_dlogits)))


def crossentropy_forward(losses, logits, targets, V):
    _fused("crossentropy_forward", logits, losses, targets, V, 0.0, 0)


def fused_classifier(losses, probs, logits, targets, V):
    softmax_forward(probs, logits, V)
    crossentropy_forward(losses, logits, targets, V)


def fused_classifier_dlogits(logits, losses, targets, V, dloss):
    """llm.c's fused classifier: losses, and logits overwritten in place by
    dlogits = dloss * (softmax - onehot(targets)), 0 on padded columns."""
    _fused("fused_classifier_dlogits", logits, losses, targets, V, dloss, 1)
