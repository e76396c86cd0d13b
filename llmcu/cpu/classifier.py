"""Softmax + cross-entropy over the padded vocabulary, and its backward.

Shapes: logits/probs/dlogits (B,T,Vp) where only the first V columns are real
tokens (columns V..Vp-1 are padding: they get probability 0 and gradient 0);
targets (B,T) int; losses/dlosses (B,T). Activation gradients overwrite (=).

fused_classifier and crossentropy_softmax_backward treat each (b,t) row on its
own, so they run on blocks of rows spread over the CPU threads (threads.rows);
the functions with a leading underscore are the plain code each block runs.
"""

import numpy as np

from .threads import rows


def softmax_forward(probs, logits, V):
    """probs[..., :V] = softmax(logits[..., :V]); probs[..., V:] = 0."""
    x = logits[..., :V]
    p = probs[..., :V]
    np.subtract(x, x.max(axis=-1, keepdims=True), out=p)
    np.exp(p, out=p)
    p /= p.sum(axis=-1, keepdims=True)
    probs[..., V:] = 0.0


def crossentropy_forward(losses, logits, targets, V):
    """losses = logsumexp(logits[..., :V]) - logits[target], the stable form of -log p."""
    x = logits[..., :V]
    m = x.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(x - m).sum(axis=-1)) + m[..., 0]
    picked = np.take_along_axis(logits, targets[..., None].astype(np.intp), axis=-1)[..., 0]
    losses[...] = lse - picked


def crossentropy_softmax_backward(dlogits, dlosses, probs, targets, V):
    """dlogits = dlosses * (probs - onehot(targets)), zero on padded columns."""
    rows(_crossentropy_softmax_backward, (dlogits, dlosses, probs, targets), V, lead=dlosses.ndim)


def _crossentropy_softmax_backward(dlogits, dlosses, probs, targets, V):
    np.multiply(probs, dlosses[..., None], out=dlogits)
    idx = targets[..., None].astype(np.intp)
    picked = np.take_along_axis(dlogits, idx, axis=-1)
    np.put_along_axis(dlogits, idx, picked - dlosses[..., None], axis=-1)
    dlogits[..., V:] = 0.0


def fused_classifier(losses, probs, logits, targets, V):
    """Forward half of the fused classifier: the losses and the probabilities the
    backward needs, from a single exp pass over the logits. (The CUDA kernel
    goes on to write dlogits in place; the oracle keeps that step separate.)"""
    rows(_fused_classifier, (losses, probs, logits, targets), V, lead=losses.ndim)


def _fused_classifier(losses, probs, logits, targets, V):
    x = logits[..., :V]
    p = probs[..., :V]
    m = x.max(axis=-1, keepdims=True)
    np.subtract(x, m, out=p)
    np.exp(p, out=p)
    total = p.sum(axis=-1, keepdims=True)
    p /= total
    probs[..., V:] = 0.0
    picked = np.take_along_axis(logits, targets[..., None].astype(np.intp), axis=-1)
    # loss = logsumexp - logit[target]: exact where -log(p[target]) would underflow
    losses[...] = (np.log(total) + m - picked)[..., 0]


def fused_classifier_dlogits(logits, losses, targets, V, dloss):
    """llm.c's fused classifier: losses, and logits overwritten in place by
    dlogits = dloss * (softmax - onehot(targets)), 0 on padded columns."""
    probs = np.empty_like(logits)
    fused_classifier(losses, probs, logits, targets, V)
    dlosses = np.full(losses.shape, dloss, dtype=logits.dtype)
    crossentropy_softmax_backward(logits, dlosses, probs, targets, V)
