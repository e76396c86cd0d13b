"""bf16 mixed precision shared by the kernel models (llmcu/cuda/gpt2.py, llama.py).

llm.c's scheme: parameters, gradients and activations in bf16 (uint16 arrays of
bf16 bit patterns, llmcu.formats; the kernels' floatX = __nv_bfloat16); the
AdamW moments, norm statistics, losses and attention's lse in float32. With
master weights (llm.c's -w 1) AdamW updates an fp32 master copy and writes the
bf16 parameters as its stochastic rounding; without, it updates the bf16
parameters in place, stochastically rounded. The rounding's random bits are a
hash of (seed, step, tensor, element) (rounding_seed), so a resumed run repeats
them without any RNG state.

MixedPrecisionAdamW is FlatAdamW plus that: the model class calls
set_parameters() in its __init__ (after setting xp, config and seed) and gets
update, params_host, master_host and load_optimizer_state for both dtypes.
ZeRO-1 (llmcu/distributed.py) calls keep_shard((lo, hi)) once: a bf16 model then
keeps the master copy, m and v of that flat range only and update(shard=) runs
adamw_kernel4 on it with the whole model's tensor ids and element indices
(adamw_shard_table), so the stochastic rounding does not depend on the world size.
"""

from __future__ import annotations

import functools
import math
from types import SimpleNamespace

import numpy as np

from ..config import parameter_slices
from ..cpu.flat_adamw import FlatAdamW, _host
from ..formats import bf16_bits_to_float32, float32_to_bf16_bits
from .adamw import adamw_update, clip_scale, global_norm
from .runtime import backend_of

DTYPES = {"fp32": np.dtype(np.float32), "bf16": np.dtype(np.uint16)}  # floatX of each dtype


def check_dtype(fn, dtype):
    if dtype not in DTYPES:
        raise ValueError(f"{fn}: dtype must be one of {tuple(DTYPES)}, got {dtype!r}")


def mix32(h: int) -> int:
    """A 32-bit integer hash (the finaliser of kernels/common.cuh's mix32)."""
    h &= 0xFFFFFFFF
    h ^= h >> 16
    h = (h * 0x7FEB352D) & 0xFFFFFFFF
    h ^= h >> 15
    h = (h * 0x846CA68B) & 0xFFFFFFFF
    return h ^ (h >> 16)


def rounding_seed(seed: int, step: int, tensor: int) -> int:
    """The stochastic-rounding seed of parameter tensor `tensor` at `step`: distinct
    per tensor and step (llm.c draws one per tensor from its RNG), a pure function
    of them so a resumed run rounds exactly as the uninterrupted one."""
    return mix32(mix32(mix32(seed) ^ step) ^ (tensor + 1))


def allocate_views(obj, xp, shapes, floatx, fp32_names):
    """One flat buffer per element type with a named view on `obj` for each
    (name, shape): floatx for all but fp32_names, which are float32. Returns
    (memory, stats): the floatx buffer and the float32 one (None in fp32)."""
    floatx = np.dtype(floatx)
    kind = {name: np.dtype(np.float32) if name in fp32_names else floatx for name, _ in shapes}
    totals: dict = {}
    for name, shape in shapes:
        totals[kind[name]] = totals.get(kind[name], 0) + math.prod(shape)
    buffers = {dt: xp.zeros(n, dtype=dt) for dt, n in totals.items()}
    offsets = dict.fromkeys(buffers, 0)
    for name, shape in shapes:
        dt, size = kind[name], math.prod(shape)
        setattr(obj, name, buffers[dt][offsets[dt]:offsets[dt] + size].reshape(shape))
        offsets[dt] += size
    stats = buffers.get(np.dtype(np.float32)) if floatx != np.float32 else None
    return buffers.get(floatx, xp.zeros(0, dtype=floatx)), stats


def check_params_dtype(fn, params, n, dtype):
    """params must be float32 (or, for bf16, uint16 bf16 bits) of shape (n,)."""
    allowed = (np.dtype(np.float32),) + ((DTYPES[dtype],) if dtype == "bf16" else ())
    if tuple(params.shape) != (n,) or params.dtype not in allowed:
        want = " or ".join(str(d) for d in allowed)
        raise ValueError(f"{fn}: params must be {want} of shape ({n},), "
                         f"got {params.dtype} {tuple(params.shape)}")


class MixedPrecisionAdamW(FlatAdamW):
    """FlatAdamW for a model whose parameters are fp32 or bf16 (module doc)."""

    dtype = "fp32"
    master = None
    seed = 42

    def set_parameters(self, params, dtype: str, master_weights: bool) -> None:
        """self.params (and, bf16 with master weights, self.master) from checked `params`:
        float32 values (a bf16 model rounds them to nearest and keeps them as the master
        copy) or, bf16 only, uint16 bf16 bits, which the model then shares."""
        self.dtype, self.floatx = dtype, DTYPES[dtype]
        xp = self.xp
        if dtype == "fp32" or params.dtype == self.floatx:
            self.params = xp.asarray(params)  # on the GPU a device copy; under emu the array itself
        else:
            self.params = xp.asarray(float32_to_bf16_bits(params))
        self.master = None
        if dtype == "bf16" and master_weights:
            self.master = (xp.array(params) if params.dtype == np.float32
                           else bf16_bits_to_float32(self.params).copy())

    @property
    def master_weights(self) -> bool:
        return self.master is not None

    _grads_zeroed = False  # set by zero_grad, cleared by the next backward's ops

    def zero_grad(self):
        """Zero the gradients; the next backward() then overwrites (=) the GEMM weight and
        bias gradients instead of adding onto the zeros (so do not write self.grads between
        zero_grad and backward)."""
        if self.grads is None:
            super().zero_grad()
        else:  # a device fill (Backend.fill), so a captured step repeats it
            backend_of(self.grads).fill(self.grads, 0)
        self._grads_zeroed = True

    def _backward_ops(self, ops):
        """The layer functions for this backward. The first backward after zero_grad has
        matmul_backward overwrite its dweight/dbias (accumulate_weight=False): each is that
        pass's first write of its gradient (a tied wte's before encoder_backward adds to
        it), so the values are the same, without bf16's fp32-product + add pass per
        weight. Later backwards (gradient accumulation) add. ops.matmul_backward is read
        now, so a wrapper put there (a profiler) still runs."""
        first, self._grads_zeroed = self._grads_zeroed, False
        if not first:
            return ops
        names = [n for n in ("matmul_backward", "matmul_dgelu_backward") if hasattr(ops, n)]
        return SimpleNamespace(**{**vars(ops), **{n: functools.partial(
            getattr(ops, n), accumulate_weight=False) for n in names}})

    def update(self, lr, step, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0, grad_clip=None,
               grad_norm=None, shard=None):
        """AdamW at 1-based `step`; returns the gradient norm before clipping
        (grad_norm: the norm from grad_norm(), if the caller has it already;
        shard=(lo, hi): ZeRO-1, as FlatAdamW.update; a bf16 model needs keep_shard(shard) first)."""
        if self.dtype == "fp32":  # FlatAdamW's, as the NumPy model
            return super().update(lr, step, beta1, beta2, eps, weight_decay, grad_clip, grad_norm,
                                  shard)
        cls = type(self).__name__
        if self.grads is None:
            raise RuntimeError(f"{cls}.update: no gradients; call backward first")
        if (None if shard is None else tuple(shard)) != self.master_shard:
            raise ValueError(f"{cls}.update: shard must be the one keep_shard() set, "
                             f"{self.master_shard}, got {shard}")
        if self.m is None:
            n = self.params.size if shard is None else shard[1] - shard[0]
            self.m = self.xp.zeros(n, dtype=np.float32)
            self.v = self.xp.zeros(n, dtype=np.float32)
        norm = global_norm(self.grads) if grad_norm is None else float(grad_norm)
        scale = clip_scale(norm, grad_clip)
        if shard is not None:
            return self._update_shard(lr, step, beta1, beta2, eps, weight_decay, scale, norm)
        # bf16: llmcu/cpu/flat_adamw.update_parameters' loop, with the master copy and a
        # stochastic-rounding seed per tensor
        for t, (name, sl, _) in enumerate(parameter_slices(self.config)):
            master = self.master[sl] if self.master is not None else None
            adamw_update(self.params[sl], self.grads[sl], self.m[sl], self.v[sl], step, lr, beta1,
                         beta2, eps, weight_decay if name in self.DECAYED else 0.0, scale,
                         master_params=master, seed=rounding_seed(self.seed, step, t))
        return norm

    master_shard = None  # ZeRO-1: the (lo, hi) of the flat range master, m and v hold (keep_shard)

    def keep_shard(self, shard) -> None:
        """ZeRO-1 with bf16 (llmcu/distributed.py): from now on this rank keeps the fp32
        master weights, m and v of the flat range shard=(lo, hi) only (a bf16 model's
        master copy shrinks to it, so each rank holds 1/world_size of the fp32 state)
        and update(shard=) updates params[lo:hi] only. fp32 models keep m and v of the
        shard through FlatAdamW and need no call."""
        lo, hi = shard
        if not 0 <= lo <= hi <= self.params.size:
            raise ValueError(f"{type(self).__name__}.keep_shard: shard must be (lo, hi) with "
                             f"0 <= lo <= hi <= {self.params.size}, got {shard}")
        if self.dtype == "fp32":
            return
        if self.m is not None:
            raise ValueError(f"{type(self).__name__}.keep_shard: call it before the first update")
        self.master_shard = (lo, hi)
        if self.master is not None:
            self.master = self.master[lo:hi].copy()

    def _update_shard(self, lr, step, beta1, beta2, eps, weight_decay, scale, norm):
        """bf16 AdamW on the shard: one adamw_kernel4 launch over params[lo:hi] with a shard
        table (adamw_shard_table), whose random bits are those of the per-tensor loop in
        update() for the same elements, so every rank rounds its shard exactly as one process
        rounds the whole buffer (the bf16 parameters do not depend on the world size)."""
        from .adamw import adamw_hyper, adamw_multi_tensor, adamw_shard_table, adamw_step_seed
        lo, hi = self.master_shard
        if hi == lo:
            return norm
        xp = self.xp
        if getattr(self, "_shard_table", None) is None or self._shard_table[0] != weight_decay:
            slices = [sl for _, sl, _ in parameter_slices(self.config)]
            decays = [weight_decay if name in self.DECAYED else 0.0
                      for name, _, _ in parameter_slices(self.config)]
            self._shard_table = (weight_decay, adamw_shard_table(xp, slices, decays, lo, hi))
        hyper = adamw_hyper(lr, step, beta1, beta2)
        hyper[3] = np.float32(scale)  # adamw_update passes f32(grad_scale): the same rounding
        adamw_multi_tensor(self.params[lo:hi], self.grads[lo:hi], self.m, self.v,
                           self._shard_table[1], xp.asarray(hyper),
                           xp.asarray(adamw_step_seed(self.seed, step)), beta1, beta2, eps,
                           master_params=self.master)
        return norm

    def params_host(self) -> np.ndarray:
        """The parameters as a float32 NumPy array: fp32, the buffer itself under emu and
        a copy on the GPU; bf16, the bf16 parameters widened exactly (a new array): what
        the forward computes with and what a version 5 checkpoint stores."""
        if self.dtype == "bf16":
            return _host(bf16_bits_to_float32(self.params))
        return super().params_host()

    def master_host(self) -> np.ndarray | None:
        """The fp32 master parameters as a NumPy array (a copy), None without them."""
        return None if self.master is None else np.array(_host(self.master))

    def load_optimizer_state(self, m: np.ndarray, v: np.ndarray, shard=None, master=None) -> None:
        """Set AdamW's moments (from a checkpoint); the next update continues from them
        (shard=(lo, hi): ZeRO-1's shard of the moments). master: the fp32 master
        parameters a bf16 run with master weights saved; None keeps the current ones
        (those made from the parameters the model was built with)."""
        cls = type(self).__name__
        if master is not None:
            if self.master is None:
                raise ValueError(f"{cls}.load_optimizer_state: master weights given, but this "
                                 f"model ({self.dtype}, master_weights=False) keeps none; resume a "
                                 f"run with master weights as --dtype bf16 -w 1")
            want = tuple(self.master.shape)  # the whole buffer, or the ZeRO-1 shard (keep_shard)
            if master.dtype != np.float32 or tuple(master.shape) != want:
                raise ValueError(f"{cls}.load_optimizer_state: master must be float32 of shape "
                                 f"{want}, got {master.dtype} {master.shape}")
        super().load_optimizer_state(m, v, shard)  # checks m and v before the master is set
        if master is not None:
            self.master[...] = self.xp.asarray(master)
