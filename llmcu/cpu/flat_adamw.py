"""AdamW over one flat parameter array: the plumbing the GPT-2 and Llama models share.

Each model keeps its parameters, gradients and AdamW moments as flat float32
arrays in its config's order, with named views (config.parameter_views).
update_parameters runs AdamW tensor by tensor, with weight decay on the
model's decayed tensors only, optionally on one ZeRO-1 shard of the flat range
(llmcu/distributed.py). FlatAdamW is the gradient and moment bookkeeping the
model classes mix in: zero_grad, grad_norm, update, optimizer_state,
load_optimizer_state, params_host. It works on NumPy arrays (llmcu/cpu/) and on
the arrays of a kernel backend (llmcu/cuda/llama.py: CuPy, or NumPy under emu).
"""

from __future__ import annotations

import numpy as np

from ..config import parameter_slices, parameter_views
from .adamw import clip_scale
from .threads import parallel_for


def update_parameters(ops, config, decayed, params, grads, m, v, step, lr, beta1, beta2, eps,
                      weight_decay, grad_scale, shard=None):
    """AdamW (ops.adamw_update) tensor by tensor over parameter_slices(config): weight
    decay on the tensors named in `decayed` only.

    shard=(lo, hi): update only params[lo:hi] (ZeRO-1); m and v then hold hi - lo
    elements, for the flat range [lo, hi), and each tensor is updated on its
    intersection with that range."""
    lo, hi = (0, params.size) if shard is None else shard
    if not 0 <= lo <= hi <= params.size:
        raise ValueError(f"update_parameters: shard must be (lo, hi) with 0 <= lo <= hi <= "
                         f"{params.size}, got {shard}")
    for name, a in (("m", m), ("v", v)):
        if a.size != hi - lo:
            raise ValueError(f"update_parameters: {name} must hold {hi - lo} elements (the shard "
                             f"{lo}:{hi}), got {a.size}")
    for name, sl, _ in parameter_slices(config):
        a, b = max(sl.start, lo), min(sl.stop, hi)
        if a >= b:
            continue
        wd = weight_decay if name in decayed else 0.0
        ops.adamw_update(params[a:b], grads[a:b], m[a - lo:b - lo], v[a - lo:b - lo], step, lr,
                         beta1, beta2, eps, wd, grad_scale)


def _host(a) -> np.ndarray:
    return a.get() if hasattr(a, "get") else a


class FlatAdamW:
    """Gradients and AdamW moments of a model with `config` and flat float32 `params`.

    The model class sets OPS (its backend's adamw_update and global_norm) and
    DECAYED (the names of the weight-decayed tensors); its __init__ sets
    grads = g = m = v = None; `xp` is the array library of params (NumPy unless
    the instance says otherwise). Messages name the model class."""

    xp = np
    OPS = None
    DECAYED = frozenset()

    def params_host(self) -> np.ndarray:
        """The parameters as a NumPy array (the buffer itself on NumPy, a copy on the GPU)."""
        return _host(self.params)

    def zero_grad(self):
        if self.grads is None:
            self.grads = self.xp.zeros_like(self.params)
            self.g = parameter_views(self.config, self.grads)
        elif isinstance(self.grads, np.ndarray) and self.grads.ndim == 1:
            # over the CPU threads: 17.4 -> 9.1 ms for d12's 124M floats on the 2-core VM
            g = self.grads
            parallel_for(lambda lo, hi: g[lo:hi].fill(0.0), g.size)
        else:
            self.grads.fill(0.0)

    def grad_norm(self) -> float:
        """The global gradient norm (what update() clips)."""
        if self.grads is None:
            raise RuntimeError(f"{type(self).__name__}.grad_norm: no gradients; call backward first")
        return self.OPS.global_norm(self.grads)

    def update(self, lr, step, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0,
               grad_clip=None, grad_norm=None, shard=None):
        """AdamW at 1-based `step`; returns the gradient norm before clipping.

        Weight decay applies to the DECAYED tensors only (matrices and embeddings).
        grad_clip=None or <= 0 disables clipping. grad_norm: the norm from
        grad_norm(), if the caller has it already (saves a pass over the grads).
        shard=(lo, hi): ZeRO-1, update params[lo:hi] only, with m and v of
        hi - lo elements (update_parameters); pass the global grad_norm then.
        """
        if self.grads is None:
            raise RuntimeError(f"{type(self).__name__}.update: no gradients; call backward first")
        if self.m is None:
            n = self.params.size if shard is None else shard[1] - shard[0]
            self.m = self.xp.zeros(n, dtype=np.float32)
            self.v = self.xp.zeros(n, dtype=np.float32)
        norm = self.OPS.global_norm(self.grads) if grad_norm is None else float(grad_norm)
        scale = clip_scale(norm, grad_clip)
        update_parameters(self.OPS, self.config, self.DECAYED, self.params, self.grads, self.m,
                          self.v, step, lr, beta1, beta2, eps, weight_decay, scale, shard=shard)
        return norm

    def optimizer_state(self) -> tuple[np.ndarray, np.ndarray]:
        """AdamW's (m, v) as host arrays, zeros before the first update (for checkpoints)."""
        if self.m is None:
            zeros = np.zeros(self.params.shape, dtype=np.float32)
            return zeros, zeros.copy()
        return _host(self.m), _host(self.v)

    def load_optimizer_state(self, m: np.ndarray, v: np.ndarray, shard=None) -> None:
        """Set AdamW's moments (from a checkpoint); the next update continues from them.
        shard=(lo, hi): m and v are ZeRO-1's shard of the moments (see update)."""
        shape = tuple(self.params.shape) if shard is None else (shard[1] - shard[0],)
        for name, a in (("m", m), ("v", v)):
            if a.dtype != np.float32 or a.shape != shape:
                raise ValueError(f"{type(self).__name__}.load_optimizer_state: {name} must be "
                                 f"float32 of shape {shape}, got {a.dtype} {a.shape}")
        self.m, self.v = self.xp.array(m), self.xp.array(v)
