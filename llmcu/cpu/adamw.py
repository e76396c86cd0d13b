"""AdamW with llm.c's semantics, and the global gradient norm (NumPy oracle).

    m = b1 m + (1 - b1) g            v = b2 v + (1 - b2) g^2
    m_hat = m / (1 - b1^t)           v_hat = v / (1 - b2^t)
    p -= lr (m_hat / (sqrt(v_hat) + eps) + wd p)     (decoupled weight decay)

g is the gradient times grad_scale (the clipping factor). Arrays are flat
float32 and updated in place, a chunk at a time so the dozen elementwise
passes stay in cache instead of streaming 124M floats a dozen times.
"""

import math

import numpy as np

CHUNK = 1 << 16


def global_norm(grads):
    """sqrt(sum g^2) over a flat array, accumulated in float64 across chunks."""
    total = 0.0
    for s in range(0, grads.size, 1 << 20):
        part = grads[s:s + (1 << 20)]
        total += float(np.dot(part, part))
    return math.sqrt(total)


def clip_scale(grad_norm, max_norm):
    """Factor that brings the gradient norm down to max_norm (1.0 if already under)."""
    if max_norm is None or max_norm <= 0.0 or grad_norm <= max_norm:
        return 1.0
    return max_norm / (grad_norm + 1e-6)


def adamw_update(params, grads, m, v, step, lr, beta1=0.9, beta2=0.999, eps=1e-8,
                 weight_decay=0.0, grad_scale=1.0):
    """One AdamW step at 1-based `step` on flat float32 arrays, in place."""
    if step < 1:
        raise ValueError(f"adamw_update: step is 1-based, got {step}")
    for name, a in (("grads", grads), ("m", m), ("v", v)):
        if a.shape != params.shape or a.dtype != np.float32:
            raise ValueError(f"adamw_update: {name} must be float32 of shape {params.shape}, "
                             f"got {a.dtype} {a.shape}")
    f32 = np.float32
    one_b1, one_b2 = f32(1.0 - beta1), f32(1.0 - beta2)
    # Bias corrections folded into two scalars:
    #   m_hat / (sqrt(v_hat) + eps) * lr == (lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps)
    step_size = f32(lr / (1.0 - beta1 ** step))
    inv_sqrt_bc2 = f32(1.0 / math.sqrt(1.0 - beta2 ** step))
    eps32, gs = f32(eps), f32(grad_scale)
    # p - lr*wd*p - lr*update == p*(1 - lr*wd) - lr*update: the decay uses the old p
    decay = f32(1.0 - lr * weight_decay)
    n = min(CHUNK, params.size)
    scaled = np.empty(n, np.float32)
    t = np.empty(n, np.float32)
    for s in range(0, params.size, CHUNK):
        e = min(s + CHUNK, params.size)
        p_, m_, v_, t_ = params[s:e], m[s:e], v[s:e], t[:e - s]
        g_ = grads[s:e]
        if grad_scale != 1.0:
            g_ = np.multiply(g_, gs, out=scaled[:e - s])
        np.subtract(g_, m_, out=t_)   # m += (1 - b1) (g - m)
        t_ *= one_b1
        m_ += t_
        np.multiply(g_, g_, out=t_)   # v += (1 - b2) (g^2 - v)
        t_ -= v_
        t_ *= one_b2
        v_ += t_
        np.sqrt(v_, out=t_)           # t = step_size * m / (sqrt(v) / sqrt(bc2) + eps)
        t_ *= inv_sqrt_bc2
        t_ += eps32
        np.divide(m_, t_, out=t_)
        t_ *= step_size
        if weight_decay != 0.0:
            p_ *= decay
        p_ -= t_
